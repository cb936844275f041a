"""The plugin's CPU kernels (lowbit_matmul.cc via MindSpore's ops.Custom, func_type="aot", in PyNative and
Graph mode):

* low-precision weight matmul: y = x @ W.T with W [N, K] stored as int8 (with float32 scales), int4 (packed,
  with float16 scales per 32 inputs: weights/quantize.py), float16 or bfloat16, computed from the stored
  weights, or by a slow pure-MindSpore fallback that casts W to float32 on every call (`make_matmul`);
* prompt attention: a prompt's attention from the token-major q/k/v the projections give and its int32 mask,
  with no transposes, score tensors or bias tensors in between (`make_prompt_attention`);
* paged attention: the decoder's attention over a paged KV pool, prompt chunks and decode tokens of any rows in
  one call, read in place through the block tables (`make_paged_attention`);
* the per-token steps around the matmuls, one pass each: RMSNorm, SwiGLU, rotary embedding (`make_rms_norm`,
  `make_swiglu`, `make_rotary`).

The attention and per-token makers return None without the native library; the callers then keep
MindSpore's own ops.

LLAVA_KERNEL selects the backend: `auto` (default: the C++ kernel, built on first use by lowbit_kernels.build; the
fallback, announced once on stderr, when it cannot be built), `native` (the kernel or a LlavaError),
`fallback`. LLAVA_KERNEL_ISA, LLAVA_KERNEL_THREADS and LLAVA_KERNEL_PREFILL (`float`, default, or `int8`:
prefill rows of int8 / int4 weights on AVX512-VNNI dot products with x quantized per row) steer the kernel
(see lowbit_matmul.cc).
"""
import os
import sys

from llava_errors import LlavaError

BACKENDS = ("auto", "native", "fallback")
PREFILLS = ("float", "int8")
# The scales of an int8 / int4 linear weight `<cell>.weight` are the parameter `<cell>.weight_scale` (int8:
# [out, 1] float32, int4: [out, groups] float16): derived at load time, not a checkpoint weight.
WEIGHT_SCALE = "weight_scale"
# Rows of x up to which the kernel streams the weights once (GEMV_ROWS in lowbit_matmul.cc): decode steps.
STREAM_ROWS = 4
_built = {}          # cache folder -> library path, or the LlavaError that stopped its build


def backend_choice():
    choice = os.environ.get("LLAVA_KERNEL", "auto") or "auto"
    if choice not in BACKENDS:
        raise LlavaError(f"LLAVA_KERNEL={choice!r} must be one of {', '.join(BACKENDS)}")
    return choice


def prefill_choice():
    choice = os.environ.get("LLAVA_KERNEL_PREFILL", "float") or "float"
    if choice not in PREFILLS:
        raise LlavaError(f"LLAVA_KERNEL_PREFILL={choice!r} must be one of {', '.join(PREFILLS)}")
    return choice


def native_library():
    """Path of the built kernel library, or None when the fallback is to be used (LLAVA_KERNEL=fallback, or
    `auto` and the build failed: said once on stderr). LlavaError for LLAVA_KERNEL=native without a build,
    or an LLAVA_KERNEL_ISA this machine cannot run."""
    from lowbit_kernels import build
    choice = backend_choice()
    if choice == "fallback":
        return None
    key = build.cache_root()
    if key not in _built:
        try:
            _built[key] = build.library_path()
        except LlavaError as e:
            _built[key] = e
            if choice == "auto":
                print(f"llava: {e}; using the slow MindSpore fallback for low-precision weights", file=sys.stderr)
    lib = _built[key]
    if isinstance(lib, LlavaError):
        if choice == "native":
            raise lib
        return None
    build.machine_isa(lib)
    return lib


def is_scale_param(name):
    return name.rsplit(".", 1)[-1] == WEIGHT_SCALE


def _out_shape(x, w, *scale):
    return [x[0], w[0]]


