"""Small building blocks whose parameter names match torch / Hugging Face (`weight`, `bias`).

MindSpore's own `nn.LayerNorm` names its parameters `gamma`/`beta` and `nn.Dense` stores `[out, in]` but
casts differently; these cells keep the checkpoint names identical to llava-hf's keys so the weight map is
the identity, and make the compute dtype explicit:

* parameters are stored in `param_dtype` (config.param_init_type),
* matmuls run in `compute_dtype` (config.compute_dtype); activations are kept 2-D [tokens, features]
  so no cell needs to query a tensor's shape (each query costs a pipeline round trip in PyNative),
* normalisation statistics run in `norm_dtype` (config.layernorm_compute_type) and the result is cast back.
"""
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, One, Zero, initializer

from lowbit_kernels import STREAM_ROWS, WEIGHT_SCALE, make_matmul, make_rms_norm
from parallel import AllReduceSum, mask_to_range, vocab_range
from weights.quantize import int4_shapes, layer_dtype

DTYPE = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def ms_dtype(name):
    return DTYPE[name]


class Dtypes:
    """The four dtypes of a LlavaConfig as MindSpore types."""

    def __init__(self, config):
        self.param = ms_dtype(config.param_init_type)
        self.compute = ms_dtype(config.compute_dtype)
        self.norm = ms_dtype(config.layernorm_compute_type)
        self.softmax = ms_dtype(config.softmax_compute_type)
        self.rotary = ms_dtype(config.rotary_dtype)
        self.weight = config.weight_dtype         # a name: "int8" / "int4" have no float MindSpore type


def native_float32(*dtypes):
    """Whether cells computing in these dtypes use the plugin's CPU kernels (lowbit_kernels) for their steps:
    on CPU, all float32 (the kernels' only dtype; elsewhere MindSpore's own ops stay)."""
    return ms.get_context("device_target") == "CPU" and all(d == ms.float32 for d in dtypes)


def new_param(shape, dtype, init="normal", name=None, requires_grad=True):
    """A lazily initialised Parameter (skipped under `mindspore.nn.utils.no_init_parameters`)."""
    init = {"normal": Normal(0.02), "zeros": Zero(), "ones": One()}[init]
    return Parameter(initializer(init, list(shape), dtype), name=name, requires_grad=requires_grad)


def cast(x, src, dst):
    """ops.cast only when the (statically known) dtypes differ: no dtype query, no op in PyNative."""
    return x if src == dst else ops.cast(x, dst)


