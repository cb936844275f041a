"""LLaMA (Vicuna) decoder with a static KV cache, laid out like transformers' `LlamaForCausalLM` so that
parameter names equal llava-hf's `language_model.*` keys.

KV cache: one `k_cache` / `v_cache` Parameter per layer (`language_model.model.layers.N.self_attn.k_cache`),
2-D [batch * n_kv_heads * seq_length, head_dim], row (b * n_kv_heads + h) * seq_length + position. One
`ops.scatter_update` along axis 0 writes a step (prefill: positions 0..L-1; decode: one position) into the
Parameter in place in PyNative and Graph mode alike (its cost does not grow with the cache: measured 0.3-0.5
ms for a 1 MB and a 1 GB cache). Its result must be used: in Graph mode a ScatterUpdate whose output nothing
reads can be dropped and the Parameter keep its old values. Attention reads the cache as [batch, n_kv_heads,
seq_length, head_dim] — no per-step transpose of the whole cache (a position-first [seq, batch, heads,
head_dim] cache needs two full-cache transposes per layer and step) — and a decode step gathers the first T
positions of every row (T = the length of its mask, a bucket the engine picks from the positions in use), so
it reads T positions, not seq_length, and copies nothing else. They are not checkpoint weights
(`is_cache_param`).

Activations are 2-D [B * L, hidden]; LlamaModel takes `mask` and every layer below it the step arguments:
    mask          [B, L, T] int32    1 = query may attend key (causal + padding); T = L (fresh keys) or, for
                                     a decode step, the number of cache positions it attends over (the
                                     cache positions 0..T-1; T <= seq_length, one compiled graph per T)
    rope          (cos_q, sin_q, cos_k, sin_k)  rotary tables for the positions of the L new tokens, tiled
                                     to [B * L, heads, head_dim] for q and [B * L, n_kv_heads, head_dim] for k
                                     (rotary_tables); [B * L, head_dim] for the rotary kernel
    blocks        python tuple       query blocks ((start, end, keys), ...) from query_blocks(L, T)
    bias          tuple of tensors   per block the additive mask [B, H, end - start, keys] (softmax dtype),
                                     built once per step from `mask` (attention_bias); for a prompt on the
                                     prompt-attention kernel, (mask,) itself
    slots         [L] int32          cache positions the new keys/values go to
    b, l          python ints        batch and number of new tokens (graph constants)
    decode        python bool        write the new keys/values into the cache at `slots` and attend over
                                     cache positions 0..T-1; otherwise (a prompt) attend over the fresh keys

Every step also returns its keys/values. A prompt step does not write them into the cache itself:
`LlamaModel.write_cache` does that as a separate step, which the engine runs just before the first decode
step, so the prompt's logits (the first token) are out before the cache write is paid.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from llava_layers import Dtypes, Embedding, RMSNorm, cast, linear, native_float32, new_param
from lowbit_kernels import make_decode_attention, make_prompt_attention, make_rotary, make_swiglu
from parallel import AllReduceSum, GatherLastDim, TensorParallel

CACHE_NAMES = ("k_cache", "v_cache")
# checkpoint names of the weights whose per-rank shapes the cells read from weight_map (tp.shape)
_MODEL = "language_model.model."
_LAYER = _MODEL + "layers.{i}."


def is_cache_param(name):
    return name.rsplit(".", 1)[-1] in CACHE_NAMES


def cache_shape(config, batch, world=1):
    """Rows for this rank's KV heads (n_kv_heads / world under tensor parallelism)."""
    tc = config.text_config
    return (batch * (tc.n_kv_heads // world) * config.seq_length, tc.head_dim)


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


def last_rows(x, b, l):
    """[b * l, ...] -> [b, ...]: the last of every row's l positions."""
    rest = tuple(x.shape[1:])
    part = ops.slice(ops.reshape(x, (b, l) + rest), (0, l - 1) + (0,) * len(rest), (b, 1) + rest)
    return ops.reshape(part, (b,) + rest)


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
        self.seq_length = config.seq_length
        self.compute_dtype = dt.compute
        self.softmax_dtype = dt.softmax
        self.q_proj = linear(d, self.num_heads * self.head_dim, False, dt)
        self.k_proj = linear(d, self.n_kv * self.head_dim, False, dt)
        self.v_proj = linear(d, self.n_kv * self.head_dim, False, dt)
        self.o_proj = linear(self.num_heads * self.head_dim, d, False, dt)
        self.reduce = AllReduceSum(tp)
        shape = cache_shape(config, config.batch_size, tp.world)
        self.k_cache = new_param(shape, dt.compute, "zeros", name="k_cache", requires_grad=False)
        self.v_cache = new_param(shape, dt.compute, "zeros", name="v_cache", requires_grad=False)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        # A decode step on CPU in float32 reads the cache in place with the kernel (no Gather copy of the
        # positions in use: 4.3 ms -> 1.3 ms per 7B layer at 640 positions); elsewhere MindSpore's ops below.
        native = native_float32(dt.compute, dt.softmax)
        self.decode_attention = make_decode_attention() if native else None
        # Likewise a prompt's attention: one kernel call from the token-major q/k/v and the int32 mask, in place
        # of transposes, per-block score, bias and softmax tensors (7B layer, 600 tokens, op by op: ~0.1 s).
        self.prompt_attention = make_prompt_attention() if native else None
        # and rotary embedding: one call per q / k from untiled tables (LlamaModel.rotary_tables)
        self.rotary = make_rotary() if native else None
        self.cache_layout = Tensor(np.array([self.n_kv, self.seq_length], np.int32))

    def construct(self, x, rope, bias, blocks, slots, b, l, decode, last_only=False):
        """x [b * l, D]; rope from rotary_tables; bias/blocks per query block -> (y [b * l, D], keys, values)
        with this step's keys/values [b, l, n_kv, head_dim]. A decode step (`decode`) first writes them into
        the cache at `slots` and attends over cache positions 0..T-1 (T = blocks[0][2]); a prompt step attends over its own keys and
        leaves the cache alone (the caller writes them with `write_cache`). With `last_only` only the last
        position of each row queries (y [b, D]); rope's q tables, bias and blocks are then that position's."""
        cos_q, sin_q, cos_k, sin_k = rope                     # q's tables carry the 1/sqrt(head_dim) scale
        lq = 1 if last_only else l
        q = ops.reshape(self.q_proj(last_rows(x, b, l) if last_only else x), (b * lq, self.num_heads, self.head_dim))
        k = ops.reshape(self.k_proj(x), (b * l, self.n_kv, self.head_dim))
        v = ops.reshape(self.v_proj(x), (b, l, self.n_kv, self.head_dim))
        half = self.head_dim // 2
        if self.rotary is not None:
            q = self.rotary(q, cos_q, sin_q)
            k = self.rotary(k, cos_k, sin_k)
        else:
            q = apply_rotary(q, cos_q, sin_q, half)
            k = apply_rotary(k, cos_k, sin_k, half)
        keys = ops.reshape(k, (b, l, self.n_kv, self.head_dim))
        values = v
        if not decode and self.prompt_attention is not None:
            out = self.prompt_attention(q, k, ops.reshape(v, (b * l, self.n_kv, self.head_dim)), bias[0])
            return self.reduce(self.o_proj(ops.reshape(out, (b * lq, self.num_heads * self.head_dim)))), keys, values
        q = ops.reshape(q, (b, lq, self.num_heads, self.head_dim))
        if decode:
            k_all, v_all = self.write_cache(keys, values, slots, b, l)
            t = blocks[0][2]
            if l == 1 and self.decode_attention is not None:
                out = ops.reshape(self.decode_attention(ops.reshape(q, (b, self.num_heads, self.head_dim)),
                                                        k_all, v_all, bias[0], self.cache_layout),
                                  (b, self.num_heads * self.head_dim))
            else:
                out = self._attend(q, self._positions(k_all, b, t), self._positions(v_all, b, t), bias, blocks,
                                   b, l)
        else:
            out = self._attend(q, ops.transpose(keys, (0, 2, 1, 3)), ops.transpose(values, (0, 2, 1, 3)), bias,
                               blocks, b, lq)
        return self.reduce(self.o_proj(out)), keys, values

    def write_cache(self, keys, values, slots, b, l):
        """keys/values [b, l, n_kv, head_dim] -> cache positions `slots` [l] of every row; returns the updated
        caches. Rows (b * n_kv + h) * seq_length + slot, in the (b, l, h) order of keys/values."""
        base = ops.reshape(ops.arange(0, b * self.n_kv * self.seq_length, self.seq_length, dtype=ms.int32),
                           (b, 1, self.n_kv))
        rows = ops.reshape(base + ops.reshape(slots, (1, l, 1)), (b * l * self.n_kv,))
        k_all = ops.scatter_update(self.k_cache, rows, ops.reshape(keys, (b * self.n_kv * l, self.head_dim)))
        v_all = ops.scatter_update(self.v_cache, rows, ops.reshape(values, (b * self.n_kv * l, self.head_dim)))
        return k_all, v_all

    def _positions(self, cache, b, t):
        """cache [b * n_kv * seq_length, hd] -> its positions 0..t-1 [b, n_kv, t, hd], read with one Gather of
        those rows. Not a reshape to 4-D and a Slice: in Graph mode reshaping the Parameter copies the whole
        cache first (8 layers of 8 MB caches: 21 ms of CPU time against 8 ms for the Gather, T = 640 of 2048)."""
        base = ops.arange(0, b * self.n_kv * self.seq_length, self.seq_length, dtype=ms.int32)
        rows = ops.expand_dims(base, 1) + ops.expand_dims(ops.arange(0, t, dtype=ms.int32), 0)
        part = ops.gather(cache, ops.reshape(rows, (b * self.n_kv * t,)), 0)
        return ops.reshape(part, (b, self.n_kv, t, self.head_dim))

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

    def construct(self, x, rope, bias, blocks, slots, b, l, decode, last_only=False):
        """-> (hidden states, this step's keys, values) (LlamaAttention); with `last_only` the hidden states of
        the last position of each row only [b, D] (keys/values still cover all positions)."""
        attn, keys, values = self.self_attn(self.input_layernorm(x, b * l), rope, bias, blocks, slots, b, l,
                                            decode, last_only)
        x = (last_rows(x, b, l) if last_only else x) + attn
        return x + self.mlp(self.post_attention_layernorm(x, b if last_only else b * l)), keys, values


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
        self.seq_length = config.seq_length
        self.embed_tokens = Embedding(*tp.shape(_MODEL + "embed_tokens.weight", config), dt.param, dt.compute, tp)
        self.layers = nn.CellList([LlamaDecoderLayer(config, dt, tp) for _ in range(tc.num_layers)])
        self.norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps, dt.param, dt.norm, dt.compute)
        self.inv_freq = Tensor(inv_freq(tc.head_dim, tc.theta), ms.float32)

    def rotary_tables(self, position_ids, b, l, tile=True):
        """position_ids [b, l] -> (cos_q, sin_q, cos_k, sin_k): cos and sin of transformers' float32 angles,
        sin with its first half negated (swap_halves), q's tables times 1/sqrt(head_dim) (so neither q nor
        the scores need a scaling pass), tiled over the heads once per step because a multiply that
        broadcasts over the heads is several times slower on CPU than one of equal shapes; [b * l, head_dim]
        untiled with tile=False (the rotary kernel applies a token's tables to each of its heads)."""
        pos = ops.reshape(ops.cast(position_ids, ms.float32), (b * l, 1))
        freqs = pos * self.inv_freq                                              # b*l, hd/2
        emb = cast(ops.concat((freqs, freqs), -1), ms.float32, self.rotary_dtype)
        cos = cast(ops.cos(emb), self.rotary_dtype, ms.float32)
        sin = cast(ops.sin(emb), self.rotary_dtype, ms.float32) * self.sin_sign
        tables = ()
        for table, heads, scale in ((cos, self.local_heads, self.scale), (sin, self.local_heads, self.scale),
                                    (cos, self.local_kv_heads, 1.0), (sin, self.local_kv_heads, 1.0)):
            if scale != 1.0:
                table = table * scale
            if tile:
                table = ops.tile(ops.reshape(table, (b * l, 1, self.head_dim)), (1, heads, 1))
            tables = tables + (cast(table, ms.float32, self.compute_dtype),)
        return tables

    def construct(self, inputs_embeds, position_ids, mask, slots, b, l, decode, last_only=False, write=False):
        """inputs_embeds [b * l, D] -> (final-norm hidden states [b * l, D], (keys, values) of every layer
        flattened: k0, v0, k1, v1, ...). With `last_only` (a prompt whose logits are wanted for its last
        position only) the hidden states are [b, D]: the last layer then computes queries, attention output
        and MLP for the last position of each row only; the earlier layers and every layer's keys/values
        need all positions. With `write` (a prompt) each layer writes its keys/values into the cache at
        `slots` as soon as it has them and none are returned: run op by op, a layer's keys/values are then
        freed before the next layer runs."""
        rope = self.rotary_tables(position_ids, b, l, tile=self.layers[0].self_attn.rotary is None)
        blocks = query_blocks(l, mask.shape[2])              # T: l for a prompt, the cache bucket for decode
        # the prompt kernel (LlamaAttention.prompt_attention) reads the int32 mask itself
        native_prompt = not decode and self.layers[0].self_attn.prompt_attention is not None
        bias = (mask,) if native_prompt else attention_bias(mask, self.local_heads, self.softmax_dtype, blocks)
        h = inputs_embeds
        kv = ()
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            if last_only and i == last:
                one = ((0, 1, l),)
                last_rope = (last_rows(rope[0], b, l), last_rows(rope[1], b, l), rope[2], rope[3])
                last_mask = ops.slice(mask, (0, l - 1, 0), (b, 1, l))
                last_bias = (last_mask,) if native_prompt else \
                    attention_bias(last_mask, self.local_heads, self.softmax_dtype, one)
                h, keys, values = self.layers[i](h, last_rope, last_bias, one, slots, b, l, decode, True)
            else:
                h, keys, values = self.layers[i](h, rope, bias, blocks, slots, b, l, decode)
            if write:
                h = ops.depend(h, self.layers[i].self_attn.write_cache(keys, values, slots, b, l))
            else:
                kv = kv + (keys, values)
        return self.norm(h, b if last_only else b * l), kv

    def write_cache(self, kv, slots, b, l):
        """Write a prompt step's keys/values (construct's `kv`) into cache positions `slots` of every layer."""
        written = ()
        for i in range(len(self.layers)):
            written = written + self.layers[i].self_attn.write_cache(kv[2 * i], kv[2 * i + 1], slots, b, l)
        return ops.depend(slots, written)


class LlamaForCausalLM(nn.Cell):
    """`language_model`: model + lm_head. Returns float32 logits [b, V] (last position) or [b, l, V]."""

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
        self.lm_head = linear(tc.hidden_size, self.vocab_part, False, dt)
        self.gather = GatherLastDim(tp)

    def embed(self, input_ids):
        """input_ids [n] -> token embeddings [n, D] (vocabulary-split under tensor parallelism)."""
        return self.model.embed_tokens(input_ids)

    def write_cache(self, kv, slots, b, l):
        """A prompt step's keys/values -> KV cache positions `slots` of every layer (LlamaModel.write_cache)."""
        return self.model.write_cache(kv, slots, b, l)

    def cache_parameters(self):
        """[(k_cache, v_cache)] per layer: the Parameters the attention cells read and write."""
        return [(layer.self_attn.k_cache, layer.self_attn.v_cache) for layer in self.model.layers]

    def use_cache_parameters(self, pairs):
        """Make the attention cells hold these (k_cache, v_cache) Parameters (one pair per layer)."""
        for layer, (k, v) in zip(self.model.layers, pairs):
            layer.self_attn.k_cache = k
            layer.self_attn.v_cache = v

    def construct(self, inputs_embeds, position_ids, mask, slots, b, l, decode, last_only, write=False):
        """-> (logits, kv): kv as LlamaModel.construct returns it (unused outputs cost nothing in a graph);
        `write` as there."""
        if last_only:
            # a decode step (l == 1) is the last position already
            h, kv = self.model(inputs_embeds, position_ids, mask, slots, b, l, decode, l > 1, write)
            logits = cast(self.lm_head(h), self.compute_dtype, ms.float32)
            return self.gather(logits, b, self.vocab_part), kv
        h, kv = self.model(inputs_embeds, position_ids, mask, slots, b, l, decode)
        logits = self.gather(cast(self.lm_head(h), self.compute_dtype, ms.float32), b * l, self.vocab_part)
        return ops.reshape(logits, (b, l, self.vocab_size)), kv
