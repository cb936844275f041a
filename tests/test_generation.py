"""generation.py against transformers' logits processors (transformers.generation.logits_process) and by hand."""
import io

import numpy as np
import pytest

from helpers import TOKENIZER_MODEL
from generation import GenerationSettings, TextStreamer, TokenSelector, check_fits
from llava_config import LlavaConfig
from llava_errors import LlavaError
from llava_tokenizer import LlavaTokenizer

VOCAB = 32064


def _logits(batch=3, vocab=VOCAB, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, vocab)) * scale).astype(np.float32)
    x[:, :50] = -np.abs(x[:, :50])  # some negative logits among the penalised ids too
    return x


def _sequences(batch=3, seed=1):
    rng = np.random.default_rng(seed)
    seqs = []
    for b in range(batch):
        n = 20 + 7 * b
        seq = [32001] * b + [1] + [32000] * 5 + rng.integers(0, 100, size=n).tolist()  # pad, image, repeats
        seqs.append(seq)
    width = max(len(s) for s in seqs)
    return [[32001] * (width - len(s)) + s for s in seqs]  # HF input_ids are rectangular (left padded)


def _hf_process(settings, logits, sequences):
    """HF's generate processing for the same settings, built from its own processor classes and order."""
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    procs = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=float(settings.repetition_penalty)))
    if settings.do_sample:
        if settings.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(settings.temperature)))
        if settings.top_k:
            procs.append(TopKLogitsWarper(top_k=settings.top_k, min_tokens_to_keep=1))
        if settings.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=float(settings.top_p), min_tokens_to_keep=1))
    out = procs(torch.tensor(sequences, dtype=torch.long), torch.tensor(logits))
    return out.numpy()


def _assert_same_scores(ours, theirs):
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.array_equal(np.isneginf(ours), np.isneginf(theirs)), \
        f"{int((np.isneginf(ours) != np.isneginf(theirs)).sum())} filtered positions differ"
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=0)


CASES = [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),
    dict(do_sample=True, temperature=0.7),
    dict(do_sample=True, temperature=1.9),
    dict(do_sample=True, top_k=1),
    dict(do_sample=True, top_k=50),
    dict(do_sample=True, top_k=VOCAB + 10),
    dict(do_sample=True, top_p=0.9),
    dict(do_sample=True, top_p=0.5),
    dict(do_sample=True, top_p=0.01),
    dict(do_sample=True, repetition_penalty=1.2, temperature=0.8, top_k=40, top_p=0.9),
    dict(do_sample=True, repetition_penalty=1.1, temperature=1.3, top_k=400, top_p=0.7),
    dict(do_sample=False, repetition_penalty=1.5, temperature=0.5, top_k=3, top_p=0.5),  # greedy: warpers off
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("seed", [0, 1])
def test_processed_logits_match_hf(kw, seed):
    settings = GenerationSettings(**kw)
    logits, sequences = _logits(seed=seed), _sequences()
    ours = TokenSelector(settings).process(logits, sequences)
    _assert_same_scores(ours, _hf_process(settings, logits, sequences))


def test_processing_does_not_modify_its_input():
    logits, sequences = _logits(), _sequences()
    before = logits.copy()
    TokenSelector(GenerationSettings(do_sample=True, repetition_penalty=1.2, top_k=5, top_p=0.5)).process(
        logits, sequences)
    assert np.array_equal(logits, before)


def test_repetition_penalty_by_hand():
    logits = np.array([[2.0, -2.0, 1.0, -1.0, 0.5]], dtype=np.float32)
    out = TokenSelector(GenerationSettings(repetition_penalty=2.0)).process(logits, [[0, 1, 1, 4]])
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.25]]


def test_top_k_and_top_p_by_hand():
    logits = np.log(np.array([[0.1, 0.4, 0.2, 0.3]], dtype=np.float32))
    k2 = TokenSelector(GenerationSettings(do_sample=True, top_k=2)).process(logits, [[0]])
    assert np.isneginf(k2).tolist() == [[True, False, True, False]]
    p = TokenSelector(GenerationSettings(do_sample=True, top_p=0.6)).process(logits, [[0]])
    # ascending 0.1, 0.2, 0.3, 0.4: cumulative 0.1, 0.3, 0.6, 1.0; drop while <= 0.4 -> keep 0.3 and 0.4
    assert np.isneginf(p).tolist() == [[True, False, True, False]]
    tiny = TokenSelector(GenerationSettings(do_sample=True, top_p=1e-9)).process(logits, [[0]])
    assert np.isfinite(tiny).sum() == 1 and np.isfinite(tiny[0, 1])  # min_tokens_to_keep = 1


