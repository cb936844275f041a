"""[O] Rows and steps change nothing against the Hugging Face oracle (same weights, float32, CPU): each row of
the KV pool has its own positions; prompts run whole or in chunks; rows join a running batch mid-answer and
leave at any step, and every row's greedy tokens equal HF `generate` on its own prompt; a large prompt runs
op by op in a Graph-mode context (Engine.eager) beside compiled steps; every step shape is compiled once.
"""
import os

import numpy as np
import pytest


from helpers import our_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import make_tiny_llava  # noqa: E402  (test fixture builder, needs transformers)
from oracle import HFOracle  # noqa: E402

SEQ_LENGTH = 320
WIDTH = 126                       # the left-padded batch's width
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
        self.hf = HFOracle(hf_dir)
        self.model = our_model(self.hf.config, hf_dir, SEQ_LENGTH)
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
    return {name: pair.model.engine() for name, pair in pairs.items()}


@pytest.mark.parametrize("preset", ("tiny", "tiny_gqa"))
def test_decode_steps_over_a_growing_length_match_hf_logits(preset, mode, pairs, engine):
    """Every decode step attends over one more position (the length is data: one compiled graph for all)."""
    pair, eng = pairs[preset], engine[preset]
    logits = eng.prefill(pair.ids, pair.pixels.numpy(), pair.mask)
    steps = [logits]
    for i in range(1, STEPS):                       # teacher-forced with HF's greedy tokens
        steps.append(eng.decode(pair.tokens[:, i - 1]))
    for i, step in enumerate(steps):
        assert rel_err(step, pair.logits[:, i]) <= REL_TOL, f"step {i}"
    assert [r.length for r in eng.rows] == [int(m.sum()) + STEPS - 1 for m in pair.mask]   # no padding kept


@pytest.mark.parametrize("preset", ("tiny", "tiny_gqa"))
def test_greedy_tokens_of_a_left_padded_batch_equal_hf(preset, mode, pairs, engine):
    pair = pairs[preset]
    out = pair.model.generate(pair.ids, pair.pixels.numpy(), attention_mask=pair.mask, max_new_tokens=STEPS,
                              eos_token_id=[-1])
    assert out == pair.tokens.tolist()


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


def hf_alone(pair, index, steps):
    """HF's greedy tokens for one prompt of the pair on its own (no padding)."""
    ids = pair.ids[index][pair.mask[index].astype(bool)]
    with torch.no_grad():
        out = pair.hf.model.generate(input_ids=torch.tensor(ids[None]), pixel_values=pair.pixels[index:index + 1],
                                     do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                                     pad_token_id=make_tiny_llava.PAD_TOKEN_ID)
    return ids.tolist(), out[0, len(ids):].tolist()


def settings(n):
    from generation import GenerationSettings
    return GenerationSettings(max_new_tokens=n, eos_token_id=[-1])


@pytest.mark.parametrize("preset", ("tiny", "tiny_gqa"))
def test_a_row_joining_mid_answer_and_a_cancelled_neighbour_equal_hf(preset, mode, pairs):
    """Row A answers; after 3 of its tokens row B joins, its prompt in chunks of 16 tokens mixed with A's decode
    steps (serving.plan); row C (A's prompt again) joins beside them and is cancelled after 2 steps. A's and
    B's tokens equal HF generate on each prompt alone; C's first tokens equal A's."""
    from serving import plan
    pair = pairs[preset]
    eng = pair.model.engine()
    (a_ids, a_ref), (b_ids, b_ref) = hf_alone(pair, 0, 24), hf_alone(pair, 1, 12)
    pixels = pair.pixels.numpy()
    eng.reserve(3)
    a = eng.add(a_ids, pixels[0:1], settings(24))
    out = {id(a): []}
    try:
        def run():
            for row, token in eng.step(plan(eng.rows, 16)):
                out.setdefault(id(row), []).append(token)
        while len(a.generated) < 3:
            run()
        b = eng.add(b_ids, pixels[1:2], settings(12))
        c = eng.add(a_ids, pixels[0:1], settings(24))
        chunks = []
        for _ in range(2):
            chunks.append(b.length)
            run()
        eng.release(c)
        while not (a.finished and b.finished):
            chunks.append(b.length)
            run()
        assert chunks[:3] == [0, 16, 32]                  # B's prompt really came in chunks beside A's tokens
        assert out[id(a)] == a_ref and out[id(b)] == b_ref
        assert out.get(id(c), []) == a_ref[:len(out.get(id(c), []))]
    finally:
        eng.release_all()
    assert eng.pool.free == eng.pool.usable               # every block came back


@pytest.mark.parametrize("preset", ("tiny", "tiny_gqa"))
def test_prompt_in_chunks_gives_hf_logits_at_every_position(preset, mode, pairs):
    pair = pairs[preset]
    eng = pair.model.engine()
    ids, _ = hf_alone(pair, 1, 1)
    with torch.no_grad():
        ref = pair.hf.model(input_ids=torch.tensor([ids]), pixel_values=pair.pixels[1:2]).logits[0].numpy()
    row = eng.add(ids, pair.pixels.numpy()[1:2], settings(4), prefix=0)    # every position computed
    try:
        parts = []
        for n in (5, 17, 1, len(ids) - 23):               # chunks that cut through the image's positions
            parts.append(eng.run([(row, n)], all_logits=True)[0])
    finally:
        eng.release(row)
    assert rel_err(np.concatenate(parts), ref) <= REL_TOL


