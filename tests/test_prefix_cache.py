"""[P] What was computed is remembered: a row takes the KV blocks of the longest prompt prefix an earlier row
computed (kv_pool's keyed blocks) and the vision features of an image it has seen (image_cache), and its
greedy tokens still equal HF `generate` on the full prompt. A cache hit never crosses images: the key of an
image position is the image's content, not its placeholder token. Expected cached lengths are counted by hand
from the block size (16) and the prompts' lengths.
"""
import os

import numpy as np
import pytest

from helpers import our_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import make_tiny_llava  # noqa: E402
from oracle import HFOracle  # noqa: E402

SEQ_LENGTH = 384
BS = 16


def settings(n):
    from generation import GenerationSettings
    return GenerationSettings(max_new_tokens=n, eos_token_id=[-1])


class Side:
    def __init__(self, hf_dir, image_paths):
        self.hf = HFOracle(hf_dir)
        self.model = our_model(self.hf.config, hf_dir, SEQ_LENGTH)
        self.pix = {name: self.hf.pixels(image_paths[name]) for name in ("chelsea", "rocket")}

    def text(self, text):
        """Ids of a continuation (no BOS), as a client resending the conversation would have them."""
        return self.hf.tokenizer(text, add_special_tokens=False)["input_ids"]

    def hf_greedy(self, ids, images, n):
        pixels = torch.cat([self.pix[i] for i in images]) if images else None
        with torch.no_grad():
            out = self.hf.model.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, do_sample=False,
                                         max_new_tokens=n, min_new_tokens=n,
                                         pad_token_id=make_tiny_llava.PAD_TOKEN_ID)
        return out[0, len(ids):].tolist()

    def ours(self, eng, ids, images, n):
        """(greedy tokens, positions taken from the cache) of one row, whole prompt in one step."""
        pixels = np.concatenate([self.pix[i].numpy() for i in images]) if images else None
        row = eng.add(ids, pixels, settings(n))
        try:
            while not row.finished:
                eng.step([(row, row.pending)])
            return row.generated, row.cached
        finally:
            eng.release(row)


@pytest.fixture(scope="module")
def side(tiny_hf_dir, image_paths):
    torch.set_num_threads(2)
    return Side(tiny_hf_dir, image_paths)


@pytest.fixture
def eng(side):
    """A fresh engine (empty caches) over the module's model."""
    from engine import Engine
    e = Engine(side.model)
    e.reserve(2)
    yield e
    e.release_all()


def cached_after(computed, prompt):
    """Positions a prompt of `prompt` tokens takes when `computed` positions of its prefix are in the pool:
    whole blocks, never the block of its last token."""
    return min(computed // BS, (prompt - 1) // BS) * BS


# --------------------------------------------------------------------------------- the block manager
def test_pool_keeps_released_blocks_by_key_and_evicts_the_least_recent_tail_first():
    from kv_pool import KVPool
    pool = KVPool(8, 4)                               # blocks 1..7
    a = pool.allocate(3)
    assert a == [1, 2, 3] and pool.free == 4
    for b, k in zip(a, (b"k1", b"k2", b"k3")):
        pool.register(b, k)
    pool.release(a)
    assert pool.free == 7 and pool.cached == 3         # kept, and free for anyone
    assert pool.lookup([b"k1", b"k2", b"x", b"k3"]) == [1, 2]
    pool.take([1, 2])
    assert pool.free == 5 and (pool.hits, pool.hit_tokens) == (1, 8)
    pool.release([1, 2])
    # never-used blocks go first (4..7), then the least recently used keyed block: 3, the chain's tail
    got = pool.allocate(5)
    assert got == [4, 5, 6, 7, 3] and pool.evictions == 1
    assert pool.lookup([b"k1", b"k2", b"k3"]) == [1, 2]
    got += pool.allocate(1)
    assert got[-1] == 2 and pool.lookup([b"k1", b"k2"]) == [1]     # the tail before the head
    # a shared block stays until its last holder lets it go
    pool.take([1])
    pool.take([1])
    pool.release([1])
    assert pool.free == 0
    pool.release([1])
    assert pool.free == 1 and pool.lookup([b"k1"]) == [1]


def test_block_keys_name_the_image_behind_each_placeholder():
    from kv_pool import block_keys
    tokens = [1, 5] + [9] * 6                          # two text tokens, six image positions
    img = lambda key: [None, None] + [(key, i) for i in range(6)]
    a, b = block_keys(tokens, img(b"A"), 4), block_keys(tokens, img(b"B"), 4)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]
    assert block_keys(tokens, img(b"A"), 4) == a                      # the same content, the same keys
    shifted = [None, None, None] + [(b"A", i) for i in range(5)]      # the image one position later
    assert block_keys(tokens, shifted, 4)[0] != a[0]
    assert block_keys(tokens[:4] + [7] + tokens[5:], img(b"A"), 4)[0] == a[0]   # a later change: only later blocks
    assert block_keys(tokens, img(b"A"), 4, start=1, parent=a[0]) == a[1:]


# --------------------------------------------------------------------------------- against HF
def test_a_follow_up_turn_computes_only_what_is_new_and_equals_hf(side, eng):
    p1 = side.hf.ids("What animal is this?")
    a1, cached = side.ours(eng, p1, ["chelsea"], 10)
    assert cached == 0 and a1 == side.hf_greedy(p1, ["chelsea"], 10)
    p2 = p1 + a1 + side.text(" USER: Why do you think so? ASSISTANT:")
    a2, cached = side.ours(eng, p2, ["chelsea"], 8)
    # the first turn left its prompt and all but its last answer token in the pool
    assert cached == cached_after(len(p1) + len(a1) - 1, len(p2)) > len(p1) - BS
    assert a2 == side.hf_greedy(p2, ["chelsea"], 8)
    assert eng.image_cache.hits == 1 and eng.image_cache.misses == 1          # CLIP ran once
    # the whole conversation again (a client retrying): all but the last block
    again, cached = side.ours(eng, p2, ["chelsea"], 8)
    assert again == a2 and cached == cached_after(len(p2) + 7, len(p2))


