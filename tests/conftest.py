"""Shared fixtures: the Hugging Face oracle checkpoints (built once, cached) and the bundled test data.

Plugin modules are imported the way MindFormers' `--register_path research/llava` imports them (top-level
`llava_config`, `llava_model`, ...), so each class is registered once per process.
"""
import hashlib
import os

import pytest

# helpers puts the plugin, the fixtures and tests/ on sys.path
from helpers import FIXTURES, IMAGES, PLUGIN, ROOT, TOKENIZER_MODEL  # noqa: F401 (PLUGIN: for the tests)

CACHE = os.environ.get("LLAVA_FIXTURE_CACHE", os.path.join(ROOT, ".cache", "fixtures"))


def _builder_digest():
    h = hashlib.sha256()
    for name in ("make_tiny_llava.py", "tokenizer.model"):
        with open(os.path.join(FIXTURES, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def hf_checkpoint(preset, shard_mb=None, seed=0):
    """Path of the HF-layout checkpoint for `preset`, built on first use and cached by builder digest."""
    import make_tiny_llava
    name = f"{preset}-s{seed}" + (f"-shard{shard_mb}" if shard_mb else "") + f"-{_builder_digest()}"
    out = os.path.join(CACHE, name)
    if not os.path.exists(os.path.join(out, "config.json")):
        os.makedirs(CACHE, exist_ok=True)
        make_tiny_llava.make_checkpoint(preset, out, seed=seed, shard_mb=shard_mb)
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir():
    return hf_checkpoint("tiny")


@pytest.fixture(scope="session")
def tiny_gqa_hf_dir():
    return hf_checkpoint("tiny_gqa")


@pytest.fixture(scope="session")
def mid_hf_dir():
    """The ~175M-parameter preset, sharded like the real 7B repository."""
    return hf_checkpoint("mid", shard_mb=200)


@pytest.fixture(scope="session")
def tokenizer_model():
    return TOKENIZER_MODEL


@pytest.fixture(scope="session")
def image_paths():
    return {os.path.splitext(n)[0]: os.path.join(IMAGES, n) for n in sorted(os.listdir(IMAGES))}


@pytest.fixture(scope="session")
def real_7b_keys():
    import json
    with open(os.path.join(FIXTURES, "llava_1_5_7b_keys.json")) as f:
        return json.load(f)["keys"]
