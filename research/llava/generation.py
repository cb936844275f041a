"""Token selection for generate(): generation settings, logits processing, sampling, stop rules, streaming.

Runs on the host on the last-position logits of each step (float32 numpy [batch, vocab]); the model's
prefill/decode steps stay on the device. Semantics mirror Hugging Face's `generate` so that the oracle
comparison is exact:

* processing order (HF `_get_logits_processor`): repetition penalty (always, when != 1.0); then, only when
  sampling, temperature (!= 1.0), top-k (> 0), top-p (< 1.0); min_tokens_to_keep = 1, filtered logits = -inf.
  Greedy decoding ignores temperature / top-k / top-p, as HF does.
* `sequences` given to the selector are every row's ids so far, exactly what HF calls `input_ids`: the
  left padding, the expanded image tokens, the prompt and the tokens generated so far (the repetition penalty
  applies to all of them, as in HF).
* sampling draws from a numpy Generator seeded with `seed` (same seed -> same tokens; the draws are not
  torch's, so sampled tokens are reproducible here but not equal to HF's).
* stop rule (`TokenSelector.step`): a row that produced an eos id is finished; finished rows get pad_token_id.

Note on defaults: top_k=0 means "no top-k" here (MindFormers' yaml default); HF's GenerationConfig default is
top_k=50, so an HF sampling comparison must pass top_k explicitly.
"""
import sys
from dataclasses import dataclass, field, fields
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from llava_errors import LlavaError

FILTER_VALUE = -np.inf
_F32 = np.finfo(np.float32)


def _check_float32(name: str, value):
    """Sampling computes in float32: a setting that float32 rounds to 0 or a subnormal (1e-320) or to inf
    (1e39) would silently act as another value (temperature 0: every logit infinite, every pick the last id)."""
    with np.errstate(over="ignore", under="ignore"):
        as32 = np.float32(value)
    if not np.isfinite(as32):
        raise LlavaError(f"{name}={value!r} is infinite in float32, the dtype sampling computes in: give at most "
                         f"{float(_F32.max):.3g}")
    if abs(as32) < _F32.tiny:
        what = "0" if as32 == 0 else f"{float(as32):g}, a subnormal number,"
        raise LlavaError(f"{name}={value!r} is {what} in float32, the dtype sampling computes in: give at least "
                         f"{float(_F32.tiny):.3g}")


# OpenAI's bound on top_logprobs
MAX_TOP_LOGPROBS = 20