def test_another_image_behind_the_same_placeholders_never_takes_the_first_images_kv(side, eng):
    p = side.hf.ids("What animal is this?")
    first = p.index(make_tiny_llava.IMAGE_TOKEN_INDEX)
    side.ours(eng, p, ["chelsea"], 4)
    tokens, cached = side.ours(eng, p, ["rocket"], 6)
    assert cached == first // BS * BS                  # only whole text blocks before the image
    assert tokens == side.hf_greedy(p, ["rocket"], 6)
    assert eng.image_cache.misses == 2


def test_the_same_image_at_another_place_takes_its_features_not_its_kv(side, eng):
    side.ours(eng, side.hf.ids("What animal is this?"), ["chelsea"], 4)
    ids = side.text("USER: Look at this picture closely, please.\n") + \
        [make_tiny_llava.IMAGE_TOKEN_INDEX] * side.hf.num_image_tokens + side.text("\nWhat is it? ASSISTANT:")
    ids = [side.hf.tokenizer.bos_token_id] + ids
    tokens, cached = side.ours(eng, ids, ["chelsea"], 6)
    assert cached == 0 and eng.image_cache.hits == 1
    assert tokens == side.hf_greedy(ids, ["chelsea"], 6)


def test_several_images_share_a_prefix_only_in_their_order(side, eng):
    p = side.hf.ids("Compare the two pictures.", n_images=2)
    first = p.index(make_tiny_llava.IMAGE_TOKEN_INDEX)
    a, _ = side.ours(eng, p, ["chelsea", "rocket"], 6)
    assert a == side.hf_greedy(p, ["chelsea", "rocket"], 6)
    follow = p + a + side.text(" USER: And the second? ASSISTANT:")
    b, cached = side.ours(eng, follow, ["chelsea", "rocket"], 6)
    assert cached == cached_after(len(p) + len(a) - 1, len(follow))
    assert b == side.hf_greedy(follow, ["chelsea", "rocket"], 6)
    swapped, cached = side.ours(eng, p, ["rocket", "chelsea"], 6)
    assert cached == first // BS * BS
    assert swapped == side.hf_greedy(p, ["rocket", "chelsea"], 6)


def test_a_hit_after_the_tail_of_a_prefix_was_evicted_takes_what_is_left(side):
    from engine import Engine
    from kv_pool import blocks_for
    p = side.hf.ids("What animal is this?")
    n = 4
    row_blocks = blocks_for(len(p) + n)
    eng = Engine(side.model)
    eng.reserve(1, 1 + row_blocks + 2)               # two blocks more than the row takes
    ref = side.hf_greedy(p, ["chelsea"], n)
    assert side.ours(eng, p, ["chelsea"], n) == (ref, 0)
    keyed = (len(p) + n - 1) // BS
    assert eng.pool.cached == keyed
    # a text row of 5 blocks: 2 + (row_blocks - keyed) never-keyed blocks, then the chain's last blocks
    filler = side.hf.ids("Tell me a long story about ships", n_images=0)
    take = blocks_for(len(filler) + 40)
    evicted = take - (2 + row_blocks - keyed)
    assert 0 < evicted < keyed - 1, "the filler must evict part of the chain, not all of it"
    side.ours(eng, filler, [], 40)
    assert eng.pool.evictions == evicted
    tokens, cached = side.ours(eng, p, ["chelsea"], n)
    assert cached == min(keyed - evicted, (len(p) - 1) // BS) * BS and tokens == ref


def test_a_batch_of_questions_about_one_image_computes_the_image_once(side, eng):
    """A predict batch: rows whose prompts share their first blocks run them once (the later rows take them
    from the pool right after the first row's prompt step) and answer as HF does alone."""
    prompts = [side.hf.ids(q) for q in ("What animal is this?", "What colour is the animal?")]
    width = max(map(len, prompts))
    pad = make_tiny_llava.PAD_TOKEN_ID
    ids = np.array([[pad] * (width - len(p)) + p for p in prompts])
    mask = (np.arange(width)[None] >= (width - np.array(list(map(len, prompts))))[:, None]).astype(np.int64)
    pixels = np.concatenate([side.pix["chelsea"].numpy()] * 2)
    out = eng.generate(ids, pixels, mask, settings=settings(6))
    assert out == [side.hf_greedy(p, ["chelsea"], 6) for p in prompts]
    shared = 0
    while prompts[0][shared] == prompts[1][shared]:
        shared += 1
    assert eng.pool.hits == 1 and eng.pool.hit_tokens == cached_after(shared, len(prompts[1]))
    assert eng.image_cache.hits == 1


def test_turned_off_nothing_is_taken(side):
    from engine import Engine
    eng = Engine(side.model, prefix_cache=False, image_cache_bytes=0)
    eng.reserve(1)
    p = side.hf.ids("What animal is this?")
    first, _ = side.ours(eng, p, ["chelsea"], 4)
    assert side.ours(eng, p, ["chelsea"], 4) == (first, 0)
    assert eng.pool.cached == 0 and eng.image_cache.hits == 0 and len(eng.image_cache) == 0
