"""[J] How the engine runs a request changes nothing against the Hugging Face oracle (same weights, float32,
CPU): decode steps attend over the cache positions in use rounded up to a bucket (Engine.decode_bucket), the
length a step attends over grows while decoding and crosses from one bucket to the next; a large prompt runs
op by op in a Graph-mode context (Engine.eager), its keys/values then read by compiled decode steps.

A left-padded batch of two prompts is padded to two positions before the end of a 64-position bucket, so
the third decode step is the first of the next bucket (a new compiled decode graph in Graph mode).
"""
import glob
import os

import numpy as np
import pytest


from llava_config import LlavaConfig
from llava_model import LlavaModel, load_weights

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import make_tiny_llava  # noqa: E402  (test fixture builder, needs transformers)
from oracle import HFOracle  # noqa: E402

SEQ_LENGTH = 320
BUCKET = 64
WIDTH = 2 * BUCKET - 2            # prompt width: the first decode step writes position 126, the third 128
STEPS = 10
REL_TOL = 1e-4
PROMPTS = (("chelsea.jpg", "What animal is this?"), ("rocket.jpg", "Where is this?"))


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1.0))


class Pair:
    """HF oracle and our model on one fixture, plus a left-padded two-row batch WIDTH tokens wide."""

    def __init__(self, hf_dir, image_dir):
        from safetensors.numpy import load_file
        self.hf = HFOracle(hf_dir)
        self.model = LlavaModel(LlavaConfig.from_hf_config(self.hf.config, seq_length=SEQ_LENGTH))
        weights = {}
        for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
            weights.update(load_file(path))
        load_weights(self.model, weights)
        rows = [self.hf.ids(prompt) for _, prompt in PROMPTS]
        assert max(map(len, rows)) < WIDTH, "the prompts must leave room for left padding"
        pad = make_tiny_llava.PAD_TOKEN_ID
        self.ids = np.array([[pad] * (WIDTH - len(r)) + r for r in rows], np.int64)
        self.mask = np.array([[0] * (WIDTH - len(r)) + [1] * len(r) for r in rows], np.int64)
        self.pixels = torch.cat([self.hf.pixels(os.path.join(image_dir, name)) for name, _ in PROMPTS])
        with torch.no_grad():
            out = self.hf.model.generate(
                input_ids=torch.tensor(self.ids), attention_mask=torch.tensor(self.mask),
                pixel_values=self.pixels, do_sample=False, max_new_tokens=STEPS, min_new_tokens=STEPS,
                output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
        self.tokens = out.sequences[:, WIDTH:].numpy()                           # [2, STEPS]
        self.logits = np.stack([s.float().numpy() for s in out.logits], 1)       # [2, STEPS, V]


@pytest.fixture(scope="module")
def pairs(tiny_hf_dir, tiny_gqa_hf_dir, image_paths):
    torch.set_num_threads(2)
    image_dir = os.path.dirname(image_paths["chelsea"])
    return {"tiny": Pair(tiny_hf_dir, image_dir), "tiny_gqa": Pair(tiny_gqa_hf_dir, image_dir)}


@pytest.fixture
def engine(pairs):
    """Each pair's engine with exact-length prompts (no prefill padding) and BUCKET-position decode buckets."""
    engines = {}
    for name, pair in pairs.items():
        e = pair.model.engine()
        engines[name] = (e, e.prefill_bucket, e.decode_bucket)
        e.prefill_bucket, e.decode_bucket = 0, BUCKET
    yield {name: e for name, (e, _, _) in engines.items()}
    for e, prefill, decode in engines.values():
        e.prefill_bucket, e.decode_bucket = prefill, decode


@pytest.mark.parametrize("preset", ("tiny", "tiny_gqa"))
def test_decode_across_a_bucket_boundary_matches_hf_logits(preset, mode, pairs, engine):
    pair, eng = pairs[preset], engine[preset]
    logits = eng.prefill(pair.ids, pair.pixels.numpy(), pair.mask)
    assert eng.cache.in_use == WIDTH
    steps, lengths = [logits], []
    for i in range(1, STEPS):                       # teacher-forced with HF's greedy tokens
        steps.append(eng.decode(pair.tokens[:, i - 1]))
        lengths.append(eng.decode_length(eng.cache.in_use))
    assert lengths == [BUCKET * 2] * 2 + [BUCKET * 3] * (STEPS - 3)          # the boundary is crossed
    for i, step in enumerate(steps):
        assert rel_err(step, pair.logits[:, i]) <= REL_TOL, f"step {i}"


@pytest.mark.parametrize("preset", ("tiny", "tiny_gqa"))
def test_greedy_tokens_across_a_bucket_boundary_equal_hf(preset, mode, pairs, engine):
    pair = pairs[preset]
    out = pair.model.generate(pair.ids, pair.pixels.numpy(), attention_mask=pair.mask, max_new_tokens=STEPS,
                              eos_token_id=[-1])
    assert out == pair.tokens.tolist()


def test_buckets_and_the_whole_cache_give_the_same_logits(pairs, engine):
    """decode_bucket=0 attends over all seq_length positions (one graph); bucketed steps equal it."""
    pair, eng = pairs["tiny_gqa"], engine["tiny_gqa"]
    runs = []
    for bucket in (BUCKET, 0):
        eng.decode_bucket = bucket
        eng.prefill(pair.ids, pair.pixels.numpy(), pair.mask)
        runs.append(np.stack([eng.decode(pair.tokens[:, i]) for i in range(4)]))
    assert eng.decode_length(WIDTH + 1) == SEQ_LENGTH
    assert rel_err(runs[0], runs[1]) <= 1e-6


@pytest.mark.parametrize("preset", ("tiny", "tiny_gqa"))
def test_prefill_op_by_op_then_compiled_decode_matches_hf(preset, graph_mode, pairs, engine):
    import mindspore as ms
    pair, eng = pairs[preset], engine[preset]
    eng.eager = True
    try:
        logits = eng.prefill(pair.ids, pair.pixels.numpy(), pair.mask)
        assert ms.get_context("mode") == ms.GRAPH_MODE                   # back to compiled steps
        steps = [logits] + [eng.decode(pair.tokens[:, i - 1]) for i in range(1, STEPS)]
        for i, step in enumerate(steps):
            assert rel_err(step, pair.logits[:, i]) <= REL_TOL, f"step {i}"
    finally:
        eng.eager = None


def test_large_prompt_steps_run_op_by_op_on_cpu(graph_mode, pairs):
    """By default only a vision or prefill step whose estimated activations exceed EAGER_BYTES runs op by
    op (tiny_gqa: hidden 96, MLP 200, 3 decoder layers; vision hidden 48, MLP 96, 4 layers)."""
    import engine as engine_module
    eng = pairs["tiny_gqa"].model.engine()
    for kind, per_token in (("prefill", 4 * (8 * 96 + 3 * 200) * 3), ("vision", 4 * (8 * 48 + 3 * 96) * 4)):
        limit = engine_module.EAGER_BYTES // per_token
        assert not eng.eager_for(kind, limit) and eng.eager_for(kind, limit + 1), kind