def token_logprobs(logits, token, top):
    """(token, its log-probability, [(id, log-probability)] of the `top` most likely ids) under the model's own
    distribution at this step: log-softmax of the raw logits [V] in float64, before temperature, top-k/top-p
    or a repetition penalty reshape it (what OpenAI-compatible servers report)."""
    x = np.asarray(logits, np.float64).reshape(-1)
    m = x.max()
    lp = x - (m + np.log(np.exp(x - m).sum()))
    best = np.argsort(-lp, kind="stable")[:top] if top else []
    return int(token), float(lp[token]), [(int(t), float(lp[t])) for t in best]


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    eos_token_id: List[int] = field(default_factory=lambda: [2])
    pad_token_id: int = 32001

    @classmethod
    def from_config(cls, config, **overrides):
        """Defaults from a LlavaConfig (yaml), then explicit overrides (command line); None means unset.

        `max_decode_length` is accepted as an override alias of `max_new_tokens` (MindFormers' flag name);
        `max_new_tokens` wins when both are given."""
        text = config.text_config
        values = dict(
            max_new_tokens=config.max_new_tokens or config.max_decode_length,
            do_sample=config.do_sample, temperature=config.temperature, top_k=config.top_k,
            top_p=config.top_p, repetition_penalty=config.repetition_penalty, seed=config.seed,
            eos_token_id=[text.eos_token_id], pad_token_id=text.pad_token_id)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        alias = overrides.pop("max_decode_length", None)
        if alias is not None and "max_new_tokens" not in overrides:
            overrides["max_new_tokens"] = alias
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise LlavaError(f"generation: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values.update(overrides)
        if isinstance(values["eos_token_id"], (int, np.integer)):
            values["eos_token_id"] = [int(values["eos_token_id"])]
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self):
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise LlavaError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, bool):
            raise LlavaError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not is_num(self.temperature) or not self.temperature > 0 or not np.isfinite(self.temperature):
            raise LlavaError(f"temperature must be positive, got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise LlavaError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise LlavaError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_num(self.repetition_penalty) or not self.repetition_penalty > 0 \
                or not np.isfinite(self.repetition_penalty):
            raise LlavaError(f"repetition_penalty must be positive, got {self.repetition_penalty!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            _check_float32(name, getattr(self, name))
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise LlavaError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.eos_token_id, (list, tuple)) or not all(is_int(e) for e in self.eos_token_id):
            raise LlavaError(f"eos_token_id must be a list of integers, got {self.eos_token_id!r}")
        if not is_int(self.pad_token_id):
            raise LlavaError(f"pad_token_id must be an integer, got {self.pad_token_id!r}")


def check_fits(prompt_lengths: Union[int, Sequence[int]], max_new_tokens: int, seq_length: int,
               image_tokens: Optional[Sequence[int]] = None):
    """LlavaError unless the (padded) prompt length + max_new_tokens fits seq_length (the KV-cache size).

    Image tokens are never truncated, so a prompt that does not fit is an error that names the lengths."""
    lengths = [int(prompt_lengths)] if isinstance(prompt_lengths, (int, np.integer)) else \
        [int(n) for n in prompt_lengths]
    if not lengths:
        raise LlavaError("check_fits: no prompts")
    i = int(np.argmax(lengths))
    longest = lengths[i]
    if longest + max_new_tokens > seq_length:
        images = f" ({image_tokens[i]} of them image tokens)" if image_tokens else ""
        which = f"prompt {i}" if len(lengths) > 1 else "the prompt"
        raise LlavaError(f"{which} is {longest} tokens{images}; + max_new_tokens={max_new_tokens} = "
                         f"{longest + max_new_tokens} > seq_length={seq_length} (shorten the prompt, lower "
                         f"max_new_tokens or raise model_config.seq_length)")


def _softmax32(x: np.ndarray) -> np.ndarray:
    """float32 softmax along the last axis (torch's: exp(x - max) / sum)."""
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def repetition_penalty(logits: np.ndarray, sequences, penalty: float) -> np.ndarray:
    """HF RepetitionPenaltyLogitsProcessor: seen tokens' logits: < 0 -> * penalty, else / penalty."""
    out = logits.copy()
    p = np.float32(penalty)
    vocab = logits.shape[-1]
    for b, seq in enumerate(sequences):
        ids = np.unique(np.asarray(seq, dtype=np.int64).reshape(-1))
        if ids.size == 0:
            continue
        if ids[0] < 0 or ids[-1] >= vocab:
            raise LlavaError(f"sequence {b} has token id(s) outside the vocabulary 0..{vocab - 1}")
        score = out[b, ids]
        out[b, ids] = np.where(score < 0, score * p, score / p)
    return out


def temperature_warp(logits: np.ndarray, temperature: float) -> np.ndarray:
    """HF TemperatureLogitsWarper."""
    return logits / np.float32(temperature)


def top_k_filter(logits: np.ndarray, top_k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """HF TopKLogitsWarper: drop logits below the k-th largest (ties with it are kept)."""
    k = min(max(int(top_k), min_tokens_to_keep), logits.shape[-1])
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, np.float32(FILTER_VALUE), logits).astype(np.float32)


def top_p_filter(logits: np.ndarray, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """HF TopPLogitsWarper: ascending sort, float32 softmax, cumulative sum (accumulated in float64 like
    torch's CPU cumsum), drop while cumulative <= 1 - top_p, always keep the top min_tokens_to_keep."""
    order = np.argsort(logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = _softmax32(sorted_logits)
    cumulative = np.cumsum(probs.astype(np.float64), axis=-1).astype(np.float32)
    remove_sorted = cumulative <= np.float32(1 - top_p)
    remove_sorted[:, -min_tokens_to_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(FILTER_VALUE), logits).astype(np.float32)


class TokenSelector:
    """Picks the next token of every row from that step's logits."""

    def __init__(self, settings: GenerationSettings):
        settings.validate()
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)
        self._eos = np.asarray(list(settings.eos_token_id), dtype=np.int64)

    def process(self, logits: np.ndarray, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """The processed float32 [batch, vocab] scores HF's logits processors would give (see module doc)."""
        s = self.settings
        logits = np.asarray(logits)
        if logits.ndim != 2:
            raise LlavaError(f"logits must be [batch, vocab], got shape {list(logits.shape)}")
        if len(sequences) != logits.shape[0]:
            raise LlavaError(f"{len(sequences)} sequences for {logits.shape[0]} rows of logits")
        scores = logits.astype(np.float32, copy=True)
        if s.repetition_penalty != 1.0:
            scores = repetition_penalty(scores, sequences, s.repetition_penalty)
        if s.do_sample:
            if s.temperature != 1.0:
                scores = temperature_warp(scores, s.temperature)
            if s.top_k:
                scores = top_k_filter(scores, s.top_k)
            if s.top_p < 1.0:
                scores = top_p_filter(scores, s.top_p)
        return scores

    def __call__(self, logits: np.ndarray, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """logits: float32 [batch, vocab]; sequences: every row's ids so far (padding + prompt + generated)."""
        scores = self.process(logits, sequences)
        if not self.settings.do_sample:
            return np.argmax(scores, axis=-1).astype(np.int64)
        probs = np.exp(scores.astype(np.float64) - np.max(scores, axis=-1, keepdims=True))
        cdf = np.cumsum(probs, axis=-1)
        u = self.rng.random(scores.shape[0]) * cdf[:, -1]
        picks = [np.searchsorted(cdf[b], u[b], side="right") for b in range(scores.shape[0])]
        return np.minimum(np.asarray(picks, dtype=np.int64), scores.shape[-1] - 1)

    def step(self, logits: np.ndarray, sequences: Sequence[Sequence[int]],
             unfinished: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """One HF decode step: tokens (pad for rows already finished) and the updated `unfinished` mask."""
        unfinished = np.asarray(unfinished, dtype=bool)
        tokens = self(logits, sequences)
        tokens = np.where(unfinished, tokens, np.int64(self.settings.pad_token_id))
        return tokens, unfinished & ~np.isin(tokens, self._eos)


class TextStreamer:
    """Prints generated text as tokens arrive: `put(tokens)` once per step, `end()` after the last one.

    `put` takes that step's new token of every row: shape [batch] or [batch, 1] (an int for batch 1); only
    generated tokens, never the prompt. Batch size 1: the text is printed incrementally, decoding the whole
    generated list with special tokens skipped and printing the new suffix, holding back a trailing
    incomplete UTF-8 sequence ('\\ufffd'), so what is printed is exactly `tokenizer.decode(all_ids)`; `end()`
    prints the rest and a newline. Batch size > 1: nothing is printed until `end()`, which prints one line
    per row, `[i] text` (newlines inside a text are printed as is). `texts` holds the final texts after end().
    """

    def __init__(self, tokenizer, stream=None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stream = stream if stream is not None else sys.stdout
        self.skip_special_tokens = skip_special_tokens
        self.texts: List[str] = []
        self._reset()

    def _reset(self):
        self._rows: Optional[List[List[int]]] = None
        self._printed = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token_ids):
        arr = np.asarray(token_ids)
        if arr.ndim == 0:
            arr = arr.reshape(1, 1)
        elif arr.ndim == 1:
            arr = arr[:, None]
        elif arr.ndim != 2:
            raise LlavaError(f"TextStreamer.put: expected [batch] or [batch, n] token ids, got {list(arr.shape)}")
        if self._rows is None:
            self._rows = [[] for _ in range(arr.shape[0])]
        if arr.shape[0] != len(self._rows):
            raise LlavaError(f"TextStreamer.put: got {arr.shape[0]} rows after {len(self._rows)}")
        for row, new in zip(self._rows, arr.tolist()):
            row.extend(int(t) for t in new)
        if len(self._rows) == 1:
            text = self._decode(self._rows[0]).rstrip("\ufffd")
            self._write_suffix(text)

    def _write_suffix(self, text: str):
        if text.startswith(self._printed):
            new = text[len(self._printed):]
        else:  # decoding is prefix-stable for SentencePiece; never re-print what is already out
            common = 0
            for a, b in zip(text, self._printed):
                if a != b:
                    break
                common += 1
            new = text[max(common, len(self._printed)):]
        if new:
            self.stream.write(new)
            self.stream.flush()
            self._printed += new

    def end(self):
        rows = self._rows or []
        self.texts = [self._decode(r) for r in rows]
        if len(rows) == 1:
            self._write_suffix(self.texts[0])
            self.stream.write("\n")
        else:
            for i, text in enumerate(self.texts):
                self.stream.write(f"[{i}] {text}\n")
        self.stream.flush()
        self._reset()


class TextDeltas:
    """One row's generated text as it grows, for streaming: `add(token)` returns the new text that is safe to
    show. Held back: a trailing incomplete UTF-8 sequence ('\\ufffd') and a tail that could be the start of a
    stop string. Once a stop string appears, `stopped` is set and the text ends just before it. `text` is
    everything shown so far; after the last token, `finish()` returns whatever was held back (never the stop
    string)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: List[int] = []
        self.text = ""
        self.stopped = False

    def _full(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return text[:min(hits)]
        return text

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        return max([n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[-n:])] or [0])

    def _emit(self, text: str) -> str:
        # decoding is prefix-stable for SentencePiece; never take back what is already shown
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += new
        return new

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self._full()
        if self.stopped:
            return self._emit(text)
        text = text.rstrip("\ufffd")
        return self._emit(text[:len(text) - self._held(text)])

    def finish(self) -> str:
        return self._emit(self._full())
