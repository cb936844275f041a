"""LlavaModel: CLIP vision tower -> projector -> merge into token embeddings -> LLaMA with a static KV cache.

Parameter names are exactly llava-hf's checkpoint keys (`vision_tower.vision_model.*`,
`multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`, `language_model.lm_head.weight`), so a
converted checkpoint loads with the identity name map; the KV caches
(`language_model.model.layers.N.self_attn.{k,v}_cache`) are not checkpoint weights.

Execution is split into steps, each its own cell (compiled as one graph in GRAPH_MODE, or with
`mindspore.jit` in PyNative when `jit_steps` is set):

* vision   pixel_values [N, 3, H, W] -> image features [N, num_image_tokens, text_hidden]
* prefill  merged prompt embeddings [B, L] -> logits of the last position (or of all positions) and the
           prompt's keys/values. Prompts are left-padded (masked) to a multiple of `prefill_bucket`
           (default 8) so Graph mode compiles one prefill per bucket, not per length; attention runs in
           causal query blocks (llama_text.query_blocks)
* write    the prompt's keys/values -> cache positions 0..L-1; run by the first decode() after a prefill,
           so that the first token does not wait for the copy
* decode   one token per row [B, 1] -> logits [B, V]; writes cache position `slot`, attends over the whole
           (masked) cache; fixed shapes, so it compiles once per batch size
* forward  the full sequence without the cache -> logits [B, L, V] (reference / tests)

The host side (numpy) builds position ids and attention masks from the left padding, checks the image
token count, runs the Python decode loop, and asks generation.TokenSelector for each next token.

KV caches are allocated per batch size (the batch of a request) and kept in a pool, because a compiled
graph holds on to the cache Parameters it was built with. On CPU in PyNative mode, set
`pynative_synchronize=True` in the context: the asynchronous op queue's thread hand-offs cost ~1 ms per
dependent op on a small machine (tiny decode 8 -> 67 steps/s); GRAPH_MODE is the fast path.
"""
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from clip_vision import CLIPVisionModel, LlavaMultiModalProjector
from generation import GenerationSettings, TokenSelector
from llama_text import CACHE_NAMES, LlamaForCausalLM, cache_shape, is_cache_param
from llava_config import LlavaConfig
from llava_errors import LlavaError
from parallel import TensorParallel

_LIST_LIMIT = 10


def _short_list(names):
    names = list(names)
    shown = ", ".join(str(n) for n in names[:_LIST_LIMIT])
    return shown + (f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else "")


class _VisionStep(nn.Cell):
    """pixel_values [n, C, H, W] -> projected image features [n * num_image_tokens, text_hidden]."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model
        vc = model.config.vision_config
        self.tokens = vc.num_patches + 1
        self.dim = vc.hidden_size
        self.drop_cls = vc.vision_feature_select_strategy == "default"

    def construct(self, pixel_values):
        n = pixel_values.shape[0]
        feats = self.model.vision_tower(pixel_values, n)                         # n * tokens, Dv
        if self.drop_cls:
            feats = ops.reshape(ops.reshape(feats, (n, self.tokens, self.dim))[:, 1:, :],
                                (n * (self.tokens - 1), self.dim))
        return self.model.multi_modal_projector(feats)


class _PromptStep(nn.Cell):
    """Prompt embeddings with image features merged in, then the decoder (prefill or cache-free forward)."""

    def __init__(self, model, for_cache, last_only):
        super().__init__(auto_prefix=False)
        self.model = model
        self.for_cache = for_cache          # also return the keys/values, for the 'write' step
        self.last_only = last_only

    def construct(self, input_ids, image_features, merge_index, position_ids, mask, slots):
        b, l = input_ids.shape
        lm = self.model.language_model
        emb = lm.model.embed_tokens(ops.reshape(input_ids, (b * l,)))           # b*l, d
        table = ops.concat((emb, image_features), 0)
        merged = ops.gather(table, merge_index, 0)
        logits, kv = lm(merged, position_ids, mask, slots, b, l, False, self.last_only)
        return (logits, kv) if self.for_cache else logits


class _DecodeStep(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, position_ids, mask, slots):
        b = input_ids.shape[0]
        lm = self.model.language_model
        emb = lm.model.embed_tokens(ops.reshape(input_ids, (b,)))                # b, d
        return lm(emb, position_ids, mask, slots, b, 1, True, True)[0]


class _CacheWriteStep(nn.Cell):
    """A prompt's keys/values (k0, v0, k1, v1, ...) -> KV cache positions `slots` of every layer."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, slots, *kv):
        b, _, l, _ = kv[0].shape
        return self.model.language_model.model.write_cache(kv, slots, b, l)