def test_warmup_compiles_every_step_shape_once(graph_mode, pairs):
    """After warmup no step compiles: prompts of any length in chunks, decode rows joining and leaving."""
    from serving import plan
    pair = pairs["tiny"]
    eng = pair.model.engine()
    eng.reserve(4)
    eng.warmup(16 + 4)
    cell = eng.step_cell("rows")
    compiled = len(cell.compile_cache)
    assert compiled == len(eng.bucket_sizes(20)) == 6              # 1, 2, 4, 8, 16, 32 tokens
    ids, _ = hf_alone(pair, 0, 1)
    rows = [eng.add(ids, pair.pixels.numpy()[0:1], settings(5))]
    for i in range(2):
        rows.append(eng.add(pair.hf.ids("Tell me a story" + " again" * (3 * i), n_images=0), None, settings(6 + i)))
        for _ in range(3):
            eng.step(plan(eng.rows, 16))
    while eng.rows:
        eng.step(plan(eng.rows, 16))
        for r in [r for r in eng.rows if r.finished]:
            eng.release(r)
    assert len(cell.compile_cache) == compiled


def test_steps_padded_to_a_larger_bucket_equal_hf(graph_mode, pairs):
    """Engine.bucket_map (filled by warmup's timing) lets a step run padded to a larger compiled bucket: the
    filler tokens change nothing (rows joining mid-answer, chunked prompts, decode), and warmup maps a
    bucket only to a larger one it compiled."""
    from serving import plan
    pair = pairs["tiny"]
    eng = pair.model.engine()
    eng.reserve(3)
    eng.warmup(16 + 3)
    assert all(eng.bucket_map[b] > b and eng.bucket_map[b] in eng.bucket_sizes(19) for b in eng.bucket_map)
    eng.bucket_map = {b: 32 for b in (1, 2, 4, 8, 16)}             # every step padded to 32 tokens
    (a_ids, a_ref), (b_ids, b_ref) = hf_alone(pair, 0, 12), hf_alone(pair, 1, 8)
    pixels = pair.pixels.numpy()
    a = eng.add(a_ids, pixels[0:1], settings(12), prefix=0)
    out = {}
    try:
        while len(a.generated) < 2:
            for row, token in eng.step(plan(eng.rows, 16)):
                out.setdefault(id(row), []).append(token)
        b = eng.add(b_ids, pixels[1:2], settings(8), prefix=0)
        while not (a.finished and b.finished):
            for row, token in eng.step(plan(eng.rows, 16)):
                out.setdefault(id(row), []).append(token)
        assert out[id(a)] == a_ref and out[id(b)] == b_ref
    finally:
        eng.release_all()


def test_without_compile_steps_new_buckets_run_op_by_op_and_equal_hf(graph_mode, pairs):
    """Engine.compile_steps = False (chat): a step whose bucket was never compiled runs op by op instead of
    compiling one (a follow-up turn's new tokens), a compiled bucket stays compiled, and the answers equal HF."""
    pair = pairs["tiny"]
    eng = pair.model.engine()
    eng.reserve(2)
    eng.compile([1])                                               # the decode bucket, as stream() does
    eng.compile_steps = False
    cell = eng.step_cell("rows")
    compiled = len(cell.compile_cache)
    (a_ids, a_ref) = hf_alone(pair, 1, 6)
    out = []
    try:
        row = eng.add(a_ids, pair.pixels.numpy()[1:2], settings(6), prefix=0)
        for n in (5, 17, row.pending - 22):                        # prompt chunks of three new buckets
            out += [t for _, t in eng.step([(row, n)])]
        while not row.finished:
            out += [t for _, t in eng.step([(row, 1)])]
    finally:
        eng.release_all()
    assert out == a_ref
    assert len(cell.compile_cache) == compiled                     # nothing compiled on the way


def test_a_request_that_cannot_fit_the_pool_is_refused_before_it_waits(pairs):
    from llava_errors import LlavaError
    eng = pairs["tiny"].model.engine()
    eng.reserve(2, blocks=1 + 4)                                    # 4 blocks of 16: 64 positions in all
    try:
        eng.check_request(40, settings(24))                         # 64 positions: fits
        with pytest.raises(LlavaError, match="more than the pool's 64"):
            eng.check_request(41, settings(24))
        assert eng.fits(30, settings(2)) and not eng.fits(60, settings(10))
    finally:
        eng.reserve(1)


def test_large_prompt_steps_run_op_by_op_on_cpu(graph_mode, pairs):
    """By default only a vision or prefill step whose estimated activations exceed EAGER_BYTES runs op by
    op (tiny_gqa: hidden 96, MLP 200, 3 decoder layers; vision hidden 48, MLP 96, 4 layers)."""
    import engine as engine_module
    eng = pairs["tiny_gqa"].model.engine()
    for kind, per_token in (("prefill", 4 * (8 * 96 + 3 * 200) * 3), ("vision", 4 * (8 * 48 + 3 * 96) * 4)):
        limit = engine_module.EAGER_BYTES // per_token
        assert not eng.eager_for(kind, limit) and eng.eager_for(kind, limit + 1), kind
