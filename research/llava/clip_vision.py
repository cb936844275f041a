"""CLIP ViT vision tower, laid out like transformers' `CLIPVisionModel` so parameter names equal llava-hf's
`vision_tower.vision_model.*` keys.

Every layer and `post_layernorm` exist as parameters (the checkpoint has them), but the forward pass stops
after the layer that `vision_feature_layer` selects; LLaVA never uses the pooled output.
"""
import mindspore as ms
from mindspore import nn, ops

from llava_layers import Dtypes, LayerNorm, Linear, cast, gelu, linear, native_float32, new_param, quick_gelu
from lowbit_kernels import make_prompt_attention


class PatchEmbedding(nn.Cell):
    """Conv2d(C, D, kernel=stride=P, bias=False) as one matmul over non-overlapping patches."""

    def __init__(self, channels, dim, patch, grid, dt):
        super().__init__()
        self.channels, self.dim, self.patch, self.grid = channels, dim, patch, grid
        self.param_dtype = dt.param
        self.compute_dtype = dt.compute
        self.weight = new_param((dim, channels, patch, patch), dt.param, "normal", name="weight")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, pixel_values, n):
        """pixel_values [n, C, H, W] (float32) -> [n * grid * grid, D]."""
        c, p, g = self.channels, self.patch, self.grid
        x = cast(pixel_values, ms.float32, self.compute_dtype)
        x = ops.reshape(x, (n, c, g, p, g, p))
        x = ops.transpose(x, (0, 2, 4, 1, 3, 5))            # n, gh, gw, c, p, p  (row-major patches)
        x = ops.reshape(x, (n * g * g, c * p * p))
        w2 = ops.reshape(cast(self.weight, self.param_dtype, self.compute_dtype), (self.dim, c * p * p))
        return self.matmul(x, w2)


class _PositionEmbedding(nn.Cell):
    def __init__(self, num, dim, dt):
        super().__init__()
        self.weight = new_param((num, dim), dt.param, "normal", name="weight")


