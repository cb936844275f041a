"""LLaMA (Vicuna) decoder with a static KV cache, laid out like transformers' `LlamaForCausalLM` so that
parameter names equal llava-hf's `language_model.*` keys.

KV cache: one `k_cache` / `v_cache` Parameter per layer (`language_model.model.layers.N.self_attn.k_cache`),
shape [seq_length, batch, n_kv_heads, head_dim] — position first, so one `ops.scatter_update` along axis 0
writes a step (prefill: slots 0..L-1; decode: one slot) in PyNative and Graph mode alike. They are not
checkpoint weights (`is_cache_param`).

Every text cell's construct takes the same step arguments:
    cos, sin      [B, L, head_dim]   rotary tables for the positions of the L new tokens
    mask          [B, L, T] int32    1 = query may attend key (causal + padding); T = L (fresh keys) or
                                     seq_length (the cache)
    slots         [L] int32          cache rows the new keys/values go to
    write_cache   python bool        write the new keys/values into the cache
    read_cache    python bool        attend over the whole cache (decode) instead of the fresh keys
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from llava_layers import Dtypes, Embedding, Linear, RMSNorm, new_param

CACHE_NAMES = ("k_cache", "v_cache")


def is_cache_param(name):
    return name.rsplit(".", 1)[-1] in CACHE_NAMES


def _mask_value(dtype):
    # large enough to zero a probability after exp, small enough that score + value stays finite
    return -3.0e4 if dtype == ms.float16 else -1.0e30


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), -1)


def inv_freq(head_dim, theta):
    """transformers' default rope: 1 / theta ** (arange(0, dim, 2) / dim), in float32."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


class LlamaAttention(nn.Cell):
    def __init__(self, config, dt):
        super().__init__()
        tc = config.text_config
        d = tc.hidden_size
        self.num_heads = tc.num_heads
        self.n_kv = tc.n_kv_heads
        self.head_dim = tc.head_dim
        self.groups = self.num_heads // self.n_kv
        self.scale = self.head_dim ** -0.5
        self.compute_dtype = dt.compute
        self.softmax_dtype = dt.softmax
        self.mask_value = _mask_value(dt.softmax)
        self.q_proj = Linear(d, self.num_heads * self.head_dim, False, dt.param, dt.compute)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, False, dt.param, dt.compute)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, False, dt.param, dt.compute)
        self.o_proj = Linear(self.num_heads * self.head_dim, d, False, dt.param, dt.compute)
        shape = (config.seq_length, config.batch_size, self.n_kv, self.head_dim)
        self.k_cache = new_param(shape, dt.compute, "zeros", name="k_cache", requires_grad=False)
        self.v_cache = new_param(shape, dt.compute, "zeros", name="v_cache", requires_grad=False)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)

    def construct(self, x, cos, sin, mask, slots, write_cache, read_cache):
        b, l, _ = x.shape
        q = ops.reshape(self.q_proj(x), (b, l, self.num_heads, self.head_dim))
        k = ops.reshape(self.k_proj(x), (b, l, self.n_kv, self.head_dim))
        v = ops.reshape(self.v_proj(x), (b, l, self.n_kv, self.head_dim))
        cos4 = ops.expand_dims(cos, 2)
        sin4 = ops.expand_dims(sin, 2)
        q = q * cos4 + rotate_half(q) * sin4
        k = k * cos4 + rotate_half(k) * sin4

        fresh_k = ops.transpose(k, (0, 2, 1, 3))                               # b, kv, l, hd
        fresh_v = ops.transpose(v, (0, 2, 1, 3))
        if write_cache:
            k_all = ops.scatter_update(self.k_cache, slots, ops.transpose(k, (1, 0, 2, 3)))
            v_all = ops.scatter_update(self.v_cache, slots, ops.transpose(v, (1, 0, 2, 3)))
            if read_cache:
                out = self._attend(q, ops.transpose(k_all, (1, 2, 0, 3)), ops.transpose(v_all, (1, 2, 0, 3)),
                                   mask)
            else:
                out = self._attend(q, fresh_k, fresh_v, mask)
            out = ops.depend(out, k_all)
            out = ops.depend(out, v_all)
        else:
            out = self._attend(q, fresh_k, fresh_v, mask)
        return self.o_proj(out)

    def _attend(self, q, keys, values, mask):
        """q [b, l, H, hd]; keys/values [b, kv, T, hd]; mask [b, l, T] -> [b, l, H * hd]."""
        b, l = q.shape[0], q.shape[1]
        t = keys.shape[2]
        # grouped-query attention without repeating K/V: head h uses kv head h // groups
        qg = ops.reshape(ops.transpose(q, (0, 2, 1, 3)), (b, self.n_kv, self.groups * l, self.head_dim))
        scores = ops.cast(self.bmm_t(qg, keys), self.softmax_dtype) * self.scale
        scores = ops.reshape(scores, (b, self.n_kv, self.groups, l, t))
        bias = (1 - ops.cast(ops.reshape(mask, (b, 1, 1, l, t)), self.softmax_dtype)) * self.mask_value
        probs = ops.softmax(scores + bias, -1)
        probs = ops.reshape(ops.cast(probs, self.compute_dtype), (b, self.n_kv, self.groups * l, t))
        out = self.bmm(probs, values)                                   # b, kv, G*l, hd
        out = ops.reshape(out, (b, self.num_heads, l, self.head_dim))
        return ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, l, self.num_heads * self.head_dim))