def make_matmul(int8, int4=False):
    """A cell computing y [M, N] float32 = x [M, K] float32 @ W.T from stored weights: called as
    (x, w, scale) for int8 w with scale [N, G] float32 (each scale covers K / G consecutive inputs) and, with
    `int4`, for packed int4 w with its float16 scale [N, ceil(K / 32)]; as (x, w) for float16 / bfloat16 /
    float32 w."""
    import mindspore as ms
    from mindspore import nn, ops

    lib = native_library()
    prefill_choice()

    class LowbitMatmul(nn.Cell):
        def __init__(self):
            super().__init__()
            self.int8 = int8
            self.int4 = int4
            self.native = lib is not None
            if self.native:
                self.op = ops.Custom(func=f"{lib}:LlavaLowbitMatmul", out_shape=_out_shape,
                                     out_dtype=ms.float32, func_type="aot")
            self.matmul = ops.MatMul(transpose_b=True)

        def construct(self, x, w, scale=None):
            if self.native:
                if self.int8:
                    return self.op(x, w, scale)
                return self.op(x, w)
            if self.int4:
                return self.matmul(x, self.int4_to_float32(x, w, scale))
            wf = ops.cast(w, ms.float32)
            if self.int8:
                n, k = w.shape
                g = scale.shape[1]
                wf = ops.reshape(ops.reshape(wf, (n, g, k // g)) * ops.expand_dims(scale, -1), (n, k))
            return self.matmul(x, wf)

        def int4_to_float32(self, x, w, scale):
            """The fallback's float32 W [N, K] of a packed int4 weight (weights/quantize.py's layout), in float
            ops: the high nibble of each byte is floor(b / 16), the low one b - 16 * floor(b / 16)."""
            n, g = scale.shape
            b = ops.reshape(ops.cast(w, ms.float32), (n, g, 16))
            hi = ops.floor(b / 16.0)
            q = ops.concat((b - 16.0 * hi, hi), -1) - 8.0                      # [N, G, 32], inputs in order
            wf = ops.reshape(q * ops.expand_dims(ops.cast(scale, ms.float32), -1), (n, g * 32))
            return wf[:, :x.shape[1]]

    return LowbitMatmul()


def _native_cell(entry, out_shape):
    """A cell calling the kernel library's `entry` on its inputs (float32 output of out_shape(*input shapes)),
    or None when the native library is not used (LLAVA_KERNEL=fallback, or no build): the caller then keeps
    MindSpore's own ops."""
    import mindspore as ms
    from mindspore import nn, ops

    lib = native_library()
    if lib is None:
        return None

    class NativeOp(nn.Cell):
        def __init__(self):
            super().__init__()
            self.op = ops.Custom(func=f"{lib}:{entry}", out_shape=out_shape, out_dtype=ms.float32, func_type="aot")

        def construct(self, *inputs):
            return self.op(*inputs)

    return NativeOp()


def _first(shape, *rest):
    return shape


def make_paged_attention():
    """(q [N, H, D] rotated and scaled, k_cache, v_cache [NB * kv * BS, D], tokens [N, 2] int32 = (table row r,
    positions attended L), tables [R, MB] int32, layout [2] int32 = (kv, BS)) -> [N, H, D]: token i attends
    positions 0..L-1 of row r (position p in block tables[r, p // BS], cache row (block * kv + g) * BS + p % BS
    for KV head g); zeros for L = 0."""
    return _native_cell("LlavaPagedAttention", _first)


def make_prompt_attention():
    """(q [B * Lq, H, D] scaled, k, v [B * Lk, kv, D], mask [B, Lq, Lk] int32) -> [B * Lq, H, D]."""
    return _native_cell("LlavaPromptAttention", _first)


def make_rms_norm():
    """(x [N, C], weight [C], eps [1]) -> weight * x / sqrt(mean(x^2) + eps) [N, C]."""
    return _native_cell("LlavaRmsNorm", _first)


def make_swiglu():
    """(gate [N, C], up [N, C]) -> silu(gate) * up."""
    return _native_cell("LlavaSwiGlu", _first)


def make_rotary():
    """(x [N, Hx, D], cos [N, D], sin [N, D]) -> x * cos + swap_halves(x) * sin, per head of each token."""
    return _native_cell("LlavaRotary", _first)


__all__ = ["make_matmul", "make_paged_attention", "make_prompt_attention", "make_rms_norm", "make_swiglu",
           "make_rotary", "STREAM_ROWS", "native_library", "backend_choice", "BACKENDS", "prefill_choice", "PREFILLS",
           "WEIGHT_SCALE", "is_scale_param"]
