"""The engine: runs LlavaModel's cells for requests, as rows of one KV pool and steps over them.

Everything that turns a request into tokens lives here, and every way in (predict, chat, the server's
scheduler, MindFormers' Trainer and pipeline through `LlavaModel.generate`, the benchmark, the tests) goes
through `Engine`:

* a **row** (`Row`) is one request in flight: its token ids (prompt, then what it generated), its image
  features, its block table in the KV pool (kv_pool.KVPool) and how many of its positions are in the pool,
  its token selector and stop rule. Rows start and end at any step; nothing is shared between rows but the
  weights. A row's rotary positions are its own 0, 1, 2, ...: no left padding, no shared position counter.
* a **step** (`run` / `step`) is one forward pass over a plan [(row, n), ...]: the next n tokens of each row
  (a prompt chunk of a joining row, or the one token a decoding row just chose), flattened into one batch of
  tokens, so the weights are read once for all of them. Each token writes its keys/values into its row's
  blocks and attends over its row's positions so far (llama_text.LlamaModel.rows). Shapes depend only on the
  number of tokens (rounded up to a bucket, `token_bucket`) and of logits: the attended lengths, positions and
  block tables are data, so Graph mode compiles one graph per bucket, never per length, and `warmup` compiles
  them all before a server says ready (and times the small ones: a bucket runs padded to a larger one that
  measured clearly faster, `Engine.bucket`).
* compiled cells (one graph per input shape in GRAPH_MODE, or `mindspore.jit` in PyNative with `jit_steps`):
    vision   pixel_values [N, 3, H, W] -> image features [N * num_image_tokens, text_hidden]
    rows     a step's tokens -> logits of the tokens that end their row's known ids
    forward  the full left-padded sequence without the pool -> logits [B, L, V] (reference, use_past=False)
* the prompt budget (`check_budget` / generation.check_fits: prompt + max_new_tokens <= seq_length, checked
  once per request as its row is added; the predict job also calls it before loading the weights) and the
  stop rule (generation.TokenSelector: eos, max_new_tokens) are decided here, once per row.

Request API: `stream(input_ids, pixel_values, attention_mask, settings)` (left-padded batches: each row becomes
a row of the pool) yields each step's tokens per row; `generate(..., streamer=)` collects them; `add` /
`step` / `release` are the row API the server's scheduler plans with. On CPU in PyNative mode set
`pynative_synchronize=True` in the context: the asynchronous op queue's thread hand-offs cost ~1 ms per
dependent op on a small machine; GRAPH_MODE is the fast path.
"""
import contextlib
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from generation import GenerationSettings, TokenSelector, check_fits, token_logprobs
from image_cache import ImageCache, image_key
from kv_pool import BLOCK_SIZE, KVPool, block_keys, blocks_for
from llama_text import cache_shape
from llava_errors import LlavaError

_LIST_LIMIT = 10
# The image cache's default budget: ~27 images' features for the 7B (576 x 4096 float32 = 9 MiB each).
IMAGE_CACHE_BYTES = 256 * 2 ** 20


def _short_list(names):
    names = list(names)
    shown = ", ".join(str(n) for n in names[:_LIST_LIMIT])
    return shown + (f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else "")


def _numpy(x):
    return np.asarray(x.asnumpy() if isinstance(x, Tensor) else x)


def check_budget(config, input_ids, attention_mask, max_new_tokens):
    """LlavaError unless every prompt of a left-padded batch (its real tokens: each row is its own row of the
    KV pool) + max_new_tokens fits seq_length; the message names the longest prompt and its image tokens
    (never truncated)."""
    ids = np.atleast_2d(_numpy(input_ids))
    mask = ids != config.text_config.pad_token_id if attention_mask is None else np.atleast_2d(_numpy(attention_mask))
    lengths = [int(n) for n in (mask != 0).sum(-1)]
    check_fits(lengths, max_new_tokens, config.seq_length,
               image_tokens=[int(n) for n in (ids == config.image_token_index).sum(-1)])


# ---------------------------------------------------------------------------------------------- steps
class _VisionStep(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, pixel_values):
        return self.model.image_features(pixel_values)


class _ForwardStep(nn.Cell):
    """The cache-free full sequence: prompt embeddings with image features merged in, then the decoder."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, image_features, merge_index, position_ids, mask):
        return self.model(input_ids, image_features, merge_index, position_ids, mask)


class _RowStep(nn.Cell):
    """One row step (Engine.run): embeddings of the step's tokens with image features merged in, then the
    decoder over the KV pool -> float32 logits [m, V] of the logit_index tokens."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, ids, image_features, image_mask, positions, write, tokens, tables, logit_index):
        n, m = ids.shape[0], logit_index.shape[0]
        emb = self.model.embed_rows(ids, image_features, image_mask)
        return self.model.language_model.rows(emb, positions, write, tokens, tables, logit_index, n, m)


_STEPS = {
    "vision": lambda m: _VisionStep(m),
    "forward": lambda m: _ForwardStep(m),
    "rows": lambda m: _RowStep(m),
}


