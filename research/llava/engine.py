"""The engine: runs LlavaModel's cells for requests.

Everything that turns a request into tokens lives here, and every way in (predict, MindFormers' Trainer and
pipeline through `LlavaModel.generate`, the benchmark, the tests) goes through `Engine`:

* compiled steps: small cells over the model's parts, compiled as one graph each in GRAPH_MODE (or with
  `mindspore.jit` in PyNative when `jit_steps` is set):
    vision   pixel_values [N, 3, H, W] -> image features [N * num_image_tokens, text_hidden]
    prefill  merged prompt embeddings [B, L] -> logits of the last position (or of all positions) and the
             prompt's keys/values
    write    the prompt's keys/values -> KV cache positions 0..L-1 (run with the first decode step, so the
             first token does not wait for the copy)
    prefill_write  a prefill whose layers write their keys/values into the cache as they go: a large
             prompt on CPU runs it op by op (eager_for), so no layer's keys/values outlive it
    decode   one token per row [B, 1] -> logits [B, V]; writes its keys/values at the next cache position
             in place and attends over cache positions 0..T-1 only: T, the length of its mask, is the
             positions in use rounded up to a multiple of `decode_bucket` (default 64), so Graph mode
             compiles one decode graph per bucket and reuses it
    forward  the full sequence without the cache -> logits [B, L, V] (reference, and config.use_past=False)
* host-side input preparation (`prepare_prompt`): left padding, image-token count, merge index, positions,
  masks; prompts are left-padded to a multiple of `prefill_bucket` (default 8) so Graph mode compiles one
  prefill per bucket, not per length;
* `KVCache`: the cache Parameters per batch size, the pending prompt write, and per row which cache positions
  hold its tokens;
* the generate loop over `generation.TokenSelector.step` (the one stop rule) and the prompt budget
  (`check_budget`, checked once per request as it starts; the predict job also calls it before loading the
  weights, so that a prompt too long fails in a second).

Request API: `stream(input_ids, pixel_values, attention_mask, settings)` yields each step's tokens per row;
`generate(..., streamer=)` collects them. On CPU in PyNative mode set `pynative_synchronize=True` in the
context: the asynchronous op queue's thread hand-offs cost ~1 ms per dependent op on a small machine (tiny
decode 8 -> 67 steps/s); GRAPH_MODE is the fast path.
"""
import contextlib
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from generation import GenerationSettings, TokenSelector, check_fits
from llama_text import cache_shape
from llava_errors import LlavaError

_LIST_LIMIT = 10


def _short_list(names):
    names = list(names)
    shown = ", ".join(str(n) for n in names[:_LIST_LIMIT])
    return shown + (f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else "")


def _numpy(x):
    return np.asarray(x.asnumpy() if isinstance(x, Tensor) else x)


def check_budget(config, input_ids, attention_mask, max_new_tokens):
    """LlavaError unless every left-padded prompt of the batch + max_new_tokens fits seq_length (the KV-cache
    size); the message names the longest prompt and its image tokens (never truncated)."""
    ids = np.atleast_2d(_numpy(input_ids))
    mask = ids != config.text_config.pad_token_id if attention_mask is None else np.atleast_2d(_numpy(attention_mask))
    lengths = [int(n) for n in (mask != 0).sum(-1)]
    lengths[int(np.argmax(lengths))] = ids.shape[-1]        # the KV cache holds the padded width
    check_fits(lengths, max_new_tokens, config.seq_length,
               image_tokens=[int(n) for n in (ids == config.image_token_index).sum(-1)])


# ---------------------------------------------------------------------------------------------- steps
class _VisionStep(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, pixel_values):
        return self.model.image_features(pixel_values)


