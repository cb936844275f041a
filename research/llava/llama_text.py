"""LLaMA (Vicuna) decoder over a paged KV pool, laid out like transformers' `LlamaForCausalLM` so that
parameter names equal llava-hf's `language_model.*` keys.

KV pool: one `k_cache` / `v_cache` Parameter per layer (`language_model.model.layers.N.self_attn.k_cache`),
2-D [blocks * n_kv_heads * block_size, head_dim]: position o of KV head g in block b is row
(b * n_kv_heads + g) * block_size + o (`cache_shape`). The engine's kv_pool.KVPool owns the blocks; a row
(a request in flight) is a block table and a length. One `ops.scatter_update` along axis 0 writes a step's
keys/values into the Parameter in place in PyNative and Graph mode alike (its cost does not grow with the
pool). Its result must be used: in Graph mode a ScatterUpdate whose output nothing reads can be dropped. They
are not checkpoint weights (`is_cache_param`).

Two ways through the decoder:
* `rows` (every cached run: Engine.run): the step's tokens of any rows, flattened to [n, hidden]: the prompt
  chunks of joining rows and one token of each decoding row side by side, so the weights are read once for
  all of them. Per token the host gives its rotary position, the pool row its keys/values go to, and (table
  row, L): it attends positions 0..L-1 of its own row through that row's block table. Shapes depend on n and
  the number of logits only (the attended lengths, positions and tables are data): one compiled graph per
  token bucket, never per length.
* `construct` (cache-free: Engine.forward, LlavaModel.construct): left-padded prompts [b, l] with a mask
  [b, l, l]; no pool.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from llava_layers import Dtypes, Embedding, RMSNorm, cast, linear, native_float32, new_param
from lowbit_kernels import make_paged_attention, make_prompt_attention, make_rotary, make_swiglu
from parallel import AllReduceSum, GatherLastDim, TensorParallel

CACHE_NAMES = ("k_cache", "v_cache")
# checkpoint names of the weights whose per-rank shapes the cells read from weight_map (tp.shape)
_MODEL = "language_model.model."
_LAYER = _MODEL + "layers.{i}."


def is_cache_param(name):
    return name.rsplit(".", 1)[-1] in CACHE_NAMES


def cache_shape(config, blocks, block_size, world=1):
    """A KV pool of `blocks` blocks of `block_size` positions for this rank's KV heads (n_kv_heads / world
    under tensor parallelism): position o of KV head g in block b is row (b * kv + g) * block_size + o."""
    tc = config.text_config
    return (blocks * (tc.n_kv_heads // world) * block_size, tc.head_dim)


def _mask_value(dtype):
    # large enough to zero a probability after exp, small enough that score + value stays finite
    return -3.0e4 if dtype == ms.float16 else -1.0e30


# Prompt steps split the queries into blocks of about this many tokens; block [s, e) attends to keys [0, e)
# only (later keys are causally masked anyway), which skips close to half of the score matrix.
QUERY_BLOCK = 128


def query_blocks(l, t):
    """Static ((start, end, keys), ...) per query block: a prompt step (t == l) in blocks of <= QUERY_BLOCK
    queries, each over keys [0, end); a decode step (t = the cache positions it reads) is one block."""
    if t != l or l <= QUERY_BLOCK:
        return ((0, l, t),)
    n = (l + QUERY_BLOCK - 1) // QUERY_BLOCK
    blocks = ()
    for i in range(n):
        end = (i + 1) * l // n
        blocks = blocks + ((i * l // n, end, end),)
    return blocks


def attention_bias(mask, heads, dtype, blocks):
    """mask [b, l, t] int32 (1 = attend) -> per query block (s, e, k) the additive bias [b, heads, e - s, k]:
    0 or a large negative value. Built at the full score shape once per step: on CPU, adding a bias that
    broadcasts over the heads costs several times the whole softmax, an add of equal shapes does not.
    Blocks are cut with ops.slice: Graph mode fuses a transpose followed by `x[..., :e, :]` into one
    StridedSlice that is ~7x slower than the transpose and a Slice."""
    bias = ops.expand_dims((1 - ops.cast(mask, dtype)) * _mask_value(dtype), 1)
    b = mask.shape[0]
    out = ()
    for start, end, keys in blocks:
        out = out + (ops.tile(ops.slice(bias, (0, 0, start, 0), (b, 1, end - start, keys)), (1, heads, 1, 1)),)
    return out


def swap_halves(x, half):
    """[x1, x2] -> [x2, x1] along the last axis (`half` = head_dim // 2, passed to avoid a shape query).
    transformers' rotate_half(x) * sin equals swap_halves(x) * concat(-sin1, sin2) (rotary_tables)."""
    return ops.concat((x[..., half:], x[..., :half]), -1)


def apply_rotary(x, cos, sin_signed, half):
    return x * cos + swap_halves(x, half) * sin_signed


def inv_freq(head_dim, theta):
    """transformers' default rope: 1 / theta ** (arange(0, dim, 2) / dim), in float32."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


class LlamaAttention(nn.Cell):
    """Multi-head attention with grouped KV heads; under tensor parallelism this rank's share of the heads
    (q/k/v column-split, o_proj row-split, partial outputs summed over the ranks)."""

    def __init__(self, config, dt, tp):
        super().__init__()
        tc = config.text_config
        d = tc.hidden_size
        self.head_dim = tc.head_dim
        self.num_heads = tp.shape(_LAYER + "self_attn.q_proj.weight", config)[0] // self.head_dim
        self.n_kv = tp.shape(_LAYER + "self_attn.k_proj.weight", config)[0] // self.head_dim
        self.groups = self.num_heads // self.n_kv
        self.compute_dtype = dt.compute
        self.softmax_dtype = dt.softmax
        self.q_proj = linear(d, self.num_heads * self.head_dim, False, dt)
        self.k_proj = linear(d, self.n_kv * self.head_dim, False, dt)
        self.v_proj = linear(d, self.n_kv * self.head_dim, False, dt)
        self.o_proj = linear(self.num_heads * self.head_dim, d, False, dt)
        self.reduce = AllReduceSum(tp)
        # A one-block placeholder: the engine installs its KV pool (use_cache) before any step compiles.
        shape = cache_shape(config, 1, 1, tp.world)
        self.k_cache = new_param(shape, dt.compute, "zeros", name="k_cache", requires_grad=False)
        self.v_cache = new_param(shape, dt.compute, "zeros", name="v_cache", requires_grad=False)
        self.use_cache(self.k_cache, self.v_cache, 1)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        native = native_float32(dt.compute, dt.softmax)
        # On CPU in float32 a row step's attention is one kernel call reading the pool through the block
        # tables (no Gather copy of the positions in use); elsewhere MindSpore's ops (paged_fallback).
        self.paged_attention = make_paged_attention() if native else None
        # A cache-free prompt's attention (Engine.forward): one kernel call from the token-major q/k/v and the
        # int32 mask, in place of transposes, per-block score, bias and softmax tensors.
        self.prompt_attention = make_prompt_attention() if native else None
        # and rotary embedding: one call per q / k from untiled tables (LlamaModel.rotary_tables)
        self.rotary = make_rotary() if native else None

    def use_cache(self, k_cache, v_cache, block_size):
        """Hold these pool Parameters ([blocks * n_kv * block_size, head_dim]) from now on."""
        self.k_cache, self.v_cache = k_cache, v_cache
        self.block_size = block_size
        self.layout = Tensor(np.array([self.n_kv, block_size], np.int32))
        # row offset of each KV head inside a block
        self.head_rows = Tensor((np.arange(self.n_kv) * block_size).astype(np.int32))

    def _rotate(self, x, cos, sin):
        if self.rotary is not None:
            return self.rotary(x, cos, sin)
        return apply_rotary(x, cos, sin, self.head_dim // 2)

    def _qkv(self, x, rope, n):
        cos_q, sin_q, cos_k, sin_k = rope                     # q's tables carry the 1/sqrt(head_dim) scale
        q = self._rotate(ops.reshape(self.q_proj(x), (n, self.num_heads, self.head_dim)), cos_q, sin_q)
        k = self._rotate(ops.reshape(self.k_proj(x), (n, self.n_kv, self.head_dim)), cos_k, sin_k)
        return q, k, ops.reshape(self.v_proj(x), (n, self.n_kv, self.head_dim))

    def construct(self, x, rope, bias, blocks, b, l):
        """The cache-free path (a whole prompt, Engine.forward): x [b * l, D]; rope from rotary_tables;
        bias/blocks per query block -> y [b * l, D]."""
        q, k, v = self._qkv(x, rope, b * l)
        if self.prompt_attention is not None:
            out = self.prompt_attention(q, k, v, bias[0])
            return self.reduce(self.o_proj(ops.reshape(out, (b * l, self.num_heads * self.head_dim))))
        q = ops.reshape(q, (b, l, self.num_heads, self.head_dim))
        keys = ops.transpose(ops.reshape(k, (b, l, self.n_kv, self.head_dim)), (0, 2, 1, 3))
        values = ops.transpose(ops.reshape(v, (b, l, self.n_kv, self.head_dim)), (0, 2, 1, 3))
        return self.reduce(self.o_proj(self._attend(q, keys, values, bias, blocks, b, l)))

    def rows(self, x, rope, step, n, keep=None, m=None):
        """A row step (Engine.run): x [n, D], the step's tokens of any rows; `step` = (write [n] int32: each
        token's pool row base (block * n_kv * block_size + offset), tokens [n, 2] int32: (table row, positions
        attended), tables [R, MB] int32: each table row's blocks, extra: the fallback's (gather rows, bias)).
        Writes every token's keys/values into the pool first, then each token attends over positions
        0..L-1 of its own row (its own and the earlier tokens of its chunk included) -> y [n, D]. With `keep`
        ([m] int32) only those tokens query (the last layer: only the tokens whose logits are wanted) ->
        y [m, D]; every token's keys/values are still written."""
        write, tokens, tables, extra = step
        cos_q, sin_q, cos_k, sin_k = rope                     # q's tables carry the 1/sqrt(head_dim) scale
        xq, nq = x, n
        if keep is not None:
            xq, nq = ops.gather(x, keep, 0), m
            cos_q, sin_q, tokens = ops.gather(cos_q, keep, 0), ops.gather(sin_q, keep, 0), ops.gather(tokens, keep, 0)
            if extra is not None:
                extra = (extra[0], ops.gather(extra[1], keep, 0))
        q = self._rotate(ops.reshape(self.q_proj(xq), (nq, self.num_heads, self.head_dim)), cos_q, sin_q)
        k = self._rotate(ops.reshape(self.k_proj(x), (n, self.n_kv, self.head_dim)), cos_k, sin_k)
        v = ops.reshape(self.v_proj(x), (n, self.n_kv, self.head_dim))
        rows = ops.reshape(ops.expand_dims(write, 1) + ops.expand_dims(self.head_rows, 0), (n * self.n_kv,))
        # the scatter's results must be read (a ScatterUpdate whose output is unused can be dropped in Graph
        # mode): the attention reads the pool through them
        k_all = ops.scatter_update(self.k_cache, rows, ops.reshape(k, (n * self.n_kv, self.head_dim)))
        v_all = ops.scatter_update(self.v_cache, rows, ops.reshape(v, (n * self.n_kv, self.head_dim)))
        if self.paged_attention is not None:
            out = self.paged_attention(q, k_all, v_all, tokens, tables, self.layout)
        else:
            out = self._paged_fallback(q, k_all, v_all, extra, nq)
        return self.reduce(self.o_proj(ops.reshape(out, (nq, self.num_heads * self.head_dim))))

    def _paged_fallback(self, q, k_all, v_all, extra, n):
        """MindSpore's ops for a row step: every table row's positions are gathered (gather_rows [n_kv * W],
        KV head major, W = table rows * positions per row: LlamaModel.row_inputs) and each token scores all W,
        its bias [n, W] keeping its own row's first L. Reads the whole pool per layer: the slow path, for
        devices and dtypes without the kernel."""
        gather_rows, bias = extra
        w = bias.shape[-1]
        keys = ops.reshape(ops.gather(k_all, gather_rows, 0), (self.n_kv, w, self.head_dim))
        values = ops.reshape(ops.gather(v_all, gather_rows, 0), (self.n_kv, w, self.head_dim))
        heads = ops.transpose(ops.reshape(q, (n, self.n_kv, self.groups, self.head_dim)), (1, 0, 2, 3))
        heads = ops.reshape(heads, (self.n_kv, n * self.groups, self.head_dim))
        scores = cast(self.bmm_t(heads, keys), self.compute_dtype, self.softmax_dtype)
        scores = ops.reshape(scores, (self.n_kv, n, self.groups, w)) + ops.reshape(bias, (1, n, 1, w))
        probs = ops.reshape(cast(ops.softmax(scores, -1), self.softmax_dtype, self.compute_dtype),
                            (self.n_kv, n * self.groups, w))
        out = ops.reshape(self.bmm(probs, values), (self.n_kv, n, self.groups, self.head_dim))
        return ops.transpose(out, (1, 0, 2, 3))

    def _attend(self, q, keys, values, bias, blocks, b, l):
        """q [b, l, H, hd] (scaled); keys/values [b, kv, t, hd]; bias and blocks from attention_bias and
        query_blocks -> [b * l, H * hd]."""
        # grouped-query attention without repeating K/V: head h uses kv head h // groups
        heads = ops.reshape(ops.transpose(q, (0, 2, 1, 3)), (b, self.n_kv, self.groups, l, self.head_dim))
        outs = ()
        for i in range(len(blocks)):
            start, end, t = blocks[i]
            n = end - start
            qb = heads if n == l else ops.slice(heads, (0, 0, 0, start, 0),
                                                (b, self.n_kv, self.groups, n, self.head_dim))
            qb = ops.reshape(qb, (b, self.n_kv, self.groups * n, self.head_dim))
            kb, vb = keys, values
            if len(blocks) > 1:
                kb = ops.slice(keys, (0, 0, 0, 0), (b, self.n_kv, t, self.head_dim))
                vb = ops.slice(values, (0, 0, 0, 0), (b, self.n_kv, t, self.head_dim))
            scores = cast(self.bmm_t(qb, kb), self.compute_dtype, self.softmax_dtype)
            scores = ops.reshape(scores, (b, self.num_heads, n, t))
            probs = ops.softmax(scores + bias[i], -1)
            probs = ops.reshape(cast(probs, self.softmax_dtype, self.compute_dtype),
                                (b, self.n_kv, self.groups * n, t))
            outs = outs + (ops.reshape(self.bmm(probs, vb), (b, self.num_heads, n, self.head_dim)),)
        out = outs[0] if len(outs) == 1 else ops.concat(outs, 2)                # b, H, l, hd
        return ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b * l, self.num_heads * self.head_dim))