# On CPU MindSpore keeps a compiled graph's intermediate tensors allocated between runs: a 595-token LLaVA-7B
# prefill compiled as one graph held 3.4 GB above the weights and the KV cache (cut into one graph per layer,
# as much in total); so did CLIP-L's 24 layers. Run op by op (PyNative) the same prefill frees each tensor
# after its last use (6 layers of the 7B: +0.3 GB against +0.8 GB compiled), for ~10-25 % more time. On CPU
# a vision or prefill step from a Graph-mode context whose estimated activations exceed this runs op by op
# (Engine.eager_for); smaller ones (tiny, mid) stay compiled.
EAGER_BYTES = 512 * 2 ** 20
# Buckets up to which warmup(measure=True) times the steps: the slow row counts of MindSpore's CPU MatMul are
# small ones; above, a step is compute-bound and grows with its tokens (and timing the 7B's costs seconds).
MEASURED_BUCKETS = 64


@contextlib.contextmanager
def _op_by_op():
    """PyNative mode (synchronous: the asynchronous queue's hand-offs cost ~1 ms per op on CPU) for the
    duration, then Graph mode again."""
    sync = ms.get_context("pynative_synchronize")
    ms.set_context(mode=ms.PYNATIVE_MODE, pynative_synchronize=True)
    try:
        yield
    finally:
        ms.set_context(mode=ms.GRAPH_MODE, pynative_synchronize=sync)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Prompt:
    """A left-padded prompt batch prepared for the prompt steps (numpy, int32)."""
    mask: np.ndarray           # [B, L] 1 = real token
    input_ids: np.ndarray      # [B, L] image tokens replaced by 0 (their embeddings come from the images)
    merge_index: np.ndarray    # [B * L] row of concat(token embeddings, image features) for every position
    position_ids: np.ndarray   # [B, L] rotary positions (count of real tokens before; padding: 1)
    attention: np.ndarray      # [B, L, L] causal and padding mask