class _PromptStep(nn.Cell):
    """Prompt embeddings with image features merged in, then the decoder (prefill or cache-free forward)."""

    def __init__(self, model, for_cache, last_only, write=False):
        super().__init__(auto_prefix=False)
        self.model = model
        self.for_cache = for_cache          # also return the keys/values, for the 'write' step
        self.last_only = last_only
        self.write = write                  # each layer writes its keys/values into the cache itself

    def construct(self, input_ids, image_features, merge_index, position_ids, mask, slots):
        b, l = input_ids.shape
        merged = self.model.embed(input_ids, image_features, merge_index)
        logits, kv = self.model.language_model(merged, position_ids, mask, slots, b, l, False, self.last_only,
                                               self.write)
        return (logits, kv) if self.for_cache else logits


class _DecodeStep(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, position_ids, mask, slots):
        b = input_ids.shape[0]
        emb = self.model.language_model.embed(ops.reshape(input_ids, (b,)))
        return self.model.language_model(emb, position_ids, mask, slots, b, 1, True, True)[0]


class _CacheWriteStep(nn.Cell):
    """A prompt's keys/values (k0, v0, k1, v1, ...) -> KV cache positions `slots` of every layer."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, slots, *kv):
        b, l, _, _ = kv[0].shape
        return self.model.language_model.write_cache(kv, slots, b, l)


_STEPS = {
    "vision": lambda m: _VisionStep(m),
    "prefill": lambda m: _PromptStep(m, for_cache=True, last_only=True),
    "prefill_all": lambda m: _PromptStep(m, for_cache=True, last_only=False),
    "prefill_write": lambda m: _PromptStep(m, for_cache=True, last_only=True, write=True),
    "forward": lambda m: _PromptStep(m, for_cache=False, last_only=False),
    "decode": lambda m: _DecodeStep(m),
    "write": lambda m: _CacheWriteStep(m),
}


# On CPU MindSpore keeps a compiled graph's intermediate tensors allocated between runs: a 595-token LLaVA-7B
# prefill compiled as one graph held 3.4 GB above the weights and the KV cache (cut into one graph per layer,
# as much in total); so did CLIP-L's 24 layers. Run op by op (PyNative) the same prefill frees each tensor
# after its last use (6 layers of the 7B: +0.3 GB against +0.8 GB compiled), for ~10-25 % more time. On CPU
# a vision or prefill step from a Graph-mode context whose estimated activations exceed this runs op by op
# (Engine.eager_for); smaller ones (tiny, mid) stay compiled.
EAGER_BYTES = 512 * 2 ** 20


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


def prepare_prompt(config, input_ids, attention_mask, n_images, pad_to=None):
    """Check a left-padded prompt batch and build the prompt steps' inputs. `pad_to` adds left padding."""
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
    if pad_to is not None and pad_to > l:
        extra = pad_to - l
        ids = np.concatenate([np.full((b, extra), tc.pad_token_id, np.int64), ids], 1)
        mask = np.concatenate([np.zeros((b, extra), np.int32), mask], 1)
        l = pad_to
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


