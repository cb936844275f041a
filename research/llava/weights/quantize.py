"""Quantized storage of linear weights (llava_layers.LowbitLinear), made at load time from the float checkpoint.

int8 (`model_config.weight_dtype: int8`): symmetric, one float32 scale per output channel: q = rint(w / s) in
[-127, 127], s = max|w[row]| / 127, and the kernel computes (x . q[row]) * s[row]. Per output channel rather
than per group of 32 inputs (llama.cpp's q8_0), measured with lowbit_kernels/lowbit_matmul.cc on Gaussian
4096x4096 and 11008x4096 weights (docs/performance.md): groups of 32 lower the weight's relative RMS error from
0.0087 to 0.0053 but cost 12.5% more bytes and, at decode, ran at a third of the per-channel speed (one scale
FMA and a dependent add per 32 weights instead of one per row); per channel also keeps tensor parallelism exact
with no divisibility rule: a column-split rank holds whole rows with their scales, and a row-split rank
quantizes whole rows before taking its columns (below), so every rank holds exactly its slice of the
single-rank quantization.

int4 (`weight_dtype: int4`): groups of INT4_GROUP = 32 consecutive inputs with one float16 scale each and no
minimum, llama.cpp's q4_0 rule: d = m / -8 for m the group's value of largest magnitude (d rounded to float16
first, then q = clip(rint(w / d), -8, 7)), so that value is exact and the 16 levels are all used. A minimum
per group (q4_1's w ~= q * d + min, 16 levels over [min, max]) was measured on Gaussian 7B-shaped weights
(benchmarks/kernel_matmul.py's error table, 4096x4096 and 11008x4096): relative RMS error 0.0859 without
against 0.0782 with it (-9 %), for 2 more bytes per 32 weights (5.0 instead of 4.5 bits per weight, +11 % to
read at every decode step) and one more FMA per group: not taken.
Per 32 inputs rather than per channel: 16 levels over a whole 4096-input row would leave most weights at 0.
Stored packed as uint8 [out, ceil(in / 32) * 16] (`int4_shapes`): group g's 16 bytes hold input 32 g + j in
the low nibble and input 32 g + 16 + j in the high nibble of byte 16 g + j, each as q + 8 (llama.cpp's q4_0
block: a group unpacks into its two runs of 16 inputs with one AND and one shift); a last, partial group is
padded with q = 0. Scales: float16 [out, ceil(in / 32)]. A row-split rank (tensor parallelism) quantizes its
own columns, its groups starting at its first column: the single-rank quantization exactly whenever
in / world is a multiple of 32 (the 7B: 4096 / 2 and 11008 / 2).

Higher precision under int4 (`layer_dtype`): lm_head stays int8, as llama.cpp keeps output.weight at 6 bits
(q6_K) in its q4_0 and Q4_K_M files: its error lands on the logits directly, with no later layer to average it
out, and it is 3 % of the 7B's linear weights. The embeddings, norms, biases, the patch convolution and the
projector stay in param_init_type as for every weight_dtype (llava_layers.linear builds only the decoder's and
the vision tower's linear layers).
"""
import numpy as np

from llava_errors import LlavaError
from lowbit_kernels import WEIGHT_SCALE

ROWS_PER_STEP = 256     # rows converted at a time: temporaries stay small next to the one tensor being loaded
INT4_GROUP = 32         # inputs per int4 scale (lowbit_matmul.cc's Q4_GROUP)
FORMATS = ("int8", "int4")
HEAD_DTYPE = {"int4": "int8"}   # lm_head's storage when it differs from the layers' (the docstring says why)


def layer_dtype(weight_dtype, head=False):
    """The storage of one linear layer for model_config.weight_dtype: lm_head (`head`) may keep more bits."""
    return HEAD_DTYPE.get(weight_dtype, weight_dtype) if head else weight_dtype


