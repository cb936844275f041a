"""LlavaTokenizer against the oracle: transformers' slow LlamaTokenizer configured as llava-hf (legacy=True)."""
import os
import random

import numpy as np
import pytest

from helpers import TOKENIZER_MODEL
from llava_errors import LlavaError
from llava_tokenizer import LlavaTokenizer

FRAGMENTS = [
    "Describe the image.", "What is in this picture?", "USER:", "ASSISTANT:", "hello", "Hello, world!",
    "The quick brown fox jumps over the lazy dog.", "a", "A", "I", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n",
    " \n ", "0", "42", "3.14159", "2024-01-31", "1,000,000", "x=1+2*3", "(a+b)^2", "don't", "it's", "e.g.",
    "C++", "#include <stdio.h>", "def f(x): return x", "{\"key\": [1, 2, 3]}", "http://example.com/a?b=c",
    "naïve café", "Ünïcödé", "Straße", "日本語のテキスト", "你好，世界", "这是一只猫。", "中文和English混合",
    "한국어", "Привет, мир", "مرحبا", "שלום", "ελληνικά", "😀", "👍🏽", "🐱‍👤", "🇨🇳", "∑∫√∞", "→←↑↓",
    "\u00a0", "\u200b", "\u3000", "▁", "▁▁word", "<", ">", "<>", "<im", "age>", "<imag", "<s", "s>", "</", "<unk",
    "<0x0A>", "[INST]", "<<SYS>>", "...", "!!!", "???", "---", "___", "***", "~", "`code`", "\\n", "%d", "@user",
]
SPECIALS = ["<image>", "<pad>", "<s>", "</s>", "<unk>"]

HANDWRITTEN = [
    "", " ", "  ", "\n", "<image>", "<image>\n", "<image>\nDescribe the image.",
    "USER: <image>\nDescribe the image. ASSISTANT:", "USER: <image>\nWhat is shown here? ASSISTANT:",
    "<image><image>", "<image> <image>", "<image>\n<image>\nCompare the two pictures.", "<image>" * 5,
    "<pad>", "<pad><pad>hello", "hello<pad>", " <pad> ", "<image><pad>", "<pad>\n<image>",
    "a<image>b", "a <image> b", "a<image> b", "a <image>b", " <image>", "<image> ", "  <image>  ",
    "<<image>>", "<image<image>>", "<im<image>age>", "<image", "image>", "<Image>", "<IMAGE>", "< image>",
    "<s>", "</s>", "<unk>", "<s>hello</s>", "text</s>", "<s> x", "x <s>", "<unk>unknown<unk>",
    "  leading spaces", "trailing spaces  ", "\tTabbed\ttext\t", "multiple   internal   spaces",
    "line one\nline two\n\nline four", "\n\nstarts with newlines", "ends with newlines\n\n",
    "12345678901234567890", "0.000001", "-1", "+1", "1e10", "你好<image>世界", "😀<image>😀", "<image>😀",
    "<image>你好", "The answer is 42.<pad>", "USER: <image>\n请用中文描述这张图片。 ASSISTANT:",
]


def build_corpus(n_random=420, seed=1234):
    rng = random.Random(seed)
    corpus = list(HANDWRITTEN) + list(FRAGMENTS)
    corpus += [f + s for f in FRAGMENTS[:40] for s in ("<image>", "<pad>")]
    for _ in range(n_random):
        parts = []
        for _ in range(rng.randint(1, 6)):
            r = rng.random()
            if r < 0.2:
                parts.append(rng.choice(SPECIALS[:2]) if rng.random() < 0.8 else rng.choice(SPECIALS))
            elif r < 0.3:
                parts.append(rng.choice([" ", "  ", "\n", " \n", "\t", "   "]))
            else:
                parts.append(rng.choice(FRAGMENTS))
        joiner = rng.choice(["", " ", "\n"])
        corpus.append(joiner.join(parts))
    seen, out = set(), []
    for text in corpus:
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


CORPUS = build_corpus()


