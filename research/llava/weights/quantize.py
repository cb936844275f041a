"""int8 storage of linear weights, made at load time from the float checkpoint (llava_layers.LowbitLinear).

Symmetric, one float32 scale per output channel: q = rint(w / s) in [-127, 127], s = max|w[row]| / 127, and the
kernel computes (x . q[row]) * s[row]. Per output channel rather than per group of 32 inputs (llama.cpp's
q8_0), measured with lowbit_kernels/lowbit_matmul.cc on Gaussian 4096x4096 and 11008x4096 weights (docs/performance.md):
groups of 32 lower the weight's relative RMS error from 0.0087 to 0.0053 but cost 12.5% more bytes and, at
decode, ran at a third of the per-channel speed (one scale FMA and a dependent add per 32 weights instead of one
per row); per channel also keeps tensor parallelism exact with no divisibility rule: a column-split rank holds
whole rows with their scales, and a row-split rank quantizes whole rows before taking its columns (below), so
every rank holds exactly its slice of the single-rank quantization.
"""
import numpy as np

from llava_errors import LlavaError
from lowbit_kernels import WEIGHT_SCALE, is_scale_param

ROWS_PER_STEP = 256     # rows converted at a time: temporaries stay small next to the one tensor being loaded


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


def scale_parameters(model):
    """Weight name -> the Parameter holding its int8 scales, for every int8 linear weight of `model` (a Cell;
    anything else that offers weight_parameters() to the loader holds no scales)."""
    cell_parameters = getattr(model, "get_parameters", None)
    if cell_parameters is None:
        return {}
    return {p.name[:-len(WEIGHT_SCALE)] + "weight": p for p in cell_parameters() if is_scale_param(p.name)}


def store_int8(weight, scale, array, index=None):
    """Quantize float `array` (whole rows) into the int8 Parameter `weight` and its `scale` Parameter. `index`
    (weight_map.shard_index of a row-split weight) selects this rank's columns after quantizing, so the scales
    are those of whole rows, as on one rank."""
    from mindspore import Tensor
    q, s = quantize_int8(array)
    if index is not None:
        q = np.ascontiguousarray(q[index])
        s = np.ascontiguousarray(s[index[0]])
    if tuple(q.shape) != tuple(weight.shape) or tuple(s.shape) != tuple(scale.shape):
        raise LlavaError(f"{weight.name}: int8 weight {list(q.shape)} / scale {list(s.shape)} do not fit the "
                         f"model's {list(weight.shape)} / {list(scale.shape)}")
    weight.set_data(Tensor.from_numpy(q))
    scale.set_data(Tensor.from_numpy(s))