class Linear(nn.Cell):
    """y = x @ weight.T + bias with weight [out, in] (torch layout); x is 2-D [N, in] in compute dtype."""

    def __init__(self, in_features, out_features, bias=True, param_dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.param_dtype = param_dtype
        self.compute_dtype = compute_dtype
        self.weight = new_param((out_features, in_features), param_dtype, "normal", name="weight")
        self.has_bias = bias
        if bias:
            self.bias = new_param((out_features,), param_dtype, "zeros", name="bias")
        self.matmul = ops.MatMul(transpose_b=True)
        # A float32 layer on CPU multiplies decode rows (at most STREAM_ROWS) with the kernel's streaming
        # path: MindSpore's MatMul reads the weight well below memory speed for one row (docs/performance.md).
        self.stream = None
        if native_float32(param_dtype, compute_dtype):
            stream = make_matmul(False)
            self.stream = stream if stream.native else None

    def construct(self, x):
        if self.stream is not None and x.shape[0] <= STREAM_ROWS:
            y = self.stream(x, self.weight)
        else:
            y = self.matmul(x, cast(self.weight, self.param_dtype, self.compute_dtype))
        if self.has_bias:
            y = ops.bias_add(y, cast(self.bias, self.param_dtype, self.compute_dtype))
        return y


class LowbitLinear(nn.Cell):
    """Linear (same names and bias handling) whose `weight` stays in its stored precision: float16 / bfloat16
    [out, in], int8 [out, in] with `weight_scale` [out, 1] float32 (one symmetric scale per output channel), or
    int4 packed two per byte with float16 `weight_scale` per group of 32 inputs (weights/quantize.py defines
    the layouts and fills them at load time; `weight_format` names the quantized ones for it). The kernels'
    matmul reads the stored weight directly; x is multiplied in float32 whatever the compute dtype."""

    def __init__(self, in_features, out_features, bias, weight_dtype, param_dtype=ms.float32,
                 compute_dtype=ms.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.param_dtype = param_dtype
        self.compute_dtype = compute_dtype
        self.int8 = weight_dtype in ("int8", "int4")      # scaled: the matmul takes (x, weight, weight_scale)
        self.weight_format = weight_dtype if self.int8 else None
        if weight_dtype == "int8":
            self.weight = new_param((out_features, in_features), ms.int8, "zeros", name="weight",
                                    requires_grad=False)
            self.weight_scale = new_param((out_features, 1), ms.float32, "ones", name=WEIGHT_SCALE,
                                          requires_grad=False)
        elif weight_dtype == "int4":
            packed, scales = int4_shapes(out_features, in_features)
            self.weight = new_param(packed, ms.uint8, "zeros", name="weight", requires_grad=False)
            self.weight_scale = new_param(scales, ms.float16, "ones", name=WEIGHT_SCALE, requires_grad=False)
        else:
            self.weight = new_param((out_features, in_features), ms_dtype(weight_dtype), "normal",
                                    name="weight", requires_grad=False)
        self.has_bias = bias
        if bias:
            self.bias = new_param((out_features,), param_dtype, "zeros", name="bias")
        self.matmul = make_matmul(self.int8, int4=weight_dtype == "int4")

    def construct(self, x):
        x = cast(x, self.compute_dtype, ms.float32)
        if self.int8:
            y = self.matmul(x, self.weight, self.weight_scale)
        else:
            y = self.matmul(x, self.weight)
        y = cast(y, ms.float32, self.compute_dtype)
        if self.has_bias:
            y = ops.bias_add(y, cast(self.bias, self.param_dtype, self.compute_dtype))
        return y


def linear(in_features, out_features, bias, dt, head=False):
    """The decoder's and vision tower's linear layers and lm_head (`head`): Linear in dt.param, or LowbitLinear
    when the config's weight_dtype asks for low-precision storage (dt: Dtypes; weights/quantize.layer_dtype
    says which layers keep more bits)."""
    weight = layer_dtype(dt.weight, head)
    if weight == "float32":
        return Linear(in_features, out_features, bias, dt.param, dt.compute)
    return LowbitLinear(in_features, out_features, bias, weight, dt.param, dt.compute)


# On CPU a binary op that broadcasts is ~4x slower than one of equal shapes, and tiling the small operand
# first costs less than the difference: per-row and per-column operands of [rows, size] activations are
# tiled when there is more than one row (`rows` is static, so no shape query).
def tile_rows(per_row, rows, size):
    """[rows, 1] -> [rows, size]."""
    return ops.tile(per_row, (1, size)) if rows > 1 else per_row


def tile_cols(per_col, rows, size):
    """[size] -> [rows, size]."""
    return ops.tile(ops.reshape(per_col, (1, size)), (rows, 1)) if rows > 1 else per_col


class _Norm(nn.Cell):
    """A norm over the last axis with a `weight` of ones; statistics in norm_dtype."""

    def __init__(self, size, eps, param_dtype=ms.float32, norm_dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.param_dtype = param_dtype
        self.norm_dtype = norm_dtype
        self.compute_dtype = compute_dtype
        self.size = size
        self.weight = new_param((size,), param_dtype, "ones", name="weight")


class LayerNorm(_Norm):
    """torch.nn.LayerNorm over the last axis (parameters `weight`, `bias`)."""

    def __init__(self, size, eps, param_dtype=ms.float32, norm_dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__(size, eps, param_dtype, norm_dtype, compute_dtype)
        self.bias = new_param((size,), param_dtype, "zeros", name="bias")

    def construct(self, x, rows):
        """x [rows, size] (`rows` static, see tile_rows)."""
        size = self.size
        x = cast(x, self.compute_dtype, self.norm_dtype)
        centered = x - tile_rows(ops.mean(x, -1, True), rows, size)
        var = ops.mean(centered * centered, -1, True)
        y = centered * tile_rows(ops.rsqrt(var + self.eps), rows, size)
        y = y * tile_cols(cast(self.weight, self.param_dtype, self.norm_dtype), rows, size) + \
            tile_cols(cast(self.bias, self.param_dtype, self.norm_dtype), rows, size)
        return cast(y, self.norm_dtype, self.compute_dtype)


class RMSNorm(_Norm):
    """LlamaRMSNorm: x * rsqrt(mean(x^2) + eps), statistics in norm_dtype, then `weight *` in compute dtype.
    construct(x [rows, size], rows): `rows` is the static row count (no shape query). All float32 on CPU:
    one kernel call instead of six ops."""

    def __init__(self, size, eps, param_dtype=ms.float32, norm_dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__(size, eps, param_dtype, norm_dtype, compute_dtype)
        self.native = make_rms_norm() if native_float32(param_dtype, norm_dtype, compute_dtype) else None
        self.eps_tensor = Tensor([eps], ms.float32)

    def construct(self, x, rows):
        if self.native is not None:
            return self.native(x, self.weight, self.eps_tensor)
        x = cast(x, self.compute_dtype, self.norm_dtype)
        var = ops.mean(x * x, -1, True)
        y = cast(x * tile_rows(ops.rsqrt(var + self.eps), rows, self.size), self.norm_dtype, self.compute_dtype)
        return tile_cols(cast(self.weight, self.param_dtype, self.compute_dtype), rows, self.size) * y


class Embedding(nn.Cell):
    """Row lookup in `weight` [num, dim], `num` the rows this rank holds. With tensor parallelism (`tp`) they are
    rows [rank * num, (rank + 1) * num) of the vocabulary: ids outside that range give zeros and the ranks' rows
    are summed."""

    def __init__(self, num, dim, param_dtype=ms.float32, compute_dtype=ms.float32, tp=None):
        super().__init__()
        self.param_dtype = param_dtype
        self.compute_dtype = compute_dtype
        self.split = tp is not None and tp.enabled
        if self.split:
            self.start, self.end = vocab_range(tp, num)
            self.reduce = AllReduceSum(tp)
        self.weight = new_param((num, dim), param_dtype, "normal", name="weight")

    def construct(self, ids):
        if self.split:
            local, valid = mask_to_range(ids, self.start, self.end)
            rows = ops.gather(self.weight, local, 0) * cast(ops.expand_dims(valid, -1), ms.float32,
                                                            self.param_dtype)
            return cast(self.reduce(rows), self.param_dtype, self.compute_dtype)
        return cast(ops.gather(self.weight, ids, 0), self.param_dtype, self.compute_dtype)


def gelu(x):
    """Exact (erf) GELU, Hugging Face's "gelu"."""
    return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))


def quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)