@pytest.fixture(scope="module")
def hf_tok():
    """The reference: transformers' LlamaTokenizer on the fixture tokenizer.model, which gives llava-hf's ids."""
    from make_tiny_llava import make_hf_tokenizer
    tok = make_hf_tokenizer(TOKENIZER_MODEL)
    ids = tok("USER: <image>\nDescribe the image. ASSISTANT:")["input_ids"]
    assert ids == [1, 3148, 1001, 29901, 29871, 32000, 29871, 13, 4002, 29581, 278, 1967, 29889,
                   319, 1799, 9047, 13566, 29901]
    assert tok.convert_ids_to_tokens([0, 1, 2, 29871, 32001]) == ["<unk>", "<s>", "</s>", "\u2581", "<pad>"]
    return tok


@pytest.fixture(scope="module")
def tok():
    return LlavaTokenizer(vocab_file=TOKENIZER_MODEL, add_bos_token=True, add_eos_token=False)


def test_corpus_is_broad():
    assert len(CORPUS) >= 500
    assert sum("<image>" in t for t in CORPUS) >= 100
    assert sum(t.count("<image>") > 1 for t in CORPUS) >= 10
    assert sum("<pad>" in t for t in CORPUS) >= 50
    assert any(t.startswith(" ") for t in CORPUS) and any(t.endswith(" ") for t in CORPUS)


def test_ids_equal_hf_on_corpus(tok, hf_tok):
    bad = []
    for text in CORPUS:
        ours, theirs = tok(text)["input_ids"], hf_tok(text)["input_ids"]
        if ours != theirs:
            bad.append((text, ours, theirs))
        assert tok.encode(text) == ours
        assert tok.tokenize(text) == hf_tok.tokenize(text), text
    assert not bad, f"{len(bad)} of {len(CORPUS)} differ, first: {bad[:3]}"


def test_decode_equals_hf_on_corpus(tok, hf_tok):
    for text in CORPUS:
        ids = hf_tok(text)["input_ids"]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), \
                (text, skip)
        # generated-token-like slices: any window (decode is what the streamer relies on)
        for start in (1, 2, len(ids) // 2):
            part = ids[start:]
            if part:
                assert tok.decode(part, skip_special_tokens=True) == hf_tok.decode(part, skip_special_tokens=True)


def test_decode_round_trips(tok):
    # SentencePiece maps "\u2581" to a space and the dummy prefix eats one leading space: everything else
    # without special tokens comes back unchanged.
    plain = [t for t in CORPUS if not any(s in t for s in SPECIALS) and t and not t[0].isspace()
             and "\u2581" not in t]
    assert len(plain) >= 100
    for text in plain:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text, text
    # and the ids of decoded text encode back to the same ids (what a reply fed back in a chat relies on)
    for text in plain[:200]:
        ids = tok.encode(text)
        assert tok.encode(tok.decode(ids, skip_special_tokens=True)) == ids, text


def test_llava_hf_reference_ids(tok):
    ids = tok("USER: <image>\nDescribe the image. ASSISTANT:")["input_ids"]
    assert ids == [1, 3148, 1001, 29901, 29871, 32000, 29871, 13, 4002, 29581, 278, 1967, 29889,
                   319, 1799, 9047, 13566, 29901]
    assert tok.encode("<image>\n", add_special_tokens=False) == [32000, 29871, 13]


def test_special_ids_and_conversions(tok, hf_tok):
    assert tok.image_token_id == 32000 and tok.pad_token_id == 32001
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert len(tok) == len(hf_tok) == 32002 and tok.vocab_size == hf_tok.vocab_size == 32000
    assert tok.convert_tokens_to_ids(["<image>", "<pad>", "\u2581the", "<0x0A>"]) == \
        hf_tok.convert_tokens_to_ids(["<image>", "<pad>", "\u2581the", "<0x0A>"])
    ids = [0, 1, 2, 29871, 13, 32000, 32001, 450]
    assert tok.convert_ids_to_tokens(ids) == hf_tok.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == \
        hf_tok.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert sorted(tok.all_special_ids) == sorted(hf_tok.all_special_ids)
    assert tok.get_vocab() == hf_tok.get_vocab()


def test_add_eos_and_no_special_tokens():
    tok = LlavaTokenizer(vocab_file=TOKENIZER_MODEL, add_bos_token=False, add_eos_token=True)
    assert tok.encode("hi") == [7251, 2]
    assert tok.encode("hi", add_special_tokens=False) == [7251]


def test_batch_call_left_pads(tok):
    out = tok(["hi", "USER: <image>\nhi"], padding=True, return_tensors="np")
    assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (2, 9)
    assert out["input_ids"][0].tolist() == [32001] * 7 + [1, 7251]
    assert out["attention_mask"][0].tolist() == [0] * 7 + [1, 1]
    assert out["attention_mask"][1].tolist() == [1] * 9


def test_decode_accepts_numpy_and_batches(tok):
    ids = np.array([[1, 7251, 2, 32001]], dtype=np.int64)
    assert tok.batch_decode(ids, skip_special_tokens=True) == ["hi"]
    assert tok.decode(ids[0], skip_special_tokens=True) == "hi"


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text", "unset"])
def test_bad_vocab_file_names_the_file(tmp_path, kind):
    path = tmp_path / "tokenizer.model"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a sentencepiece model\n" * 10)
    arg = None if kind == "unset" else str(path)
    with pytest.raises(LlavaError) as err:
        LlavaTokenizer(vocab_file=arg)
    msg = str(err.value)
    assert "\n" not in msg
    assert (str(path) in msg) if kind != "unset" else ("vocab_file" in msg)


def test_registered_and_built_from_yaml_mapping():
    from mindformers.models.build_tokenizer import build_tokenizer
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "LlavaTokenizer") is LlavaTokenizer
    tok = build_tokenizer({"type": "LlavaTokenizer", "vocab_file": TOKENIZER_MODEL,
                           "add_bos_token": True, "add_eos_token": False})
    assert isinstance(tok, LlavaTokenizer)
    assert tok("USER: <image>\nhi")["input_ids"][-4:] == [32000, 29871, 13, 2918]
    assert os.path.samefile(tok.vocab_file, TOKENIZER_MODEL)