def test_greedy_is_argmax():
    logits, sequences = _logits(batch=4), _sequences(batch=4)
    tokens = TokenSelector(GenerationSettings())(logits, sequences)
    assert tokens.dtype == np.int64 and tokens.tolist() == np.argmax(logits, axis=-1).tolist()
    # greedy ignores the sampling warpers, as HF does
    settings = GenerationSettings(do_sample=False, temperature=0.1, top_k=2, top_p=0.1)
    assert TokenSelector(settings)(logits, sequences).tolist() == np.argmax(logits, axis=-1).tolist()


def test_greedy_with_repetition_penalty_is_argmax_of_penalised_hf_scores():
    logits, sequences = _logits(), _sequences()
    for seq in sequences:
        seq.append(5)  # token 5 was generated before: the penalty demotes it below token 200
    logits[:, 5], logits[:, 200] = 60.0, 50.0
    settings = GenerationSettings(repetition_penalty=1.3)
    hf = _hf_process(settings, logits, sequences)
    tokens = TokenSelector(settings)(logits, sequences)
    assert tokens.tolist() == np.argmax(hf, axis=-1).tolist() == [200, 200, 200]
    assert np.argmax(logits, axis=-1).tolist() == [5, 5, 5]


def test_top_k_1_sampling_equals_greedy():
    for seed in range(5):
        logits, sequences = _logits(batch=4, seed=seed), _sequences(batch=4)
        greedy = TokenSelector(GenerationSettings())(logits, sequences)
        sampled = TokenSelector(GenerationSettings(do_sample=True, top_k=1, temperature=1.7, seed=seed))(
            logits, sequences)
        assert sampled.tolist() == greedy.tolist()


def _sample_run(seed, steps=30, **kw):
    selector = TokenSelector(GenerationSettings(do_sample=True, seed=seed, **kw))
    logits, sequences = _logits(batch=2, scale=1.0), _sequences(batch=2)
    return [selector(logits, sequences).tolist() for _ in range(steps)]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    a, b = _sample_run(1234), _sample_run(1234)
    assert a == b
    assert _sample_run(1234, top_p=0.9, top_k=100) == _sample_run(1234, top_p=0.9, top_k=100)
    assert _sample_run(1234) != _sample_run(4321)
    assert len({t for step in a for t in step}) > 10  # really sampling, not argmax


def test_sampling_only_draws_kept_tokens_with_the_right_frequencies():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    selector = TokenSelector(GenerationSettings(do_sample=True, top_k=3, seed=0))
    counts = np.bincount([int(selector(logits, [[0]])[0]) for _ in range(4000)], minlength=4)
    assert counts[3] == 0  # filtered by top_k
    freq = counts[:3] / counts.sum()
    np.testing.assert_allclose(freq, np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.03)


def test_step_finishes_rows_on_eos_and_pads_finished_rows():
    selector = TokenSelector(GenerationSettings(eos_token_id=[2, 7], pad_token_id=32001))
    logits = np.zeros((3, 10), dtype=np.float32)
    logits[0, 2] = logits[1, 4] = logits[2, 7] = 1.0
    tokens, unfinished = selector.step(logits, [[1], [1], [1]], np.array([True, True, False]))
    assert tokens.tolist() == [2, 4, 32001]
    assert unfinished.tolist() == [False, True, False]


def test_settings_from_config_and_overrides():
    cfg = LlavaConfig(max_decode_length=100, top_k=5, top_p=0.8, seed=3)
    s = GenerationSettings.from_config(cfg)
    assert (s.max_new_tokens, s.top_k, s.top_p, s.seed, s.eos_token_id, s.pad_token_id) == \
        (100, 5, 0.8, 3, [2], 32001)
    s = GenerationSettings.from_config(cfg, max_new_tokens=7, do_sample=True, temperature=None, eos_token_id=9)
    assert (s.max_new_tokens, s.do_sample, s.temperature, s.eos_token_id) == (7, True, 1.0, [9])
    assert GenerationSettings.from_config(cfg, max_decode_length=12).max_new_tokens == 12
    assert GenerationSettings.from_config(LlavaConfig(max_new_tokens=20, max_decode_length=100)).max_new_tokens == 20


