"""LlavaTokenizer: the LLaMA-2 SentencePiece vocabulary plus llava-hf's two added tokens, on `sentencepiece` alone.

Ids and decoded text are identical to transformers' slow `LlamaTokenizer` as llava-hf/llava-1.5-7b-hf configures it
(`legacy=True`, BOS added, no EOS, `<image>`=32000 and `<pad>`=32001 added as special tokens). The algorithm is the
same as transformers' (kept literal on purpose, so that the two cannot drift apart):

* encode: split the text on the special tokens (`<s>`, `</s>`, `<unk>`, `<image>`, `<pad>`; leftmost, longest
  match; never split, never stripped), encode every other piece with SentencePiece on its own (so in legacy mode
  each piece gets the dummy-prefix "▁": `<image>\\n` -> 32000, 29871, 13), then prepend BOS.
* decode: drop special ids when asked, decode runs of ordinary pieces with SentencePiece (the leading "▁" of a
  run's first piece is dropped), and join those runs with the added tokens (`<image>`, `<pad>`) by single spaces.

Built by MindFormers from the yaml:
    processor.tokenizer: {type: LlavaTokenizer, auto_register: llava_tokenizer.LlavaTokenizer,
                          vocab_file: /path/tokenizer.model, add_bos_token: True, add_eos_token: False}
"""
import os
import re
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import sentencepiece as spm
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from llava_errors import LlavaError
from mindformers_hooks import PLUGIN_DIR  # noqa: F401  (importing it installs the MindFormers hooks)