@dataclass
class DecodeState:
    """Host-side bookkeeping between prefill and decode steps of one request."""
    batch: int
    prompt_length: int
    kv_mask: np.ndarray        # [B, seq_length] int32: 1 = cache position holds a real token of that row
    next_slot: int             # cache position the next decode step writes
    pending: tuple = None      # (slots, keys/values) of the prompt, written into the cache by the first decode

    @property
    def positions(self):
        """Rotary position of the token written at next_slot: number of real tokens before it."""
        return self.kv_mask[:, :self.next_slot].sum(-1).astype(np.int32)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class LlavaModel(nn.Cell):
    """LLaVA-1.5 for inference. Built by MindFormers as `LlavaModel(config=LlavaConfig)`."""

    def __init__(self, config=None, **kwargs):
        super().__init__()
        if config is None:
            config = LlavaConfig()
        elif not isinstance(config, LlavaConfig):
            config = LlavaConfig(**dict(config))
        self.config = config
        # tensor parallelism: the language model is split over the ranks (parallel.py); vision is replicated
        self.tp = kwargs.pop("tensor_parallel", None) or TensorParallel()
        self.vision_tower = CLIPVisionModel(config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = LlamaForCausalLM(config, self.tp)
        # Compile the steps with mindspore.jit when running in PyNative mode (GRAPH_MODE compiles anyway).
        self.jit_steps = bool(kwargs.pop("jit_steps", False))
        # Prompts are left-padded to a multiple of this many tokens (0 = exact length): one Graph-mode
        # compilation per bucket instead of per length, and CPU matmuls are no slower on 600 rows than on 595.
        self.prefill_bucket = int(kwargs.pop("prefill_bucket", 8))
        self.__dict__["_steps"] = {}
        self.__dict__["_cache_pool"] = {}

    # ------------------------------------------------------------------ MindFormers integration
    def can_generate(self):
        """Generation goes through LlavaModel.generate, not MindFormers' GenerationMixin."""
        return False

    def construct(self, input_ids, image_features, merge_index, position_ids, mask):
        """Cache-free full forward on prepared inputs -> float32 logits [B, L, V]. `forward()` prepares them
        from ids/pixels; input_ids [B, L] int32 with image tokens replaced by any valid id, image_features
        [M, D] (M >= 1), merge_index [B * L] int32 into concat(token embeddings, image features),
        position_ids [B, L] int32, mask [B, L, L] int32 (causal and padding)."""
        b, l = input_ids.shape
        lm = self.language_model
        emb = lm.model.embed_tokens(ops.reshape(input_ids, (b * l,)))
        merged = ops.gather(ops.concat((emb, image_features), 0), merge_index, 0)
        slots = ops.arange(0, l, dtype=ms.int32)
        return lm(merged, position_ids, mask, slots, b, l, False, False)[0]

    # ------------------------------------------------------------------ parameters
    def weight_parameters(self):
        """name -> Parameter for every checkpoint weight (KV caches excluded)."""
        return {p.name: p for p in self.get_parameters() if not is_cache_param(p.name)}

    def _attention_cells(self):
        return [layer.self_attn for layer in self.language_model.model.layers]

    def _cache_batch(self):
        rows = self._attention_cells()[0].k_cache.shape[0]
        return rows // cache_shape(self.config, 1, self.tp.world)[0]

    def _ensure_cache(self, batch):
        """Make the KV caches hold `batch` rows. Caches per batch size are kept (a compiled graph refers to
        the Parameter objects it was built with), so switching back reuses the same objects."""
        cells = self._attention_cells()
        current = self._cache_batch()
        pool = self._cache_pool
        if current not in pool:
            pool[current] = [(c.k_cache, c.v_cache) for c in cells]
        if current == batch:
            return
        if batch not in pool:
            dtype = cells[0].k_cache.dtype
            shape = cache_shape(self.config, batch, self.tp.world)
            pool[batch] = [tuple(Parameter(Tensor(np.zeros(shape, np.float32), dtype), name=old.name,
                                           requires_grad=False) for old in pair) for pair in pool[current]]
        for c, (k, v) in zip(cells, pool[batch]):
            c.k_cache = k
            c.v_cache = v

    def release_caches(self):
        """Drop KV caches of batch sizes other than the current one."""
        current = self._cache_batch()
        for b in [b for b in self._cache_pool if b != current]:
            del self._cache_pool[b]

    # ------------------------------------------------------------------ compiled steps
    def _step(self, kind):
        """The cell for one step kind; in PyNative mode with `jit_steps` its construct runs via mindspore.jit."""
        use_jit = self.jit_steps and ms.get_context("mode") == ms.PYNATIVE_MODE
        key = (kind, use_jit)
        steps = self._steps
        if key not in steps:
            if kind == "vision":
                cell = _VisionStep(self)
            elif kind == "prefill":
                cell = _PromptStep(self, for_cache=True, last_only=True)
            elif kind == "prefill_all":
                cell = _PromptStep(self, for_cache=True, last_only=False)
            elif kind == "forward":
                cell = _PromptStep(self, for_cache=False, last_only=False)
            elif kind == "decode":
                cell = _DecodeStep(self)
            elif kind == "write":
                cell = _CacheWriteStep(self)
            else:
                raise KeyError(kind)
            cell.set_train(False)
            if use_jit:
                cell.construct = ms.jit(cell.construct)
            steps[key] = cell
        return steps[key]

    # ------------------------------------------------------------------ host-side input checks
    def _check_pixels(self, pixel_values):
        vc = self.config.vision_config
        if isinstance(pixel_values, Tensor):
            shape = tuple(pixel_values.shape)
        else:
            pixel_values = np.asarray(pixel_values, dtype=np.float32)
            shape = pixel_values.shape
        want = (vc.num_channels, vc.image_size, vc.image_size)
        if len(shape) != 4 or tuple(shape[1:]) != want or shape[0] < 1:
            raise LlavaError(f"pixel_values must have shape [N, {want[0]}, {want[1]}, {want[2]}], "
                             f"got {list(shape)}")
        if isinstance(pixel_values, Tensor):
            return pixel_values.astype(ms.float32)
        return Tensor(pixel_values, ms.float32)

    def _prepare(self, input_ids, attention_mask, n_images, pad_to=None):
        cfg = self.config
        tc = cfg.text_config
        ids = np.asarray(input_ids.asnumpy() if isinstance(input_ids, Tensor) else input_ids)
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
            mask = np.asarray(attention_mask.asnumpy() if isinstance(attention_mask, Tensor) else attention_mask)
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
        if l > cfg.seq_length:
            raise LlavaError(f"prompt of {l} tokens is longer than seq_length={cfg.seq_length}")
        if pad_to is not None and pad_to > l:
            extra = pad_to - l
            ids = np.concatenate([np.full((b, extra), tc.pad_token_id, np.int64), ids], 1)
            mask = np.concatenate([np.zeros((b, extra), np.int32), mask], 1)
            l = pad_to
        image = ids == cfg.image_token_index
        n_tokens = int(image.sum())
        per_image = cfg.num_image_tokens
        if n_tokens != n_images * per_image:
            raise LlavaError(f"input_ids hold {n_tokens} image tokens (id {cfg.image_token_index}) but "
                             f"{n_images} image(s) need {n_images * per_image} "
                             f"({per_image} per image)")
        merge_index = np.arange(b * l, dtype=np.int32)
        flat = image.reshape(-1)
        merge_index[flat] = b * l + np.arange(n_tokens, dtype=np.int32)
        clean = np.where(image, 0, ids).astype(np.int32)
        position_ids = np.cumsum(mask, -1) - 1
        position_ids = np.where(mask == 0, 1, position_ids).astype(np.int32)
        causal = np.tril(np.ones((l, l), dtype=np.int32))
        attn = (causal[None, :, :] * mask[:, None, :]).astype(np.int32)       # b, l(query), l(key)
        return ids, mask, clean, merge_index, position_ids, attn

    def _image_features_or_dummy(self, pixel_values):
        """Flat image features [n * num_image_tokens, D] in compute dtype (one zero row without images)."""
        if pixel_values is None:
            d = self.config.text_config.hidden_size
            dtype = self.language_model.compute_dtype
            return Tensor(np.zeros((1, d), np.float32), ms.float32).astype(dtype), 0
        pix = self._check_pixels(pixel_values)
        return self._step("vision")(pix), pix.shape[0]

    # ------------------------------------------------------------------ public steps
    def get_image_features(self, pixel_values):
        """pixel_values [N, 3, H, W] -> Tensor [N, num_image_tokens, text_hidden] (after the projector)."""
        pix = self._check_pixels(pixel_values)
        feats = self._step("vision")(pix)
        return ops.reshape(feats, (pix.shape[0], self.config.num_image_tokens, self.config.text_config.hidden_size))

    def forward(self, input_ids, pixel_values=None, attention_mask=None):
        """Full sequence without the KV cache -> float32 numpy logits [B, L, V]."""
        feats, n_images = self._image_features_or_dummy(pixel_values)
        return self._forward_features(input_ids, attention_mask, feats, n_images)

    def _forward_features(self, input_ids, attention_mask, feats, n_images):
        _, _, clean, merge, pos, attn = self._prepare(input_ids, attention_mask, n_images)
        slots = Tensor(np.arange(clean.shape[1], dtype=np.int32))
        logits = self._step("forward")(Tensor(clean), feats, Tensor(merge), Tensor(pos), Tensor(attn), slots)
        return logits.asnumpy()

    def _bucket_length(self, length, reserve):
        """Prompt length rounded up to a multiple of prefill_bucket (extra left padding, masked out), so
        Graph mode compiles one prefill per bucket instead of one per prompt length."""
        bucket = self.prefill_bucket
        if not bucket:
            return length
        limit = self.config.seq_length - reserve
        return max(length, min(-(-length // bucket) * bucket, limit))

    def prefill(self, input_ids, pixel_values=None, attention_mask=None, return_all_logits=False,
                reserve=0):
        """Run the prompt. Returns (float32 numpy logits, DecodeState): logits [B, V] of the last position, or
        [B, L, V] with return_all_logits. The prompt's keys/values go into KV cache positions 0..L-1 with the
        first decode() of the returned state. `reserve` cache positions are kept free for decoding when the
        prompt is padded up to its bucket."""
        feats, n_images = self._image_features_or_dummy(pixel_values)
        length = np.shape(input_ids)[-1]
        padded = self._bucket_length(length, reserve)
        _, mask, clean, merge, pos, attn = self._prepare(input_ids, attention_mask, n_images, pad_to=padded)
        b, l = clean.shape
        self._ensure_cache(b)
        slots = Tensor(np.arange(l, dtype=np.int32))
        step = self._step("prefill_all" if return_all_logits else "prefill")
        logits, kv = step(Tensor(clean), feats, Tensor(merge), Tensor(pos), Tensor(attn), slots)
        logits = logits.asnumpy()
        if return_all_logits:
            logits = logits[:, l - length:]
        kv_mask = np.zeros((b, self.config.seq_length), np.int32)
        kv_mask[:, :l] = mask
        return logits, DecodeState(batch=b, prompt_length=l, kv_mask=kv_mask, next_slot=l, pending=(slots, kv))

    def decode(self, state, token_ids):
        """One decode step: token_ids [B] (the tokens just chosen) -> float32 numpy logits [B, V]. The first
        call after prefill() first writes the prompt's keys/values into the KV cache (the 'write' step)."""
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if tokens.shape[0] != state.batch:
            raise LlavaError(f"decode got {tokens.shape[0]} token(s) for a batch of {state.batch}")
        slot = state.next_slot
        if slot >= self.config.seq_length:
            raise LlavaError(f"the KV cache is full (seq_length={self.config.seq_length})")
        self._ensure_cache(state.batch)
        if state.pending is not None:
            slots, kv = state.pending
            self._step("write")(slots, *kv)
            state.pending = None
        pos = state.positions.reshape(state.batch, 1)
        state.kv_mask[:, slot] = 1
        mask = state.kv_mask.reshape(state.batch, 1, -1)
        logits = self._step("decode")(Tensor(tokens.reshape(-1, 1).astype(np.int32)), Tensor(pos),
                                      Tensor(mask), Tensor(np.array([slot], np.int32)))
        state.next_slot = slot + 1
        return logits.asnumpy()

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids, pixel_values=None, attention_mask=None, streamer=None, **overrides):
        """Generate after left-padded prompts whose `<image>` tokens are already expanded.

        input_ids [B, L] (pad id config.text_config.pad_token_id on the left), pixel_values [N, 3, H, W] for
        the N images in prompt order (row-major over the batch), attention_mask [B, L] (derived from the pad
        id when None). Generation settings come from the config, `overrides` (GenerationSettings fields)
        win. streamer.put(tokens [B]) after every step (pad id for finished rows), streamer.end() at the end.
        Returns one list of new token ids per row, up to and including its first EOS.

        With config.use_past (default) the prompt runs once and each step decodes one token from the KV
        cache; with use_past=False every step recomputes the whole sequence (slow; for checking)."""
        settings = GenerationSettings.from_config(self.config, **overrides)
        selector = TokenSelector(settings)
        ids = np.asarray(input_ids.asnumpy() if isinstance(input_ids, Tensor) else input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        length = ids.shape[-1]
        if length + settings.max_new_tokens > self.config.seq_length:
            raise LlavaError(f"prompt of {length} tokens + max_new_tokens={settings.max_new_tokens} exceeds "
                             f"seq_length={self.config.seq_length}")
        if self.config.use_past:
            logits, state = self.prefill(ids, pixel_values, attention_mask, reserve=settings.max_new_tokens)
            next_logits = lambda tokens: self.decode(state, tokens)                  # noqa: E731
        else:
            feats, n_images = self._image_features_or_dummy(pixel_values)
            mask = self._prepare(ids, attention_mask, n_images)[1]
            running = {"ids": ids.astype(np.int64), "mask": mask}

            def next_logits(tokens):
                running["ids"] = np.concatenate([running["ids"], tokens[:, None]], 1)
                running["mask"] = np.concatenate([running["mask"], np.ones_like(tokens[:, None])], 1)
                return self._forward_features(running["ids"], running["mask"], feats, n_images)[:, -1]

            logits = self._forward_features(ids, mask, feats, n_images)[:, -1]
        b = ids.shape[0]
        eos = np.asarray(settings.eos_token_id, dtype=np.int64)
        sequences = [list(map(int, row)) for row in ids]
        outputs = [[] for _ in range(b)]
        finished = np.zeros(b, dtype=bool)
        for step in range(settings.max_new_tokens):
            tokens = np.asarray(selector(logits, sequences), dtype=np.int64).reshape(b)
            tokens = np.where(finished, settings.pad_token_id, tokens)
            for row in range(b):
                sequences[row].append(int(tokens[row]))
                if not finished[row]:
                    outputs[row].append(int(tokens[row]))
            if streamer is not None:
                streamer.put(tokens.copy())
            finished |= np.isin(tokens, eos)
            if finished.all() or step + 1 == settings.max_new_tokens:
                break
            logits = next_logits(tokens)
        if streamer is not None:
            streamer.end()
        return outputs


from weights import load_weights  # noqa: E402,F401  (the strict loader is the weights layer's)

__all__ = ["LlavaModel", "DecodeState", "load_weights", "CACHE_NAMES"]