class CLIPVisionEmbeddings(nn.Cell):
    def __init__(self, vc, dt):
        super().__init__()
        self.dim = vc.hidden_size
        self.tokens = vc.num_patches + 1
        self.param_dtype = dt.param
        self.compute_dtype = dt.compute
        self.class_embedding = new_param((vc.hidden_size,), dt.param, "normal", name="class_embedding")
        self.patch_embedding = PatchEmbedding(vc.num_channels, vc.hidden_size, vc.patch_size,
                                              vc.image_size // vc.patch_size, dt)
        self.position_embedding = _PositionEmbedding(vc.num_patches + 1, vc.hidden_size, dt)

    def construct(self, pixel_values, n):
        """-> [n * (1 + num_patches), D]: CLS first, then the patches, plus position embeddings."""
        d = self.dim
        patches = ops.reshape(self.patch_embedding(pixel_values, n), (n, self.tokens - 1, d))
        cls = cast(self.class_embedding, self.param_dtype, self.compute_dtype)
        cls = ops.broadcast_to(ops.reshape(cls, (1, 1, d)), (n, 1, d))
        x = ops.concat((cls, patches), 1)
        x = x + cast(self.position_embedding.weight, self.param_dtype, self.compute_dtype)
        return ops.reshape(x, (n * self.tokens, d))


class CLIPAttention(nn.Cell):
    def __init__(self, vc, dt):
        super().__init__()
        d = vc.hidden_size
        self.dim = d
        self.num_heads = vc.num_attention_heads
        self.head_dim = vc.head_dim
        self.scale = self.head_dim ** -0.5
        self.compute_dtype = dt.compute
        self.softmax_dtype = dt.softmax
        self.q_proj = linear(d, d, True, dt)
        self.k_proj = linear(d, d, True, dt)
        self.v_proj = linear(d, d, True, dt)
        self.out_proj = linear(d, d, True, dt)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        # on CPU in float32 the prompt-attention kernel, with every key attended (as the decoder's prompts)
        self.kernel = make_prompt_attention() if native_float32(dt.compute, dt.softmax) else None

    def _heads(self, x, n, t):
        return ops.transpose(ops.reshape(x, (n, t, self.num_heads, self.head_dim)), (0, 2, 1, 3))

    def construct(self, x, n, t):
        """x [n * t, D] -> [n * t, D]; full (unmasked) attention within each image."""
        if self.kernel is not None:
            tokens = (n * t, self.num_heads, self.head_dim)
            out = self.kernel(ops.reshape(self.q_proj(x) * self.scale, tokens), ops.reshape(self.k_proj(x), tokens),
                              ops.reshape(self.v_proj(x), tokens), ops.ones((n, t, t), ms.int32))
            return self.out_proj(ops.reshape(out, (n * t, self.dim)))
        q = self._heads(self.q_proj(x) * self.scale, n, t)        # scale n*t*D values, not n*H*t*t scores
        k = self._heads(self.k_proj(x), n, t)
        v = self._heads(self.v_proj(x), n, t)
        scores = cast(self.bmm_t(q, k), self.compute_dtype, self.softmax_dtype)
        probs = cast(ops.softmax(scores, -1), self.softmax_dtype, self.compute_dtype)
        out = ops.transpose(self.bmm(probs, v), (0, 2, 1, 3))
        return self.out_proj(ops.reshape(out, (n * t, self.dim)))


class CLIPMLP(nn.Cell):
    def __init__(self, vc, dt):
        super().__init__()
        self.fc1 = linear(vc.hidden_size, vc.intermediate_size, True, dt)
        self.fc2 = linear(vc.intermediate_size, vc.hidden_size, True, dt)
        self.quick = vc.hidden_act == "quick_gelu"

    def construct(self, x):
        h = self.fc1(x)
        h = quick_gelu(h) if self.quick else gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, vc, dt):
        super().__init__()
        eps = vc.layer_norm_eps
        self.self_attn = CLIPAttention(vc, dt)
        self.layer_norm1 = LayerNorm(vc.hidden_size, eps, dt.param, dt.norm, dt.compute)
        self.mlp = CLIPMLP(vc, dt)
        self.layer_norm2 = LayerNorm(vc.hidden_size, eps, dt.param, dt.norm, dt.compute)

    def construct(self, x, n, t):
        x = x + self.self_attn(self.layer_norm1(x, n * t), n, t)
        return x + self.mlp(self.layer_norm2(x, n * t))


class CLIPEncoder(nn.Cell):
    def __init__(self, vc, dt):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(vc, dt) for _ in range(vc.num_hidden_layers)])


class CLIPVisionTransformer(nn.Cell):
    def __init__(self, vc, dt):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(vc, dt)
        self.pre_layrnorm = LayerNorm(vc.hidden_size, vc.layer_norm_eps, dt.param, dt.norm, dt.compute)
        self.encoder = CLIPEncoder(vc, dt)
        self.post_layernorm = LayerNorm(vc.hidden_size, vc.layer_norm_eps, dt.param, dt.norm, dt.compute)


class CLIPVisionModel(nn.Cell):
    """`vision_tower`: hidden_states[feature_layer_index] (0 = embeddings after pre_layrnorm) as
    [n * (1 + num_patches), D]."""

    def __init__(self, config):
        super().__init__()
        vc = config.vision_config
        dt = Dtypes(config)
        self.num_used_layers = vc.feature_layer_index
        self.tokens = vc.num_patches + 1
        self.vision_model = CLIPVisionTransformer(vc, dt)

    def construct(self, pixel_values, n):
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values, n), n * self.tokens)
        for i in range(self.num_used_layers):
            x = vm.encoder.layers[i](x, n, self.tokens)
        return x


class LlavaMultiModalProjector(nn.Cell):
    """linear_1 -> GELU -> linear_2, vision hidden -> text hidden."""

    def __init__(self, config):
        super().__init__()
        dt = Dtypes(config)
        vd, td = config.vision_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = Linear(vd, td, True, dt.param, dt.compute)
        self.linear_2 = Linear(td, td, True, dt.param, dt.compute)

    def construct(self, x):
        return self.linear_2(gelu(self.linear_1(x)))