def test_built_with_auto_register_from_register_path(tmp_path, monkeypatch):
    """The yaml's `auto_register: llava_tokenizer.LlavaTokenizer` path (REGISTER_PATH = research/llava).

    MindFormers 1.9.0 copies the file into OM_MODULES_CACHE and imports the copy as
    `openmind_modules.llava.llava_tokenizer`, re-registering the name: the class it builds is NOT
    `llava_tokenizer.LlavaTokenizer`. The registry entry is restored afterwards."""
    import sys
    from helpers import PLUGIN
    from mindformers.models.build_tokenizer import build_tokenizer
    from mindformers.tools.hub.hub import HubConstants
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    registry = MindFormerRegister.registry[MindFormerModuleType.TOKENIZER]
    before = registry["LlavaTokenizer"]
    modules_before = set(sys.modules)
    monkeypatch.setenv("REGISTER_PATH", PLUGIN)
    monkeypatch.setattr(HubConstants, "OM_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.chdir(tmp_path)
    try:
        tok = build_tokenizer({"type": "LlavaTokenizer", "auto_register": "llava_tokenizer.LlavaTokenizer",
                               "vocab_file": TOKENIZER_MODEL, "add_bos_token": True, "add_eos_token": False})
        assert type(tok).__name__ == "LlavaTokenizer"
        assert tok("USER: <image>\nhi")["input_ids"][-4:] == [32000, 29871, 13, 2918]
        with pytest.raises(LlavaError):  # errors still raise the one shared LlavaError class
            tok.decode([10 ** 6])
    finally:
        registry["LlavaTokenizer"] = before
        for name in set(sys.modules) - modules_before:
            if name.startswith(("openmind_modules", "modules")):
                del sys.modules[name]


def test_ids_past_the_tokenizer_have_no_text(tok):
    """llava-hf's lm_head has 32064 rows for 32002 tokens; ids 32002..32063 decode to nothing when skipping
    special tokens (transformers raises IndexError there), and are an error otherwise."""
    assert tok.decode([450, 32050, 6635, 32063], skip_special_tokens=True) == tok.decode([450, 6635])
    with pytest.raises(LlavaError, match="32050"):
        tok.decode([450, 32050])
    with pytest.raises(LlavaError, match="-1"):
        tok.decode([450, -1], skip_special_tokens=True)