def int4_shapes(out_features, in_features):
    """(packed weight shape, scale shape) of an int4 weight [out, in]."""
    groups = -(-in_features // INT4_GROUP)
    return (out_features, groups * INT4_GROUP // 2), (out_features, groups)


def stored_bytes(fmt, out_features, in_features):
    """Bytes an int8 / int4 weight [out, in] holds, scales included."""
    if fmt == "int8":
        return out_features * in_features + out_features * 4
    (rows, cols), (_, groups) = int4_shapes(out_features, in_features)
    return rows * cols + rows * groups * 2


def quantize_int8(w, group=None):
    """Symmetric int8 of a float array w [out, in] -> (q int8 [out, in], scale float32 [out, G]) with
    w ~= q * scale per run of `group` consecutive inputs (None: the whole row, G = 1). All-zero rows get
    scale 0."""
    if w.ndim != 2:
        raise LlavaError(f"int8 quantization needs a 2-D weight, got shape {list(w.shape)}")
    n, k = w.shape
    g = k if group is None else group
    if g <= 0 or k % g:
        raise LlavaError(f"int8 quantization: group {g} does not divide the {k} inputs of a weight")
    q = np.empty((n, k), np.int8)
    scale = np.empty((n, k // g), np.float32)
    for r0 in range(0, n, ROWS_PER_STEP):
        r1 = min(n, r0 + ROWS_PER_STEP)
        block = np.asarray(w[r0:r1], dtype=np.float32).reshape(r1 - r0, k // g, g)
        amax = np.abs(block).max(-1)
        s = amax / np.float32(127.0)
        inv = np.divide(np.float32(1.0), s, out=np.zeros_like(s), where=s > 0)
        q[r0:r1] = np.clip(np.rint(block * inv[:, :, None]), -127, 127).astype(np.int8).reshape(r1 - r0, k)
        scale[r0:r1] = s
    return q, scale


def quantize_int4(w):
    """int4 of a float array w [out, in] in the layout above -> (packed uint8, scale float16 [out, groups]).
    All-zero groups get scale 0."""
    if w.ndim != 2:
        raise LlavaError(f"int4 quantization needs a 2-D weight, got shape {list(w.shape)}")
    n, k = w.shape
    (_, cols), (_, groups) = int4_shapes(n, k)
    packed = np.empty((n, cols), np.uint8)
    scale = np.empty((n, groups), np.float16)
    pad = groups * INT4_GROUP - k
    for r0 in range(0, n, ROWS_PER_STEP):
        r1 = min(n, r0 + ROWS_PER_STEP)
        block = np.asarray(w[r0:r1], dtype=np.float32)
        if pad:
            block = np.pad(block, ((0, 0), (0, pad)))
        block = block.reshape(r1 - r0, groups, INT4_GROUP)
        m = np.take_along_axis(block, np.abs(block).argmax(-1)[..., None], -1)[..., 0]
        d = (m / np.float32(-8.0)).astype(np.float16)
        d32 = d.astype(np.float32)
        inv = np.divide(np.float32(1.0), d32, out=np.zeros_like(d32), where=d32 != 0)
        u = (np.clip(np.rint(block * inv[..., None]), -8, 7) + 8).astype(np.uint8)   # [rows, groups, 32]
        half = INT4_GROUP // 2
        packed[r0:r1] = (u[..., :half] | (u[..., half:] << 4)).reshape(r1 - r0, cols)
        scale[r0:r1] = d
    return packed, scale


class Quantized:
    """A quantized linear weight of the model: its `weight` and `scale` Parameters, `fmt` (int8 | int4) and the
    `shape` [out, in] the checkpoint holds it in (an int4 weight's Parameter is packed)."""

    def __init__(self, weight, scale, fmt, shape):
        self.weight, self.scale, self.fmt, self.shape = weight, scale, fmt, tuple(shape)

    def quantize(self, array):
        return quantize_int8(array) if self.fmt == "int8" else quantize_int4(array)


def quantized_weights(model):
    """Weight name -> Quantized, for every int8 / int4 linear weight of `model` (a Cell; anything else that
    offers weight_parameters() to the loader holds none): the cells whose `weight_format` is one of FORMATS."""
    cells = getattr(model, "cells_and_names", None)
    if cells is None:
        return {}
    out = {}
    for _, cell in cells():
        fmt = getattr(cell, "weight_format", None)
        if fmt in FORMATS:
            out[cell.weight.name] = Quantized(cell.weight, getattr(cell, WEIGHT_SCALE), fmt,
                                              (cell.out_features, cell.in_features))
    return out


def store(qw, array, index=None):
    """Quantize float `array` into the Quantized weight `qw`. `index` (weight_map.shard_index of a row-split
    int8 weight) selects this rank's columns after quantizing whole rows, so the scales are those of whole
    rows, as on one rank; an int4 share is quantized as given (its groups start at its first column)."""
    q, s = qw.quantize(array)
    if index is not None:
        q = np.ascontiguousarray(q[index])
        s = np.ascontiguousarray(s[index[0]])
    put(qw, q, s)


def put(qw, q, s):
    """Set quantized weights `q` and scales `s` (numpy, in the stored layout) into `qw`, checking their shapes and
    dtypes against the model's."""
    from mindspore import Tensor
    weight, scale = qw.weight, qw.scale
    want = (str(weight.dtype).lower(), str(scale.dtype).lower())
    got = (np.dtype(q.dtype).name, np.dtype(s.dtype).name)
    if tuple(q.shape) != tuple(weight.shape) or tuple(s.shape) != tuple(scale.shape) or got != want:
        raise LlavaError(f"{weight.name}: {qw.fmt} weight {list(q.shape)} {got[0]} / scale {list(s.shape)} {got[1]} "
                         f"do not fit the model's {list(weight.shape)} {want[0]} / {list(scale.shape)} {want[1]}")
    weight.set_data(Tensor.from_numpy(np.ascontiguousarray(q)))
    scale.set_data(Tensor.from_numpy(np.ascontiguousarray(s)))


# ---------------------------------------------------------------------------------------------------------
# pre-quantized checkpoints (convert_weight.py --dtype int8 | int4): a llava-hf folder whose quantized linear
# weights are stored as the model holds them (int8 I8 [out, in]; int4 U8 packed), each with its scales as
# `<layer>.weight_scale` (F32 [out, 1]; F16 [out, groups]); the other weights stay float. The format is told by
# the dtypes alone, so the yaml's weight_dtype can be checked against it before anything is built.

SCALE_SUFFIX = "." + WEIGHT_SCALE
STORED = {"int8": ("I8", "F32"), "int4": ("U8", "F16")}      # safetensors codes of (weight, scale) per format
NUMPY = {"I8": np.int8, "U8": np.uint8, "F32": np.float32, "F16": np.float16}


def scale_name(weight_name):
    """`<layer>.weight` -> `<layer>.weight_scale`, the name a pre-quantized checkpoint stores its scales under."""
    return weight_name[:-len(".weight")] + SCALE_SUFFIX


def stored_shapes(fmt, out_features, in_features):
    """(weight shape, scale shape) as an int8 / int4 weight [out, in] is stored."""
    if fmt == "int8":
        return (out_features, in_features), (out_features, 1)
    return int4_shapes(out_features, in_features)


def quantized_names(names):
    """The names (of model weights) that a quantized weight_dtype stores quantized: the linear layers
    llava_layers.linear builds (memory_budget.LOWBIT_WEIGHT, checked against a model by tests/test_lowbit.py)."""
    from memory_budget import LOWBIT_WEIGHT
    return [n for n in names if LOWBIT_WEIGHT.search(n)]


def split_scales(named):
    """A checkpoint's tensors (model names, as weights.hf_names gives them) -> (weights, scales, weight_dtype):
    `scales` maps each quantized weight's name to its scale tensor, and weight_dtype is the
    model_config.weight_dtype the checkpoint was made for ("int8" / "int4"; None for a float checkpoint)."""
    import weight_map
    tensors, scales = {}, {}
    for name, t in named.items():
        if not name.endswith(SCALE_SUFFIX):
            tensors[name] = t
            continue
        base = name[:-len(SCALE_SUFFIX)] + ".weight"
        try:
            base = weight_map.hf_to_ms(base)
        except LlavaError:
            pass                                   # not a weight of this model: `check_stored` names it
        scales[base] = t
    codes = {t.dtype for t in tensors.values()}
    weight_dtype = "int4" if STORED["int4"][0] in codes else "int8" if STORED["int8"][0] in codes or scales else None
    return tensors, scales, weight_dtype


def check_format(checkpoint_dtype, weight_dtype, what):
    """One line when a checkpoint quantized for `checkpoint_dtype` is given to a model of weight_dtype (a float
    checkpoint suits every weight_dtype: it is quantized while loading)."""
    if checkpoint_dtype is not None and checkpoint_dtype != weight_dtype:
        raise LlavaError(f"{what}: its weights are quantized to {checkpoint_dtype} (convert_weight.py --dtype "
                         f"{checkpoint_dtype}) but model_config.weight_dtype is {weight_dtype}; set weight_dtype: "
                         f"{checkpoint_dtype} in the yaml or give the float checkpoint")


def check_stored(tensors, scales, weight_dtype, expected, what):
    """Raise LlavaError("`what`: problems") unless a pre-quantized checkpoint's `tensors` and `scales` (as
    split_scales gives them) are exactly the weights `expected` (name -> [out, in] shape) of a model of
    weight_dtype: its quantized layers in their stored shapes and dtypes with their scales, the rest float."""
    from weights.matching import match
    want, codes = {}, {}
    quantized = set(quantized_names(expected))
    for name, shape in expected.items():
        if name not in quantized:
            want[name] = tuple(shape)
            continue
        fmt = layer_dtype(weight_dtype, head=name.endswith("lm_head.weight"))
        w_shape, s_shape = stored_shapes(fmt, *shape)
        want[name], want[scale_name(name)] = w_shape, s_shape
        codes[name], codes[scale_name(name)] = STORED[fmt]
    found = {n: t.shape for n, t in tensors.items()}
    found.update({scale_name(n): t.shape for n, t in scales.items()})
    infos = dict(tensors)
    infos.update({scale_name(n): t for n, t in scales.items()})
    import checkpoint_io as io
    problems = match(found, want)
    wrong = [f"{n} ({t.dtype}, expected {codes.get(n, 'a float dtype')})" for n, t in sorted(infos.items())
             if n in want and (t.dtype != codes[n] if n in codes else io.float_dtype(t.dtype) is None)]
    if wrong:
        problems.append(f"{len(wrong)} with the wrong dtype: {io.short_list(wrong)}")
    if problems:
        raise LlavaError(f"{what}: " + "; ".join(problems))


def read_stored(f, info):
    """A stored (quantized or scale) tensor of open file `f` as a numpy array of its own dtype, read once."""
    out = np.empty(info.shape, NUMPY[info.dtype])
    view, pos = memoryview(out.reshape(-1).view(np.uint8)), 0
    for offset, nbytes in info.segments:
        f.seek(offset)
        if f.readinto(view[pos:pos + nbytes]) != nbytes:
            raise LlavaError(f"{info.path} is truncated")
        pos += nbytes
    return out