@pytest.mark.parametrize("kw,problem", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(seed=-1), "seed"),
    (dict(do_sample="yes"), "do_sample"), (dict(top_k=2.5), "top_k"), (dict(bogus=1), "unknown setting"),
])
def test_bad_settings_are_llava_errors(kw, problem):
    with pytest.raises(LlavaError, match=problem):
        GenerationSettings.from_config(LlavaConfig(), **kw)


def test_bad_logits_shapes():
    selector = TokenSelector(GenerationSettings())
    with pytest.raises(LlavaError, match="logits must be"):
        selector(np.zeros(10, np.float32), [[1]])
    with pytest.raises(LlavaError, match="2 sequences for 1 rows"):
        selector(np.zeros((1, 10), np.float32), [[1], [2]])
    with pytest.raises(LlavaError, match="outside the vocabulary"):
        TokenSelector(GenerationSettings(repetition_penalty=1.1))(np.zeros((1, 10), np.float32), [[12]])


def test_check_fits():
    check_fits([10, 50], 50, 100)
    check_fits(50, 50, 100)
    with pytest.raises(LlavaError, match=r"prompt 1 is 51 tokens \(40 of them image tokens\); "
                                         r"\+ max_new_tokens=50 = 101 > seq_length=100"):
        check_fits([10, 51], 50, 100, image_tokens=[0, 40])


# ---------------------------------------------------------------------------------------------- streamer
@pytest.fixture(scope="module")
def tok():
    return LlavaTokenizer(vocab_file=TOKENIZER_MODEL)


STREAM_TEXTS = [
    "The cat is sitting on a laptop.\nIt looks  relaxed.",
    "这是一只猫，坐在电脑上。😀 Emoji 🐱‍👤 too",
    " leading space and trailing space ",
    "naïve café — “quotes” ∑∫√",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streamer_prints_exactly_the_decoded_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False) + [2]  # generated tokens end with EOS
    out = io.StringIO()
    streamer = TextStreamer(tok, stream=out)
    seen = []
    for t in ids:
        streamer.put(np.array([t], dtype=np.int64))
        seen.append(out.getvalue())
        assert "\ufffd" not in out.getvalue()  # incomplete UTF-8 bytes are held back
    streamer.end()
    expected = tok.decode(ids, skip_special_tokens=True)
    assert out.getvalue() == expected + "\n"
    assert streamer.texts == [expected]
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # only ever appends
    # multi-byte characters arrive through byte-fallback pieces, so some steps print nothing
    if any(ord(c) > 0xFFFF or "\u4e00" <= c <= "\u9fff" for c in text):
        assert any(a == b for a, b in zip(seen, seen[1:]))


def test_streamer_accepts_column_and_scalar_shapes_and_resets(tok):
    out = io.StringIO()
    streamer = TextStreamer(tok, stream=out)
    for t in tok.encode("Hello there", add_special_tokens=False):
        streamer.put(np.array([[t]]))
    streamer.end()
    for t in tok.encode("Again", add_special_tokens=False):
        streamer.put(t)
    streamer.end()
    assert out.getvalue() == "Hello there\nAgain\n"


def test_streamer_batch_prints_rows_at_end(tok):
    out = io.StringIO()
    streamer = TextStreamer(tok, stream=out)
    a = tok.encode("First answer.", add_special_tokens=False) + [2]
    b = tok.encode("Second, longer answer here.", add_special_tokens=False) + [2]
    a += [32001] * (len(b) - len(a))  # finished rows are padded
    for x, y in zip(a, b):
        streamer.put(np.array([x, y]))
        assert out.getvalue() == ""
    streamer.end()
    assert out.getvalue() == "[0] First answer.\n[1] Second, longer answer here.\n"
    with pytest.raises(LlavaError, match="rows"):
        streamer.put(np.array([1, 2]))
        streamer.put(np.array([1, 2, 3]))