def prepare_prompt(config, input_ids, attention_mask, n_images):
    """Check a left-padded prompt batch and build the cache-free step's inputs."""
    tc = config.text_config
    ids = _numpy(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise LlavaError(f"input_ids must be a non-empty [batch, length] array, got shape {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise LlavaError(f"input_ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64)
    b, l = ids.shape
    bad = ids[(ids < 0) | (ids >= tc.vocab_size)]
    if bad.size:
        raise LlavaError(f"input_ids contain ids outside the vocabulary (0..{tc.vocab_size - 1}): "
                         f"{_short_list(sorted(set(bad.tolist())))}")
    if attention_mask is None:
        mask = (ids != tc.pad_token_id).astype(np.int32)
    else:
        mask = _numpy(attention_mask)
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape:
            raise LlavaError(f"attention_mask shape {list(mask.shape)} differs from input_ids shape "
                             f"{list(ids.shape)}")
        if not np.isin(mask, (0, 1)).all():
            raise LlavaError("attention_mask must contain only 0 and 1")
        mask = mask.astype(np.int32)
    if (mask.sum(-1) == 0).any():
        raise LlavaError(f"row(s) {np.nonzero(mask.sum(-1) == 0)[0].tolist()} of input_ids have no "
                         f"real token (all padding)")
    if (np.diff(mask, axis=-1) < 0).any():
        raise LlavaError("input_ids must be left-padded (padding found after a real token)")
    image = ids == config.image_token_index
    n_tokens = int(image.sum())
    per_image = config.num_image_tokens
    if n_tokens != n_images * per_image:
        raise LlavaError(f"input_ids hold {n_tokens} image tokens (id {config.image_token_index}) but "
                         f"{n_images} image(s) need {n_images * per_image} ({per_image} per image)")
    merge_index = np.arange(b * l, dtype=np.int32)
    merge_index[image.reshape(-1)] = b * l + np.arange(n_tokens, dtype=np.int32)
    position_ids = np.cumsum(mask, -1) - 1
    position_ids = np.where(mask == 0, 1, position_ids).astype(np.int32)
    causal = np.tril(np.ones((l, l), dtype=np.int32))
    return Prompt(mask=mask, input_ids=np.where(image, 0, ids).astype(np.int32), merge_index=merge_index,
                  position_ids=position_ids, attention=(causal[None, :, :] * mask[:, None, :]).astype(np.int32))


def check_pixels(config, pixel_values):
    """pixel_values [N, C, S, S] (numpy or Tensor) -> float32 Tensor, or LlavaError naming the shape."""
    vc = config.vision_config
    shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else np.shape(pixel_values)
    want = (vc.num_channels, vc.image_size, vc.image_size)
    if len(shape) != 4 or tuple(shape[1:]) != want or shape[0] < 1:
        raise LlavaError(f"pixel_values must have shape [N, {want[0]}, {want[1]}, {want[2]}], got {list(shape)}")
    if isinstance(pixel_values, Tensor):
        return pixel_values.astype(ms.float32)
    return Tensor(np.asarray(pixel_values, dtype=np.float32), ms.float32)


# ---------------------------------------------------------------------------------------------- rows
@dataclass(eq=False)
class Row:
    """One request in flight (see the module doc). `ids` grows by each chosen token; `length` of them have
    their keys/values in the pool: the row's next tokens to feed are ids[length:]."""
    lane: int                          # the row's line in the step's block tables
    ids: list                          # what the row feeds: prompt ids (image tokens as 0), then generated ids
    prompt_ids: list                   # the prompt as given (image tokens included): the selector's history
    prompt_length: int
    image_rows: np.ndarray             # [prompt_length] int32: image-feature row of each position, -1 = text
    features: Optional[np.ndarray]     # [image tokens, text_hidden] float32, or None
    settings: GenerationSettings
    selector: TokenSelector
    blocks: list
    images: list = None                # per prompt position: (image key, offset in the image) or None (text)
    keys: list = None                  # prefix-cache keys of the row's first len(keys) blocks (computed, full)
    cached: int = 0                    # prompt positions taken from the prefix cache, not computed
    cached_blocks: int = 0             # the blocks they are in
    length: int = 0
    finished: bool = False
    finish_reason: Optional[str] = None          # "stop" (eos) or "length" (max_new_tokens)
    top_logprobs: Optional[int] = None           # None: no log-probabilities; k: each token's and its top k
    logprobs: list = None                        # per generated token: generation.token_logprobs(...)

    @property
    def keyable(self):
        """Whether the row's blocks can have prefix-cache keys: its images (if any) have content keys."""
        return self.images is not None or self.features is None

    @property
    def pending(self):
        return len(self.ids) - self.length

    @property
    def prefilling(self):
        return self.length < self.prompt_length

    @property
    def generated(self):
        return self.ids[self.prompt_length:]


def token_bucket(n):
    """Tokens a step of n tokens runs with: n rounded up to a power of two up to 32, then to a multiple of 32
    (the filler tokens write to the scratch block and attend nothing; at most 1/16 of a long prompt is filler,
    and Graph mode compiles one graph per bucket)."""
    if n <= 32:
        return 1 << max(0, int(n - 1).bit_length())
    return -(-n // 32) * 32


# ---------------------------------------------------------------------------------------------- engine
class Engine:
    """Runs a LlavaModel: rows of one KV pool and steps over them (`add`, `step`, `release`), `stream` /
    `generate` for left-padded batches, `image_features` / `prefill` / `decode` / `forward` for single steps."""

    def __init__(self, model, jit_steps=False, eager=None, block_size=BLOCK_SIZE, prefix_cache=True,
                 image_cache_bytes=IMAGE_CACHE_BYTES):
        self.model = model
        self.config = model.config
        # Compile the steps with mindspore.jit when running in PyNative mode (GRAPH_MODE compiles anyway).
        self.jit_steps = bool(jit_steps)
        # Run the vision tower and large steps op by op in a Graph-mode context: None = when eager_for says.
        self.eager = eager
        # False: a step whose token bucket is not compiled yet runs op by op instead of compiling it (chat:
        # a follow-up turn's few new tokens cost less op by op than a compile of their bucket)
        self.compile_steps = True
        self.block_size = int(block_size)
        # Rows take the blocks of a prompt prefix an earlier row computed (kv_pool: keyed blocks stay in the
        # pool until their room is needed); the image cache keeps vision features by pixel content.
        self.prefix_cache = bool(prefix_cache)
        self.image_cache = ImageCache(image_cache_bytes)
        self.cache_blocks = 0            # blocks a default pool holds beyond its rows' (configure_caches)
        self.pool = None                 # kv_pool.KVPool, from reserve()
        self.lanes = 0
        self.rows = []                   # rows in flight
        self._free_lanes = []
        self._steps = {}
        self._compiled = set()           # token buckets the rows cell has compiled for (compile())
        # bucket -> the compiled bucket at least as large whose step measured fastest (warmup(measure=True)):
        # MindSpore's CPU MatMul is much slower at some row counts than at larger ones (on an AMD EPYC with
        # AVX-512, mid model: 16 and 32 rows 0.15 s a step, 48 and 64 rows 0.10 s), so a step of 9-32 tokens
        # (a follow-up turn's new tokens) runs faster padded to 64. Empty: token_bucket's rule.
        self.bucket_map = {}
        self._single = []                # the rows of the prefill/decode single-step API

    def step_cell(self, kind):
        """The compiled cell of one step kind (see the module doc); in PyNative mode with `jit_steps` its
        construct runs through mindspore.jit."""
        use_jit = self.jit_steps and ms.get_context("mode") == ms.PYNATIVE_MODE
        key = (kind, use_jit)
        if key not in self._steps:
            cell = _STEPS[kind](self.model)
            cell.set_train(False)
            if use_jit:
                cell.construct = ms.jit(cell.construct)
            self._steps[key] = cell
        return self._steps[key]

    # ------------------------------------------------------------------ the pool
    @property
    def max_blocks(self):
        """Block-table width: the blocks of one row of seq_length positions."""
        return blocks_for(self.config.seq_length, self.block_size)

    def pool_bytes(self, blocks):
        """Bytes of a pool of `blocks` blocks on this rank (keys and values of every layer)."""
        shape = cache_shape(self.config, blocks, self.block_size, self.model.tp.world)
        itemsize = np.dtype(np.float16 if self.model.language_model.compute_dtype != ms.float32
                            else np.float32).itemsize
        return 2 * self.config.text_config.num_layers * shape[0] * shape[1] * itemsize

    def reserve(self, lanes, blocks=None):
        """Allocate the KV pool for up to `lanes` rows at once and `blocks` blocks (default: every row can
        reach seq_length; plus the scratch block). Only while no row is in flight: compiled graphs hold the
        pool's Parameters, so they are dropped and compile again."""
        for row in self._single:         # the single-step API's rows end here
            self.release(row)
        self._single = []
        if self.rows:
            raise LlavaError("the KV pool cannot be resized while rows are in flight")
        lanes = int(lanes)
        blocks = int(blocks) if blocks is not None else 1 + lanes * self.max_blocks + self.cache_blocks
        if lanes < 1 or blocks < 2:
            raise LlavaError(f"a KV pool needs at least one row and two blocks, got {lanes} and {blocks}")
        lm = self.model.language_model
        shape = cache_shape(self.config, blocks, self.block_size, self.model.tp.world)
        dtype = lm.compute_dtype
        pairs = [tuple(Parameter(Tensor(np.zeros(shape, np.float32), dtype), name=p.name, requires_grad=False)
                       for p in pair) for pair in lm.cache_parameters()]
        lm.use_cache_parameters(pairs, self.block_size)
        self.pool = KVPool(blocks, self.block_size, cache=self.prefix_cache)
        self.lanes = lanes
        self._free_lanes = list(range(lanes - 1, -1, -1))
        self._steps = {k: v for k, v in self._steps.items() if k[0] == "vision"}
        self._compiled = set()
        self.bucket_map = {}
        self._single = []

    def _ensure_pool(self, lanes):
        if self.pool is None or (self.lanes < lanes and not self.rows):
            self.reserve(max(lanes, self.config.batch_size))

    # ------------------------------------------------------------------ rows
    def fits(self, n_ids, settings):
        """Whether a row of n_ids prompt tokens and its answer can be added now (a free lane and blocks)."""
        return bool(self._free_lanes) and \
            self.pool.needed(n_ids + settings.max_new_tokens) <= self.pool.free

    def check_request(self, n_ids, settings):
        """LlavaError unless the prompt + max_new_tokens fit seq_length and the whole pool."""
        check_fits(n_ids, settings.max_new_tokens, self.config.seq_length)
        need = self.pool.needed(n_ids + settings.max_new_tokens)
        if need > self.pool.usable:
            raise LlavaError(f"the prompt is {n_ids} tokens; + max_new_tokens={settings.max_new_tokens} needs "
                             f"{need * self.block_size} KV positions, more than the pool's "
                             f"{self.pool.usable * self.block_size}")

    def add(self, ids, pixel_values=None, settings=None, features=None, image_keys=None, prefix=None,
            top_logprobs=None):
        """A new row for a prompt whose `<image>` tokens are expanded (ids: a list of ints) and its images'
        pixel values [n, 3, S, S] (or their `features` and `image_keys`): its vision features are computed now
        (or taken from the image cache), the longest prefix of it that an earlier row computed is taken from
        the pool (`prefix`: exactly that many cached blocks, as rank 0 decided; LlavaError if they are not
        there), the rest of its blocks (prompt + max_new_tokens) reserved; `top_logprobs` (0..20): each chosen
        token's log-probability and its top alternatives go to row.logprobs. LlavaError for a bad prompt, one
        that does not fit, or no free lane/blocks (`fits` says beforehand)."""
        settings = settings or GenerationSettings.from_config(self.config)
        self._ensure_pool(1)
        ids = [int(i) for i in ids]
        per_image = self.config.num_image_tokens
        n_images = 0 if pixel_values is None and features is None else \
            (np.shape(pixel_values)[0] if features is None else np.shape(features)[0] // per_image)
        p = prepare_prompt(self.config, np.array([ids]), None, n_images)      # the checks: ids, image count
        self.check_request(len(ids), settings)
        if not self.fits(len(ids), settings):
            raise LlavaError("no free row in the KV pool")
        if features is None and pixel_values is not None:
            features, image_keys = self.cached_image_features(pixel_values)
        image = np.asarray(ids) == self.config.image_token_index
        image_rows = np.full(len(ids), -1, np.int32)
        image_rows[image] = np.arange(int(image.sum()), dtype=np.int32)
        images = [None if r < 0 else (image_keys[r // per_image], r % per_image) for r in image_rows.tolist()] \
            if image_keys is not None else None
        row = Row(lane=self._free_lanes.pop(), ids=[int(i) for i in p.input_ids[0]], prompt_ids=ids,
                  prompt_length=len(ids),
                  image_rows=image_rows, features=None if features is None else np.asarray(features, np.float32),
                  settings=settings, selector=TokenSelector(settings), blocks=[], images=images, keys=[],
                  top_logprobs=top_logprobs, logprobs=[])
        need = self.pool.needed(len(ids) + settings.max_new_tokens)
        row.blocks = self._take_prefix(row, prefix)
        row.blocks += self.pool.allocate(need - len(row.blocks))
        self.rows.append(row)
        return row

    def _prompt_keys(self, row):
        """The keys of the prompt's full blocks that may come from the cache: all but the one holding the last
        prompt token (its logits choose the first token, so it is always computed). None when the row's images
        have no keys (features given without them): such a row neither takes nor leaves cached blocks."""
        if not self.pool.cache or not row.keyable:
            return None
        usable = (row.prompt_length - 1) // self.block_size * self.block_size
        return block_keys(row.prompt_ids[:usable], row.images or [], self.block_size)

    def _take_prefix(self, row, prefix=None):
        """The cached blocks of the row's longest known prompt prefix, taken (row.length / cached / keys
        follow); `prefix`: exactly that many."""
        keys = self._prompt_keys(row)
        if not keys or prefix == 0:
            if prefix:
                raise LlavaError(f"the plan takes {prefix} cached blocks for a row whose prompt has no cached prefix")
            return []
        hit = self.pool.lookup(keys)
        if prefix is not None:
            if len(hit) < prefix:
                raise LlavaError(f"the plan takes {prefix} cached blocks; this rank's pool holds {len(hit)}")
            hit = hit[:prefix]
        self.pool.take(hit)
        row.keys = keys[:len(hit)]
        row.length = row.cached = len(hit) * self.block_size
        row.cached_blocks = len(hit)
        return hit

    def reuse(self, row):
        """A row not yet run takes the cached prefix it has now (an earlier row of its batch has just computed
        it): its first blocks are swapped for the cached ones."""
        if row.length:
            return
        hit = self._take_prefix(row)
        if hit:
            self.pool.release(row.blocks[:len(hit)])
            row.blocks = hit + row.blocks[len(hit):]

    def _register(self, row):
        """Key the row's blocks that are now full and computed (prompt and generated positions alike: a
        follow-up turn resends the answer), so that later rows can take them."""
        full = row.length // self.block_size
        if not self.pool.cache or not row.keyable or len(row.keys) >= full:
            return
        tokens = (row.prompt_ids + row.generated)[:full * self.block_size]
        new = block_keys(tokens, row.images or [], self.block_size, start=len(row.keys),
                         parent=row.keys[-1] if row.keys else b"")
        for b, key in zip(row.blocks[len(row.keys):full], new):
            self.pool.register(b, key)
        row.keys += new

    def cached_image_features(self, pixel_values):
        """pixel_values [N, 3, S, S] -> (features [N * num_image_tokens, text_hidden] numpy, N image keys):
        images the image cache holds skip the vision tower; the others run through it in one call."""
        pix = _numpy(check_pixels(self.config, pixel_values))
        keys = [image_key(p) for p in pix]
        known = {}
        for k in keys:              # an image twice in one call runs once (a miss, then a hit)
            if k not in known:
                known[k] = self.image_cache.get(k)
            else:
                self.image_cache.hits += 1
        todo = [k for k, f in known.items() if f is None]
        if todo:
            per_image = self.config.num_image_tokens
            first = [keys.index(k) for k in todo]
            computed = self.image_features(pix[first]).asnumpy().astype(np.float32)
            for j, k in enumerate(todo):
                known[k] = computed[j * per_image:(j + 1) * per_image]
                self.image_cache.put(k, known[k])
        return np.concatenate([known[k] for k in keys]), keys

    def configure_caches(self, prefix=True, image_bytes=IMAGE_CACHE_BYTES, cache_bytes=0):
        """Turn the prefix cache on or off (off: no row takes or leaves cached blocks from now on), give the
        image cache a new budget (0 = off; its entries are dropped), and make a pool reserved from now on
        `cache_bytes` larger than its rows need, for cached prefixes (idle rows' blocks hold them too)."""
        self.prefix_cache = bool(prefix)
        self.cache_blocks = int(cache_bytes) // self.pool_bytes(1) if prefix else 0
        if self.pool is not None:
            self.pool.cache = self.prefix_cache
        self.image_cache = ImageCache(image_bytes)

    def cache_stats(self):
        """The prefix cache's and the image cache's counters (for /health)."""
        return {**(self.pool.stats() if self.pool is not None else {}), **self.image_cache.stats()}

    def release(self, row):
        """The row leaves: its blocks and its lane are free for the next step."""
        if row in self.rows:
            self.rows.remove(row)
            self.pool.release(row.blocks)
            self._free_lanes.append(row.lane)
            row.blocks = []

    def release_all(self):
        for row in list(self.rows):
            self.release(row)

    # ------------------------------------------------------------------ steps
    def step_inputs(self, plan, all_logits=False, bucket=None):
        """Host-side inputs of the rows cell for plan [(row, n)] -> (tensors, wants: per plan entry the
        indices of its logits in the output, the token bucket); `bucket` instead of token_bucket's."""
        tc = self.config.text_config
        nb = bucket or self.bucket(sum(k for _, k in plan))
        bs, kv = self.block_size, self.model.language_model.model.layers[0].self_attn.n_kv
        ids = np.zeros(nb, np.int32)
        positions = np.zeros(nb, np.int32)
        write = (np.arange(nb) % bs).astype(np.int32)              # filler: the scratch block
        tokens = np.zeros((nb, 2), np.int32)
        feats = None
        mask = np.zeros((nb, 1), np.float32)
        logit_index, wants = [], []
        tables = np.zeros((self.lanes, self.max_blocks), np.int32)
        at = 0
        for row, k in plan:
            if not 1 <= k <= row.pending:
                raise LlavaError(f"a step plans {k} token(s) for a row with {row.pending} to feed")
            tables[row.lane, :len(row.blocks)] = row.blocks
            pos = np.arange(row.length, row.length + k)
            ids[at:at + k] = row.ids[row.length:row.length + k]
            positions[at:at + k] = pos
            blocks = np.asarray(row.blocks, np.int64)[pos // bs]
            write[at:at + k] = blocks * kv * bs + pos % bs
            tokens[at:at + k, 0] = row.lane
            tokens[at:at + k, 1] = pos + 1
            if row.features is not None and row.length < row.prompt_length:
                img = row.image_rows[pos[pos < row.prompt_length]]
                where = np.nonzero(img >= 0)[0]
                if where.size:
                    if feats is None:
                        feats = np.zeros((nb, tc.hidden_size), np.float32)
                    feats[at + where] = row.features[img[where]]
                    mask[at + where] = 1
            if all_logits:
                wants.append(list(range(len(logit_index), len(logit_index) + k)))
                logit_index.extend(range(at, at + k))
            elif row.length + k == len(row.ids):
                wants.append([len(logit_index)])
                logit_index.append(at + k - 1)
            else:
                wants.append([])
            at += k
        m = nb if all_logits else max(1, min(nb, self.lanes))
        if len(logit_index) > m:
            raise LlavaError(f"a step wants {len(logit_index)} logits, more than its {m}")
        logit_index = np.array(logit_index + [0] * (m - len(logit_index)), np.int32)
        if feats is None:
            feats = np.zeros((nb, tc.hidden_size), np.float32)
        dtype = self.model.language_model.compute_dtype
        tensors = (Tensor(ids), Tensor(feats, dtype), Tensor(mask, dtype), Tensor(positions), Tensor(write),
                   Tensor(tokens), Tensor(tables), Tensor(logit_index))
        return tensors, wants, nb

    def run(self, plan, all_logits=False):
        """One forward pass over plan [(row, n), ...] (each row at most once): the next n tokens of each row
        go into the pool. Returns per plan entry the float32 logits [k, V] of its tokens that end the row's
        known ids (k = 1 or 0; with all_logits every token's)."""
        if len({id(r) for r, _ in plan}) != len(plan):
            raise LlavaError("a step plans a row twice")
        tensors, wants, nb = self.step_inputs(plan, all_logits)
        eager = self.eager_for("prefill", nb)
        graph = ms.get_context("mode") == ms.GRAPH_MODE
        if not eager and graph and not self.compile_steps and nb not in self._compiled and self.model.tp.world == 1:
            eager = True
        with _op_by_op() if eager else contextlib.nullcontext():
            logits = self.step_cell("rows")(*tensors).asnumpy()
        if graph and not eager:
            self._compiled.add(nb)           # compiled by this step if not before
        for row, k in plan:
            row.length += k
            self._register(row)
        return [logits[w] for w in wants]

    def step(self, plan):
        """`run`, then every row whose known ids are all in the pool picks its next token (its selector; the
        stop rule: eos or max_new_tokens ends the row). Returns [(row, token)] for the rows that picked one."""
        picked = []
        for (row, _), logits in zip(plan, self.run(plan)):
            if not len(logits) or row.finished:
                continue
            seq = [row.prompt_ids + row.generated]
            raw = None if row.top_logprobs is None else logits[-1].copy()   # before the selector reshapes it
            token, running = row.selector.step(logits[-1:], seq, np.ones(1, bool))
            token = int(token[0])
            if raw is not None:
                row.logprobs.append(token_logprobs(raw, token, row.top_logprobs))
            row.ids.append(token)
            if not running[0]:
                row.finished, row.finish_reason = True, "stop"
            elif len(row.generated) >= row.settings.max_new_tokens:
                row.finished, row.finish_reason = True, "length"
            picked.append((row, token))
        return picked

    def bucket(self, n):
        """Tokens a step of n tokens runs with: token_bucket(n), or a larger compiled bucket that measured
        faster (warmup)."""
        b = token_bucket(n)
        return self.bucket_map.get(b, b)

    def bucket_sizes(self, max_tokens):
        """Every token bucket a step of up to max_tokens tokens can run with."""
        return sorted({token_bucket(n) for n in range(1, max_tokens + 1)})

    def warmup(self, max_tokens, measure=True):
        """Compile the rows cell for every bucket of up to max_tokens tokens, so that no request waits for a
        compile (a server, before it says ready); with `measure`, time each compiled bucket's step (best of
        two padding-only steps) and let every bucket run as the fastest compiled one at least as large.
        One process only: tensor-parallel ranks keep token_bucket's rule, so that every rank's collectives
        see the same shapes without rank 0 having to send its choice."""
        buckets = self.bucket_sizes(max_tokens)
        self.compile(buckets)
        if not measure or self.model.tp.world > 1 or ms.get_context("mode") != ms.GRAPH_MODE:
            return
        cost = {}
        for nb in buckets:
            if nb > MEASURED_BUCKETS or self.eager_for("prefill", nb):
                continue
            tensors = self.step_inputs([], bucket=nb)[0]
            times = []
            while len(times) < 2 and sum(times) < 0.5:     # best of two, one when a step is slow (the 7B)
                t0 = time.perf_counter()
                self.step_cell("rows")(*tensors).asnumpy()
                times.append(time.perf_counter() - t0)
            cost[nb] = min(times)
        self.bucket_map = {}
        for nb in cost:
            best = min((c for c in cost if c >= nb), key=lambda c: (cost[c], c))
            # a larger bucket only when it is clearly faster (10%): timing noise must not pad every step
            if best != nb and cost[best] < 0.9 * cost[nb]:
                self.bucket_map[nb] = best

    def compile(self, buckets):
        """Compile the rows cell for these token buckets (each once per pool): a step of padding tokens only,
        which write to the scratch block and attend nothing. Graph mode only; op-by-op steps need none."""
        self._ensure_pool(1)
        if ms.get_context("mode") != ms.GRAPH_MODE:
            return
        for nb in sorted(set(buckets) - self._compiled):
            if not self.eager_for("prefill", nb):
                self.step_cell("rows")(*self.step_inputs([], bucket=nb)[0]).asnumpy()
            self._compiled.add(nb)

    def eager_for(self, kind, tokens):
        """Whether a `vision` or `prefill` (a row step of many tokens) over `tokens` positions (images x
        patches, or the step's tokens) runs op by op: only from a Graph-mode context on one rank, then as
        `eager` says when set, else on CPU when its estimated activations (hidden- and MLP-sized float32
        tensors per token and layer of the vision tower or the decoder) exceed EAGER_BYTES."""
        # tensor-parallel ranks stay compiled: their collectives are tested in compiled steps only
        if ms.get_context("mode") != ms.GRAPH_MODE or self.model.tp.world > 1:
            return False
        if self.eager is not None:
            return bool(self.eager)
        c = self.config.vision_config if kind == "vision" else self.config.text_config
        layers = c.num_hidden_layers if kind == "vision" else c.num_layers
        activations = 4 * tokens * (8 * c.hidden_size + 3 * c.intermediate_size) * layers
        return ms.get_context("device_target") == "CPU" and activations > EAGER_BYTES

    # ------------------------------------------------------------------ single steps
    def image_features(self, pixel_values):
        """pixel_values [N, 3, H, W] -> Tensor [N * num_image_tokens, text_hidden] (after the projector)."""
        pix = check_pixels(self.config, pixel_values)
        eager = self.eager_for("vision", pix.shape[0] * (self.config.vision_config.num_patches + 1))
        with _op_by_op() if eager else contextlib.nullcontext():
            return self.step_cell("vision")(pix)

    def forward(self, input_ids, pixel_values=None, attention_mask=None):
        """Full sequence without the KV pool -> float32 numpy logits [B, L, V]."""
        feats, n_images = self._features(pixel_values)
        return self._forward(input_ids, attention_mask, feats, n_images)

    def _features(self, pixel_values):
        """Image features and their count; one zero row (never gathered) for a text-only prompt."""
        if pixel_values is None:
            d = self.config.text_config.hidden_size
            return Tensor(np.zeros((1, d), np.float32), ms.float32).astype(self.model.language_model.compute_dtype), 0
        return self.image_features(pixel_values), np.shape(pixel_values)[0]

    def _forward(self, input_ids, attention_mask, feats, n_images):
        p = prepare_prompt(self.config, input_ids, attention_mask, n_images)
        return self.step_cell("forward")(Tensor(p.input_ids), feats, Tensor(p.merge_index), Tensor(p.position_ids),
                                         Tensor(p.attention)).asnumpy()

    def _batch_rows(self, input_ids, pixel_values, attention_mask, settings, reuse=True):
        """A left-padded batch -> new rows (one per batch row, its images in prompt order), after checking
        the whole batch (ids, mask, image count, budget) before any row is added; `reuse`: rows take cached
        prefixes."""
        ids = _numpy(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        n_images = 0 if pixel_values is None else np.shape(pixel_values)[0]
        p = prepare_prompt(self.config, ids, attention_mask, n_images)
        check_budget(self.config, ids, p.mask, max(s.max_new_tokens for s in settings))
        if len(settings) != ids.shape[0]:
            raise LlavaError(f"{len(settings)} generation settings for a batch of {ids.shape[0]}")
        feats, keys = (None, None) if pixel_values is None else self.cached_image_features(pixel_values)
        per_image = self.config.num_image_tokens
        for row in self._single:         # the single-step API's rows end with the next batch
            self.release(row)
        self._single = []
        self._ensure_pool(ids.shape[0])
        if len(self._free_lanes) < ids.shape[0]:
            raise LlavaError(f"a batch of {ids.shape[0]} with {len(self.rows)} rows in flight: the KV pool "
                             f"holds {self.lanes}")
        rows, used = [], 0
        for b in range(ids.shape[0]):
            real = [int(t) for t, m in zip(ids[b], p.mask[b]) if m]
            count = sum(t == self.config.image_token_index for t in real) // per_image
            f = None if not count else feats[used * per_image:(used + count) * per_image]
            rows.append(self.add(real, None, settings[b], features=f, image_keys=keys and keys[used:used + count],
                                 prefix=None if reuse else 0))
            used += count
        return rows

    def prefill(self, input_ids, pixel_values=None, attention_mask=None, return_all_logits=False, reserve=0):
        """Run left-padded prompts as new rows (replacing the previous single-step rows). Returns float32
        numpy logits [B, V] of each last position, or [B, L, V] with return_all_logits (zeros at padding).
        `reserve` positions are kept for decoding: the prompt budget (prompt + reserve <= seq_length) is
        checked here, once per request."""
        ids = np.atleast_2d(_numpy(input_ids))
        base = GenerationSettings.from_config(self.config)
        settings = GenerationSettings(**{**base.__dict__, "max_new_tokens": max(1, int(reserve)),
                                         "do_sample": False})
        # every position is computed here (its logits may be asked for): no cached prefix is taken
        self._single = self._batch_rows(ids, pixel_values, attention_mask, [settings] * ids.shape[0], reuse=False)
        for row in self._single:         # decode() may go on up to seq_length, as far as the pool allows
            row.blocks += self.pool.allocate(min(self.max_blocks - len(row.blocks), self.pool.free))
        out = self.run([(r, r.pending) for r in self._single], all_logits=return_all_logits)
        if not return_all_logits:
            return np.concatenate(out)
        full = np.zeros(ids.shape + (out[0].shape[-1],), np.float32)
        for b, logits in enumerate(out):
            full[b, ids.shape[1] - len(logits):] = logits
        return full

    def decode(self, token_ids):
        """One step after prefill: token_ids [B] (the tokens just chosen) -> float32 logits [B, V]."""
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if tokens.shape[0] != len(self._single):
            raise LlavaError(f"decode got {tokens.shape[0]} token(s) for a batch of {len(self._single)}")
        for row, t in zip(self._single, tokens):
            if len(row.ids) + 1 > len(row.blocks) * self.block_size:
                raise LlavaError(f"the row's KV blocks are full ({len(row.ids)} positions)")
            row.ids.append(int(t))
        return np.concatenate(self.run([(r, 1) for r in self._single]))

    # ------------------------------------------------------------------ requests
    def stream(self, input_ids, pixel_values=None, attention_mask=None, settings=None, stop=None):
        """Generate after left-padded prompts whose `<image>` tokens are already expanded, one step at a time.

        input_ids [B, L] (pad id on the left), pixel_values [N, 3, H, W] for the N images in prompt order
        (row-major over the batch), attention_mask [B, L] (derived from the pad id when None). `settings` is
        one GenerationSettings for every row or a list with one per row: each row has its own token selector
        (and seeded random generator) and ends at its own eos ids or max_new_tokens. `stop(running) -> ended`,
        called after every step with the [B] bool mask of the rows still running, ends the rows it marks.

        Each batch row is a row of the pool (its own positions, no padding): the first step runs every prompt,
        each later step one token per running row. Each step yields (tokens [B], real [B] bool): `real` marks
        the rows for which the token is generated (False once a row has finished: its token is the pad id).
        With config.use_past=False every step recomputes the whole sequence (slow; for checking)."""
        ids = _numpy(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        rows = ids.shape[0]
        per_row = list(settings) if isinstance(settings, (list, tuple)) else \
            [settings or GenerationSettings.from_config(self.config)] * rows
        if len(per_row) != rows:
            raise LlavaError(f"{len(per_row)} generation settings for a batch of {rows}")
        if not self.config.use_past:
            yield from self._stream_uncached(ids, pixel_values, attention_mask, per_row, stop)
            return
        batch = self._batch_rows(ids, pixel_values, attention_mask, per_row)
        # the decode step's graph compiles now, not after the first token: a one-shot run (predict) then
        # decodes its whole answer at the warm engine's speed
        self.compile([self.bucket(len(batch))])
        pad = np.int64(self.config.text_config.pad_token_id)
        first, later = self._stages(batch)
        try:
            running = list(batch)
            while running:
                picked = dict((id(r), t) for r, t in self.step([(r, r.pending) for r in running if r not in later]))
                if later:                # their shared prefix is in the pool now: they compute only the rest
                    for r in later:
                        self.reuse(r)
                    picked.update((id(r), t) for r, t in self.step([(r, r.pending) for r in later]))
                    later = []
                real = np.array([id(r) in picked for r in batch])
                tokens = np.array([picked.get(id(r), pad) for r in batch], np.int64)
                yield tokens, real
                if stop is not None:
                    ended = np.asarray(stop(np.array([r in running and not r.finished for r in batch])), bool)
                    for r, e in zip(batch, ended):
                        r.finished = r.finished or bool(e)
                for r in [r for r in running if r.finished]:
                    running.remove(r)
                    self.release(r)
        finally:
            for r in batch:
                self.release(r)

    def _stages(self, rows):
        """Rows of a batch that start together, split so that prompts can share blocks: a row whose first
        block is also an earlier row's (one image, several questions) runs its prompt just after that row has
        computed it, and takes it from the cache. -> (first, later)."""
        seen, first, later = set(), [], []
        for r in rows:
            keys = None if r.cached else self._prompt_keys(r)
            (later if keys and keys[0] in seen else first).append(r)
            if keys:
                seen.add(keys[0])
        return first, later

    def _stream_uncached(self, ids, pixel_values, attention_mask, per_row, stop):
        """use_past=False: every step recomputes the whole left-padded sequence (Engine.forward)."""
        rows = ids.shape[0]
        selectors = [TokenSelector(s) for s in per_row]
        limits = np.array([s.max_new_tokens for s in per_row])
        steps = int(limits.max())
        check_budget(self.config, ids, attention_mask, steps)
        feats, n_images = self._features(pixel_values)
        seq = ids.astype(np.int64)
        mask = prepare_prompt(self.config, ids, attention_mask, n_images).mask
        sequences = [list(map(int, row)) for row in ids]
        unfinished = np.ones(rows, dtype=bool)
        logits = self._forward(seq, mask, feats, n_images)[:, -1]
        for step in range(steps):
            real = unfinished.copy()
            tokens = np.empty(rows, dtype=np.int64)
            for r, selector in enumerate(selectors):
                token, running_row = selector.step(logits[r:r + 1], sequences[r:r + 1], unfinished[r:r + 1])
                tokens[r], unfinished[r] = token[0], running_row[0]
                sequences[r].append(int(token[0]))
            unfinished &= step + 1 < limits
            yield tokens, real
            if stop is not None:
                unfinished &= ~np.asarray(stop(unfinished.copy()), dtype=bool)
            if not unfinished.any():
                return
            seq = np.concatenate([seq, tokens[:, None]], 1)
            mask = np.concatenate([mask, np.ones_like(tokens[:, None], dtype=mask.dtype)], 1)
            logits = self._forward(seq, mask, feats, n_images)[:, -1]

    def generate(self, input_ids, pixel_values=None, attention_mask=None, settings=None, streamer=None):
        """`stream` (one settings for all rows, or one per row) collected: one list of new token ids per row,
        up to and including its first eos id. streamer.put(tokens [B]) after every step (pad id for finished
        rows), streamer.end() at the end."""
        outputs = None
        for tokens, real in self.stream(input_ids, pixel_values, attention_mask, settings):
            if outputs is None:
                outputs = [[] for _ in tokens]
            for row in np.nonzero(real)[0]:
                outputs[row].append(int(tokens[row]))
            if streamer is not None:
                streamer.put(tokens.copy())
        if streamer is not None:
            streamer.end()
        return outputs