class LlamaMLP(nn.Cell):
    """SwiGLU; under tensor parallelism gate/up are column-split, down row-split, outputs summed."""

    def __init__(self, config, dt, tp):
        super().__init__()
        tc = config.text_config
        inter = tp.shape(_LAYER + "mlp.gate_proj.weight", config)[0]
        self.gate_proj = linear(tc.hidden_size, inter, False, dt)
        self.up_proj = linear(tc.hidden_size, inter, False, dt)
        self.down_proj = linear(inter, tc.hidden_size, False, dt)
        self.reduce = AllReduceSum(tp)
        self.swiglu = make_swiglu() if native_float32(dt.compute) else None

    def construct(self, x):
        if self.swiglu is not None:
            return self.reduce(self.down_proj(self.swiglu(self.gate_proj(x), self.up_proj(x))))
        return self.reduce(self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x)))


class LlamaDecoderLayer(nn.Cell):
    def __init__(self, config, dt, tp):
        super().__init__()
        tc = config.text_config
        self.self_attn = LlamaAttention(config, dt, tp)
        self.mlp = LlamaMLP(config, dt, tp)
        self.input_layernorm = RMSNorm(tc.hidden_size, tc.rms_norm_eps, dt.param, dt.norm, dt.compute)
        self.post_attention_layernorm = RMSNorm(tc.hidden_size, tc.rms_norm_eps, dt.param, dt.norm,
                                                dt.compute)

    def construct(self, x, rope, bias, blocks, b, l):
        """The cache-free path: x [b * l, D] -> [b * l, D]."""
        x = x + self.self_attn(self.input_layernorm(x, b * l), rope, bias, blocks, b, l)
        return x + self.mlp(self.post_attention_layernorm(x, b * l))

    def rows(self, x, rope, step, n, keep=None, m=None):
        """A row step (LlamaAttention.rows): x [n, D] -> [n, D], or [m, D] for the `keep` tokens only."""
        attn = self.self_attn.rows(self.input_layernorm(x, n), rope, step, n, keep, m)
        if keep is not None:
            x, n = ops.gather(x, keep, 0), m
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x, n))