# ---------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """The decoder's KV cache and which of its positions hold each row's tokens.

    The cache tensors are Parameters held by the attention cells (llama_text.LlamaAttention) in the layout
    `llama_text.cache_shape` gives. A compiled graph keeps the Parameter objects it was built with, so a cache
    is kept per batch size (the pool) and swapped into the cells, never reallocated. After a prefill the
    prompt's keys/values are pending: `flush` writes them with the first decode step.
    """

    def __init__(self, model, write_step):
        self.model = model
        self.seq_length = model.config.seq_length
        self._write_step = write_step
        self._pool = {}
        self.mask = None            # [B, seq_length] int32: 1 = the position holds a real token of that row
        self.next_slot = 0          # the position the next decode step writes (= positions in use)
        self.pending = None         # (slots, keys/values) of the prompt, written by flush()

    def use(self, batch):
        """Make the cells hold this batch size's cache (allocated the first time)."""
        lm = self.model.language_model
        current = lm.cache_parameters()
        rows = current[0][0].shape[0] // cache_shape(self.model.config, 1, self.model.tp.world)[0]
        self._pool.setdefault(rows, current)
        if rows == batch:
            return
        if batch not in self._pool:
            dtype = current[0][0].dtype
            shape = cache_shape(self.model.config, batch, self.model.tp.world)
            self._pool[batch] = [tuple(Parameter(Tensor(np.zeros(shape, np.float32), dtype), name=p.name,
                                                 requires_grad=False) for p in pair) for pair in current]
        lm.use_cache_parameters(self._pool[batch])

    def start(self, prompt_mask, slots, kv):
        """A prefill of prompt_mask [B, L] ran: its keys/values go to positions 0..L-1 with the next flush
        (none: the prefill wrote them)."""
        b, l = prompt_mask.shape
        self.mask = np.zeros((b, self.seq_length), np.int32)
        self.mask[:, :l] = prompt_mask
        self.next_slot = l
        self.pending = (slots, kv) if kv else None

    @property
    def batch(self):
        return 0 if self.mask is None else self.mask.shape[0]

    def flush(self):
        if self.pending is not None:
            slots, kv = self.pending
            self._write_step(slots, *kv)
            self.pending = None

    @property
    def in_use(self):
        """Positions 0..in_use-1 of every row hold the prompt and the tokens decoded so far (or padding)."""
        return self.next_slot

    def advance(self):
        """Claim the next position for one new token per row -> (slot, rotary positions [B, 1])."""
        if self.mask is None:
            raise LlavaError("decode needs a prefill first")
        slot = self.next_slot
        if slot >= self.seq_length:
            raise LlavaError(f"the KV cache is full (seq_length={self.seq_length})")
        positions = self.mask[:, :slot].sum(-1).astype(np.int32).reshape(-1, 1)
        self.mask[:, slot] = 1
        self.next_slot = slot + 1
        return slot, positions

    def attention_mask(self, length):
        """[B, 1, length] int32: which of cache positions 0..length-1 a decode step attends to
        (length >= in_use: the positions past in_use are masked)."""
        if not self.in_use <= length <= self.seq_length:
            raise LlavaError(f"a decode step over {length} cache positions cannot cover the {self.in_use} "
                             f"in use (seq_length={self.seq_length})")
        return np.ascontiguousarray(self.mask[:, None, :length])