SPIECE_UNDERLINE = "\u2581"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class LlavaTokenizer:
    """LLaMA SentencePiece tokenizer with `<image>` and `<pad>` appended after the base vocabulary."""

    # MindFormers' build_tokenizer looks this up when a yaml gives no vocab_file.
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file=None, add_bos_token=True, add_eos_token=False, unk_token="<unk>",
                 bos_token="<s>", eos_token="</s>", pad_token=PAD_TOKEN, image_token=IMAGE_TOKEN,
                 added_tokens: Optional[Sequence[str]] = None, **kwargs):
        # kwargs: other keys a MindFormers/HF tokenizer yaml may carry (legacy, clean_up_tokenization_spaces...).
        legacy = kwargs.pop("legacy", True)
        if legacy is not True:
            raise LlavaError(f"tokenizer: legacy={legacy!r} is not supported (llava-hf uses legacy=True)")
        if kwargs.pop("clean_up_tokenization_spaces", False):
            raise LlavaError("tokenizer: clean_up_tokenization_spaces=True is not supported (llava-hf uses False)")
        for key in ("type", "padding_side", "model_max_length", "sp_model_kwargs", "name_or_path",
                    "tokenizer_class", "use_default_system_prompt", "spaces_between_special_tokens"):
            kwargs.pop(key, None)
        if kwargs:
            raise LlavaError(f"tokenizer: unknown key(s) {', '.join(sorted(kwargs))}")
        self.vocab_file = vocab_file
        self.sp_model = _load_sentencepiece(vocab_file)
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        base = self.sp_model.get_piece_size()
        self.unk_token, self.bos_token, self.eos_token = unk_token, bos_token, eos_token
        self.pad_token, self.image_token = pad_token, image_token
        # Tokens appended after the SentencePiece vocabulary, in id order (llava-hf: <image>=32000, <pad>=32001).
        added = list(added_tokens) if added_tokens is not None else [image_token, pad_token]
        self.added_tokens_encoder: Dict[str, int] = {}
        for token in added:
            in_vocab = self.sp_model.piece_to_id(token)
            if in_vocab != self.sp_model.unk_id() or token == unk_token:
                self.added_tokens_encoder[token] = in_vocab
            else:
                self.added_tokens_encoder[token] = max([base - 1] + list(self.added_tokens_encoder.values())) + 1
        for name, token in (("unk_token", unk_token), ("bos_token", bos_token), ("eos_token", eos_token)):
            token_id = self.sp_model.piece_to_id(token)
            if token_id == self.sp_model.unk_id() and token != unk_token:
                raise LlavaError(f"tokenizer: {name} {token!r} is not in the vocabulary {vocab_file}")
        for name, token in (("pad_token", pad_token), ("image_token", image_token)):
            if token not in self.added_tokens_encoder:
                raise LlavaError(f"tokenizer: {name} {token!r} is not one of the added tokens {added}")
        self.added_tokens_decoder = {v: k for k, v in self.added_tokens_encoder.items()}
        # transformers: every special token (bos/eos/unk from the vocabulary, the added ones) is never split.
        self.all_special_tokens = [bos_token, eos_token, unk_token] + [
            t for t in added if t not in (bos_token, eos_token, unk_token)]
        self.all_special_ids = [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]
        self._special_set = set(self.all_special_tokens)
        self._special_id_set = set(self.all_special_ids)
        # Added tokens beyond the SentencePiece vocabulary are decoded as separate, space-joined pieces.
        self._legacy_added = {t for t, i in self.added_tokens_encoder.items() if i >= base}
        no_split = sorted(set(self.all_special_tokens), key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in no_split) + ")")

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Size of the SentencePiece vocabulary (without the added tokens), as in transformers."""
        return self.sp_model.get_piece_size()

    def __len__(self) -> int:
        return max([self.vocab_size - 1] + list(self.added_tokens_encoder.values())) + 1

    def get_vocab(self) -> Dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    @property
    def bos_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.eos_token)

    @property
    def unk_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.unk_token)

    @property
    def pad_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.pad_token)

    @property
    def image_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.image_token)

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]):
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int:
        if token in self.added_tokens_encoder:
            return self.added_tokens_encoder[token]
        return self.sp_model.piece_to_id(token)

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """With skip_special_tokens, ids past the tokenizer (llava-hf's embedding has 32064 rows for 32002
        tokens; a model can emit 32002..32063) are skipped like special tokens: they have no text.
        (transformers raises IndexError on them.) Without it they are a LlavaError."""
        if isinstance(ids, (int, np.integer)):
            return self._id_to_token(int(ids))
        size = len(self)
        return [self._id_to_token(int(i)) for i in ids
                if not (skip_special_tokens and (int(i) in self._special_id_set or int(i) >= size))]

    def _id_to_token(self, index: int) -> str:
        if index in self.added_tokens_decoder:
            return self.added_tokens_decoder[index]
        if not 0 <= index < self.vocab_size:
            raise LlavaError(f"token id {index} is outside the vocabulary (0..{len(self) - 1})")
        return self.sp_model.id_to_piece(index)

    # ------------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> List[str]:
        """Pieces of `text` (no BOS/EOS); special tokens stay whole."""
        if not isinstance(text, str):
            raise LlavaError(f"tokenizer input must be a string, got {type(text).__name__}")
        pieces = []
        for part in self._split_re.split(text):
            if not part:
                continue
            if part in self._special_set:
                pieces.append(part)
            else:
                pieces.extend(self.sp_model.encode(part, out_type=str))
        return pieces

    def build_inputs_with_special_tokens(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out = out + bos + list(token_ids_1) + eos
        return out

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> List[int]:
        _no_extra(kwargs, "encode")
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def __call__(self, text, add_special_tokens: bool = True, return_tensors: Optional[str] = None,
                 padding=False, **kwargs):
        """`tok(text)["input_ids"]` (a list), or for a list of texts a list of lists; with `padding=True` or
        `"longest"` the rows are LEFT-padded with the pad id (`return_tensors="np"` then gives int32 arrays)."""
        for key in ("max_length", "truncation"):
            if kwargs.pop(key, None) not in (None, False):
                raise LlavaError(f"tokenizer: {key} is not supported; prompts are never truncated")
        _no_extra(kwargs, "__call__")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        masks = [[1] * len(r) for r in rows]
        if padding not in (False, None, "do_not_pad"):
            if padding not in (True, "longest"):
                raise LlavaError(f"tokenizer: padding={padding!r} is not supported (use True or 'longest')")
            width = max(len(r) for r in rows) if rows else 0
            rows = [[self.pad_token_id] * (width - len(r)) + r for r in rows]
            masks = [[0] * (width - len(m)) + m for m in masks]
        if return_tensors is not None:
            if return_tensors != "np":
                raise LlavaError(f"tokenizer: return_tensors={return_tensors!r} is not supported (use 'np')")
            rows, masks = np.asarray(rows, dtype=np.int32), np.asarray(masks, dtype=np.int32)
        if single:
            return {"input_ids": rows[0], "attention_mask": masks[0]}
        return {"input_ids": rows, "attention_mask": masks}

    # ------------------------------------------------------------------ decoding
    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        """transformers' LlamaTokenizer.convert_tokens_to_string (legacy, add_prefix_space=True)."""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        current, out, prev_is_special = [], "", False
        for i, token in enumerate(tokens):
            if token in self._special_set:
                if not prev_is_special and i != 0:
                    out += " "
                out += self.sp_model.decode(current) + token
                prev_is_special = True
                current = []
            else:
                if prev_is_special and i == 1 and not token.startswith(SPIECE_UNDERLINE):
                    out += " "
                current.append(token)
                prev_is_special = False
        return out + self.sp_model.decode(current)

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Text of `token_ids` exactly as transformers' slow tokenizer gives it."""
        spaces = kwargs.pop("spaces_between_special_tokens", True)
        if kwargs.pop("clean_up_tokenization_spaces", None):
            raise LlavaError("decode: clean_up_tokenization_spaces=True is not supported")
        _no_extra(kwargs, "decode")
        if isinstance(token_ids, np.ndarray):
            token_ids = token_ids.reshape(-1).tolist()
        elif isinstance(token_ids, (int, np.integer)):
            token_ids = [int(token_ids)]
        tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        sub_texts, current = [], []
        for token in tokens:
            if skip_special_tokens and token in self._special_set:
                continue
            if token in self._legacy_added:
                if current:
                    string = self.convert_tokens_to_string(current)
                    if string:
                        sub_texts.append(string)
                    current = []
                sub_texts.append(token)
            else:
                current.append(token)
        if current:
            sub_texts.append(self.convert_tokens_to_string(current))
        return (" " if spaces else "").join(sub_texts)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> List[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]


def _no_extra(kwargs, what):
    if kwargs:
        raise LlavaError(f"tokenizer.{what}: unsupported argument(s) {', '.join(sorted(kwargs))}")


def _load_sentencepiece(vocab_file) -> spm.SentencePieceProcessor:
    if not vocab_file or not isinstance(vocab_file, (str, os.PathLike)):
        raise LlavaError(f"tokenizer vocab_file {vocab_file!r}: not set (give the path of tokenizer.model)")
    path = os.fspath(vocab_file)
    if not os.path.exists(path):
        raise LlavaError(f"tokenizer vocab_file {path}: no such file")
    if not os.path.isfile(path):
        raise LlavaError(f"tokenizer vocab_file {path}: not a regular file")
    with open(path, "rb") as f:
        blob = f.read()
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(blob)
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError with a C++ status message
        raise LlavaError(f"tokenizer vocab_file {path}: not a SentencePiece model ({_one_line(exc)})") from None
    if sp.get_piece_size() == 0:
        raise LlavaError(f"tokenizer vocab_file {path}: not a SentencePiece model (empty vocabulary)")
    return sp


def _one_line(exc) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__