class LlamaModel(nn.Cell):
    """`language_model.model`: embed_tokens, layers, norm (+ rotary tables computed from position ids)."""

    def __init__(self, config, dt, tp):
        super().__init__()
        tc = config.text_config
        self.head_dim = tc.head_dim
        self.compute_dtype = dt.compute
        self.rotary_dtype = dt.rotary
        self.softmax_dtype = dt.softmax
        self.local_heads = tp.shape(_LAYER + "self_attn.q_proj.weight", config)[0] // tc.head_dim
        self.local_kv_heads = tp.shape(_LAYER + "self_attn.k_proj.weight", config)[0] // tc.head_dim
        self.scale = tc.head_dim ** -0.5
        half = tc.head_dim // 2
        self.sin_sign = Tensor(np.concatenate([-np.ones(half), np.ones(half)]).astype(np.float32))
        self.embed_tokens = Embedding(*tp.shape(_MODEL + "embed_tokens.weight", config), dt.param, dt.compute, tp)
        self.layers = nn.CellList([LlamaDecoderLayer(config, dt, tp) for _ in range(tc.num_layers)])
        self.norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps, dt.param, dt.norm, dt.compute)
        self.inv_freq = Tensor(inv_freq(tc.head_dim, tc.theta), ms.float32)

    def rotary_tables(self, position_ids, n, tile=True):
        """position_ids (n values) -> (cos_q, sin_q, cos_k, sin_k): cos and sin of transformers' float32
        angles, sin with its first half negated (swap_halves), q's tables times 1/sqrt(head_dim) (so neither q
        nor the scores need a scaling pass), tiled over the heads once per step because a multiply that
        broadcasts over the heads is several times slower on CPU than one of equal shapes; [n, head_dim]
        untiled with tile=False (the rotary kernel applies a token's tables to each of its heads)."""
        pos = ops.reshape(ops.cast(position_ids, ms.float32), (n, 1))
        freqs = pos * self.inv_freq                                              # n, hd/2
        emb = cast(ops.concat((freqs, freqs), -1), ms.float32, self.rotary_dtype)
        cos = cast(ops.cos(emb), self.rotary_dtype, ms.float32)
        sin = cast(ops.sin(emb), self.rotary_dtype, ms.float32) * self.sin_sign
        tables = ()
        for table, heads, scale in ((cos, self.local_heads, self.scale), (sin, self.local_heads, self.scale),
                                    (cos, self.local_kv_heads, 1.0), (sin, self.local_kv_heads, 1.0)):
            if scale != 1.0:
                table = table * scale
            if tile:
                table = ops.tile(ops.reshape(table, (n, 1, self.head_dim)), (1, heads, 1))
            tables = tables + (cast(table, ms.float32, self.compute_dtype),)
        return tables

    def construct(self, inputs_embeds, position_ids, mask, b, l):
        """The cache-free path (Engine.forward, LlavaModel.construct): inputs_embeds [b * l, D], position_ids
        [b, l], mask [b, l, l] int32 (1 = attend) -> final-norm hidden states [b * l, D]."""
        attn = self.layers[0].self_attn
        rope = self.rotary_tables(position_ids, b * l, tile=attn.rotary is None)
        blocks = query_blocks(l, l)
        # the prompt kernel (LlamaAttention.prompt_attention) reads the int32 mask itself
        bias = (mask,) if attn.prompt_attention is not None else \
            attention_bias(mask, self.local_heads, self.softmax_dtype, blocks)
        h = inputs_embeds
        for i in range(len(self.layers)):
            h = self.layers[i](h, rope, bias, blocks, b, l)
        return self.norm(h, b * l)

    def rows(self, inputs_embeds, positions, write, tokens, tables, logit_index, n, m):
        """A row step: inputs_embeds [n, D] of the step's tokens, positions [n] int32 (their rotary positions =
        their places in their rows), write / tokens / tables as LlamaAttention.rows takes them, logit_index [m]
        int32: the tokens whose hidden states are returned -> final-norm hidden states [m, D]."""
        attn = self.layers[0].self_attn
        rope = self.rotary_tables(positions, n, tile=attn.rotary is None)
        extra = None if attn.paged_attention is not None else self._fallback_inputs(tokens, tables, n)
        step = (write, tokens, tables, extra)
        h = inputs_embeds
        last = len(self.layers) - 1
        for i in range(last):
            h = self.layers[i].rows(h, rope, step, n)
        # the last layer: queries, attention output and MLP for the logit tokens only (a prompt chunk's other
        # tokens need only their keys/values: ~1/layers of a prefill's matmuls saved)
        h = self.layers[last].rows(h, rope, step, n, logit_index, m)
        return self.norm(h, m)

    def _fallback_inputs(self, tokens, tables, n):
        """For LlamaAttention._paged_fallback, once per step: the pool rows of every table row's positions
        [n_kv * R * P] (KV head major; P = blocks per row * block size) and each token's additive bias [n, R * P]
        (0 on its own row's positions 0..L-1, a large negative value elsewhere)."""
        attn = self.layers[0].self_attn
        kv, bs = attn.n_kv, attn.block_size
        r, mb = tables.shape
        p = mb * bs
        g = ops.reshape(ops.arange(0, kv, dtype=ms.int32), (kv, 1, 1, 1))
        blk = ops.reshape(tables, (1, r, mb, 1))
        off = ops.reshape(ops.arange(0, bs, dtype=ms.int32), (1, 1, 1, bs))
        gather_rows = ops.reshape((blk * kv + g) * bs + off, (kv * r * p,))
        col = ops.arange(0, r * p, dtype=ms.int32)
        own = ops.equal(ops.expand_dims(col // p, 0), tokens[:, 0:1])
        seen = ops.less(ops.expand_dims(col % p, 0), tokens[:, 1:2])
        keep = ops.cast(ops.logical_and(own, seen), self.softmax_dtype)
        return gather_rows, (1 - keep) * _mask_value(self.softmax_dtype)


class LlamaForCausalLM(nn.Cell):
    """`language_model`: model + lm_head. Returns float32 logits [b, l, V] (cache-free) or [m, V] (rows)."""

    def __init__(self, config, tp=None):
        super().__init__()
        tp = tp or TensorParallel()
        dt = Dtypes(config)
        tc = config.text_config
        self.hidden_size = tc.hidden_size
        self.vocab_size = tc.vocab_size
        self.vocab_part = tp.shape("language_model.lm_head.weight", config)[0]
        self.compute_dtype = dt.compute
        self.model = LlamaModel(config, dt, tp)
        # vocabulary-split under tensor parallelism; the logits of all ranks are gathered
        self.lm_head = linear(tc.hidden_size, self.vocab_part, False, dt, head=True)
        self.gather = GatherLastDim(tp)

    def embed(self, input_ids):
        """input_ids [n] -> token embeddings [n, D] (vocabulary-split under tensor parallelism)."""
        return self.model.embed_tokens(input_ids)

    def cache_parameters(self):
        """[(k_cache, v_cache)] per layer: the Parameters the attention cells read and write."""
        return [(layer.self_attn.k_cache, layer.self_attn.v_cache) for layer in self.model.layers]

    def use_cache_parameters(self, pairs, block_size):
        """Make the attention cells hold these (k_cache, v_cache) pool Parameters (one pair per layer)."""
        for layer, (k, v) in zip(self.model.layers, pairs):
            layer.self_attn.use_cache(k, v, block_size)

    def _logits(self, h, rows):
        return self.gather(cast(self.lm_head(h), self.compute_dtype, ms.float32), rows, self.vocab_part)

    def construct(self, inputs_embeds, position_ids, mask, b, l):
        """The cache-free path -> logits [b, l, V]."""
        h = self.model(inputs_embeds, position_ids, mask, b, l)
        return ops.reshape(self._logits(h, b * l), (b, l, self.vocab_size))

    def rows(self, inputs_embeds, positions, write, tokens, tables, logit_index, n, m):
        """A row step (LlamaModel.rows) -> float32 logits [m, V] of the logit_index tokens."""
        h = self.model.rows(inputs_embeds, positions, write, tokens, tables, logit_index, n, m)
        return self._logits(h, m)