# ---------------------------------------------------------------------------------------------- engine
class Engine:
    """Runs a LlavaModel: `stream`/`generate` for requests, `image_features`/`prefill`/`decode`/`forward` for
    single steps."""

    def __init__(self, model, prefill_bucket=8, jit_steps=False, decode_bucket=64, eager=None):
        self.model = model
        self.config = model.config
        # Prompts are left-padded to a multiple of this many tokens (0 = exact length): one Graph-mode
        # compilation per bucket instead of per length, and CPU matmuls are no slower on 600 rows than on 595.
        self.prefill_bucket = int(prefill_bucket)
        # A decode step attends over the cache positions in use rounded up to a multiple of this many
        # (0 = always the whole cache): one Graph-mode compilation per bucket; see decode_length.
        self.decode_bucket = int(decode_bucket)
        # Compile the steps with mindspore.jit when running in PyNative mode (GRAPH_MODE compiles anyway).
        self.jit_steps = bool(jit_steps)
        # Run the vision tower and the prefill op by op in a Graph-mode context: None = when eager_for says.
        self.eager = eager
        self._steps = {}
        self.cache = KVCache(model, lambda *args: self.step("write")(*args))

    def step(self, kind):
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

    # ------------------------------------------------------------------ single steps
    def image_features(self, pixel_values):
        """pixel_values [N, 3, H, W] -> Tensor [N * num_image_tokens, text_hidden] (after the projector)."""
        pix = check_pixels(self.config, pixel_values)
        eager = self.eager_for("vision", pix.shape[0] * (self.config.vision_config.num_patches + 1))
        with _op_by_op() if eager else contextlib.nullcontext():
            return self.step("vision")(pix)

    def _features(self, pixel_values):
        """Image features and their count; one zero row (never gathered) for a text-only prompt."""
        if pixel_values is None:
            d = self.config.text_config.hidden_size
            return Tensor(np.zeros((1, d), np.float32), ms.float32).astype(self.model.language_model.compute_dtype), 0
        return self.image_features(pixel_values), np.shape(pixel_values)[0]

    def forward(self, input_ids, pixel_values=None, attention_mask=None):
        """Full sequence without the KV cache -> float32 numpy logits [B, L, V]."""
        feats, n_images = self._features(pixel_values)
        return self._forward(input_ids, attention_mask, feats, n_images)

    def _forward(self, input_ids, attention_mask, feats, n_images):
        p = prepare_prompt(self.config, input_ids, attention_mask, n_images)
        slots = Tensor(np.arange(p.input_ids.shape[1], dtype=np.int32))
        return self.step("forward")(Tensor(p.input_ids), feats, Tensor(p.merge_index), Tensor(p.position_ids),
                                     Tensor(p.attention), slots).asnumpy()

    def _bucket_length(self, length, reserve):
        bucket = self.prefill_bucket
        if not bucket:
            return length
        return max(length, min(-(-length // bucket) * bucket, self.config.seq_length - reserve))

    def prefill(self, input_ids, pixel_values=None, attention_mask=None, return_all_logits=False, reserve=0):
        """Run the prompt and start a new KV cache state. Returns float32 numpy logits [B, V] of the last
        position, or [B, L, V] with return_all_logits. `reserve` positions are kept free for decoding: the
        prompt budget (prompt + reserve <= seq_length) is checked here, once per request."""
        length = np.shape(input_ids)[-1]
        check_budget(self.config, input_ids, attention_mask, reserve)
        feats, n_images = self._features(pixel_values)
        p = prepare_prompt(self.config, input_ids, attention_mask, n_images,
                           pad_to=self._bucket_length(length, reserve))
        b, l = p.input_ids.shape
        self.cache.use(b)
        slots = Tensor(np.arange(l, dtype=np.int32))
        eager = self.eager_for("prefill", b * l)
        # op by op, each layer writes its keys/values as it goes (they are freed layer by layer: 0.6 GB for
        # a 595-token 7B prompt); compiled, they are written with the first decode step (the first token
        # comes out sooner)
        step = self.step("prefill_all" if return_all_logits else "prefill_write" if eager else "prefill")
        with _op_by_op() if eager else contextlib.nullcontext():
            logits, kv = step(Tensor(p.input_ids), feats, Tensor(p.merge_index), Tensor(p.position_ids),
                              Tensor(p.attention), slots)
        self.cache.start(p.mask, slots, kv)
        logits = logits.asnumpy()
        return logits[:, l - length:] if return_all_logits else logits

    def eager_for(self, kind, tokens):
        """Whether a `vision` or `prefill` step over `tokens` positions (images x patches, batch x padded
        length) runs op by op: only from a Graph-mode context on one rank, then as `eager` says when set,
        else on CPU when its estimated activations (hidden- and MLP-sized float32 tensors per token and layer
        of the vision tower or the decoder) exceed EAGER_BYTES."""
        # tensor-parallel ranks stay compiled: their collectives are tested in compiled steps only
        if ms.get_context("mode") != ms.GRAPH_MODE or self.model.tp.world > 1:
            return False
        if self.eager is not None:
            return bool(self.eager)
        c = self.config.vision_config if kind == "vision" else self.config.text_config
        layers = c.num_hidden_layers if kind == "vision" else c.num_layers
        activations = 4 * tokens * (8 * c.hidden_size + 3 * c.intermediate_size) * layers
        return ms.get_context("device_target") == "CPU" and activations > EAGER_BYTES

    def decode_length(self, in_use):
        """How many cache positions a decode step attends over when `in_use` of them hold tokens (including
        the step's own): in_use rounded up to a multiple of decode_bucket, at most seq_length."""
        seq = self.config.seq_length
        if not self.decode_bucket:
            return seq
        return min(seq, -(-in_use // self.decode_bucket) * self.decode_bucket)

    def decode_inputs(self, token_ids):
        """Claim the next cache position for token_ids [B] and write a pending prompt -> the decode step's
        inputs (ids, rotary positions, mask over decode_length positions, slot)."""
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if tokens.shape[0] != self.cache.batch:
            raise LlavaError(f"decode got {tokens.shape[0]} token(s) for a batch of {self.cache.batch}")
        slot, positions = self.cache.advance()
        mask = self.cache.attention_mask(self.decode_length(self.cache.in_use))
        self.cache.flush()
        return (Tensor(tokens.reshape(-1, 1).astype(np.int32)), Tensor(positions), Tensor(mask),
                Tensor(np.array([slot], np.int32)))

    def decode(self, token_ids):
        """One decode step after prefill: token_ids [B] (the tokens just chosen) -> float32 logits [B, V]."""
        return self.step("decode")(*self.decode_inputs(token_ids)).asnumpy()

    # ------------------------------------------------------------------ requests
    def stream(self, input_ids, pixel_values=None, attention_mask=None, settings=None, stop=None):
        """Generate after left-padded prompts whose `<image>` tokens are already expanded, one step at a time.

        input_ids [B, L] (pad id on the left), pixel_values [N, 3, H, W] for the N images in prompt order
        (row-major over the batch), attention_mask [B, L] (derived from the pad id when None). `settings` is
        one GenerationSettings for every row or a list with one per row: each row has its own token selector
        (and seeded random generator) and ends at its own eos ids or max_new_tokens. `stop(running) -> ended`,
        called after every step with the [B] bool mask of the rows still running, ends the rows it marks (a
        stop string, a client gone).

        Each step yields (tokens [B], real [B] bool): `real` marks the rows for which the token is generated
        (False once a row has finished: its token is the pad id). With config.use_past (default) the prompt
        runs once and each step decodes one token from the KV cache; with use_past=False every step
        recomputes the whole sequence (slow; for checking)."""
        ids = _numpy(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        rows = ids.shape[0]
        per_row = list(settings) if isinstance(settings, (list, tuple)) else \
            [settings or GenerationSettings.from_config(self.config)] * rows
        if len(per_row) != rows:
            raise LlavaError(f"{len(per_row)} generation settings for a batch of {rows}")
        selectors = [TokenSelector(s) for s in per_row]
        limits = np.array([s.max_new_tokens for s in per_row])
        steps = int(limits.max())
        if self.config.use_past:
            logits = self.prefill(ids, pixel_values, attention_mask, reserve=steps)
            next_logits = self.decode
        else:
            check_budget(self.config, ids, attention_mask, steps)
            feats, n_images = self._features(pixel_values)
            running = {"ids": ids.astype(np.int64),
                       "mask": prepare_prompt(self.config, ids, attention_mask, n_images).mask}

            def next_logits(tokens):
                running["ids"] = np.concatenate([running["ids"], tokens[:, None]], 1)
                running["mask"] = np.concatenate([running["mask"], np.ones_like(tokens[:, None])], 1)
                return self._forward(running["ids"], running["mask"], feats, n_images)[:, -1]

            logits = self._forward(ids, running["mask"], feats, n_images)[:, -1]
        sequences = [list(map(int, row)) for row in ids]
        unfinished = np.ones(rows, dtype=bool)
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
            logits = next_logits(tokens)

    def generate(self, input_ids, pixel_values=None, attention_mask=None, settings=None, streamer=None):
        """`stream` (one settings for all rows, or one per row) collected: one list of new token ids per row, up to and including its first eos id.
        streamer.put(tokens [B]) after every step (pad id for finished rows), streamer.end() at the end."""
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