class LlamaMLP(nn.Cell):
    def __init__(self, config, dt):
        super().__init__()
        tc = config.text_config
        self.gate_proj = Linear(tc.hidden_size, tc.intermediate_size, False, dt.param, dt.compute)
        self.up_proj = Linear(tc.hidden_size, tc.intermediate_size, False, dt.param, dt.compute)
        self.down_proj = Linear(tc.intermediate_size, tc.hidden_size, False, dt.param, dt.compute)

    def construct(self, x):
        gate = self.gate_proj(x)
        return self.down_proj(gate * ops.sigmoid(gate) * self.up_proj(x))


class LlamaDecoderLayer(nn.Cell):
    def __init__(self, config, dt):
        super().__init__()
        tc = config.text_config
        self.self_attn = LlamaAttention(config, dt)
        self.mlp = LlamaMLP(config, dt)
        self.input_layernorm = RMSNorm(tc.hidden_size, tc.rms_norm_eps, dt.param, dt.norm, dt.compute)
        self.post_attention_layernorm = RMSNorm(tc.hidden_size, tc.rms_norm_eps, dt.param, dt.norm,
                                                dt.compute)

    def construct(self, x, cos, sin, mask, slots, write_cache, read_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, slots, write_cache, read_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Cell):
    """`language_model.model`: embed_tokens, layers, norm (+ rotary tables computed from position ids)."""

    def __init__(self, config, dt):
        super().__init__()
        tc = config.text_config
        self.compute_dtype = dt.compute
        self.rotary_dtype = dt.rotary
        self.embed_tokens = Embedding(tc.vocab_size, tc.hidden_size, dt.param, dt.compute)
        self.layers = nn.CellList([LlamaDecoderLayer(config, dt) for _ in range(tc.num_layers)])
        self.norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps, dt.param, dt.norm, dt.compute)
        self.inv_freq = Tensor(inv_freq(tc.head_dim, tc.theta), ms.float32)

    def rotary(self, position_ids):
        freqs = ops.expand_dims(ops.cast(position_ids, ms.float32), -1) * self.inv_freq  # b, l, hd/2
        emb = ops.cast(ops.concat((freqs, freqs), -1), self.rotary_dtype)
        return ops.cast(ops.cos(emb), self.compute_dtype), ops.cast(ops.sin(emb), self.compute_dtype)

    def construct(self, inputs_embeds, position_ids, mask, slots, write_cache, read_cache):
        cos, sin = self.rotary(position_ids)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, mask, slots, write_cache, read_cache)
        return self.norm(h)


class LlamaForCausalLM(nn.Cell):
    """`language_model`: model + lm_head. Returns float32 logits (last position only if last_only)."""

    def __init__(self, config):
        super().__init__()
        dt = Dtypes(config)
        tc = config.text_config
        self.model = LlamaModel(config, dt)
        self.lm_head = Linear(tc.hidden_size, tc.vocab_size, False, dt.param, dt.compute)

    def construct(self, inputs_embeds, position_ids, mask, slots, write_cache, read_cache, last_only):
        h = self.model(inputs_embeds, position_ids, mask, slots, write_cache, read_cache)
        if last_only:
            h = h[:, -1, :]
        return ops.cast(self.lm_head(h), ms.float32)
