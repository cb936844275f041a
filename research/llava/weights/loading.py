"""Weights into the model, one tensor at a time (a Checkpoint, sliced per rank and cast), and the rank slicer."""
import os

import numpy as np

import checkpoint_io as io
import weight_map
from llava_errors import LlavaError
from weights.matching import check, match
from weights.quantize import check_stored, put, quantized_weights, read_stored, store


def rank_array(f, name, info, rank, world):
    """This rank's share of one stored tensor (`info` in open file `f`) as a numpy array; a dim-0 split reads
    only its own rows, a dim-1 split reads the tensor and copies its columns out."""
    index = weight_map.shard_index(name, info.shape, rank, world)
    if index is None:
        return io.read_array(f, info)
    if weight_map.split_axis(name) == 0:
        return io.read_array(f, info, rows=index[0])
    return np.ascontiguousarray(io.read_array(f, info)[index])


def _set(param, array):
    """param.set_data from a float numpy array, cast to the parameter's dtype."""
    import mindspore as ms
    if param.dtype == ms.bfloat16:
        tensor = ms.Tensor(array.astype(np.float32, copy=False)).astype(ms.bfloat16)
    else:
        np_dtype = np.float16 if param.dtype == ms.float16 else np.float32
        tensor = ms.Tensor.from_numpy(np.ascontiguousarray(array.astype(np_dtype, copy=False)))
    param.set_data(tensor)


def _store_quantized(f, name, info, rank, world, qw):
    """A quantized weight: a row-split int8 share is quantized from whole rows (weights/quantize.py says why)."""
    if world > 1 and weight_map.split_axis(name) == 1 and qw.fmt == "int8":
        store(qw, io.read_array(f, info), weight_map.shard_index(name, info.shape, rank, world))
    else:
        store(qw, rank_array(f, name, info, rank, world))


def checkpoint_shapes(params, quantized):
    """name -> this rank's shape of each weight as a checkpoint holds it (a packed int4 Parameter's is not)."""
    return {n: quantized[n].shape if n in quantized else tuple(p.shape) for n, p in params.items()}


def load_into(model, checkpoint, tp):
    """Strictly load `checkpoint` (a weights.Checkpoint) into `model` (its weight_parameters(); KV-cache entries
    of a checkpoint are ignored), reading, slicing for rank tp.rank of tp.world and casting one tensor at a
    time: peak memory is the model plus about one tensor. Every problem is one LlavaError naming the
    checkpoint."""
    from llama_text import is_cache_param
    params = model.weight_parameters()
    quantized = quantized_weights(model)
    world = tp.world if checkpoint.complete else 1
    rank = tp.rank if checkpoint.complete else 0
    expected = {n: weight_map.full_shape(n, s, world) for n, s in checkpoint_shapes(params, quantized).items()}
    tensors = {n: t for n, t in checkpoint.tensors.items() if not is_cache_param(n)}
    what = f"--load_checkpoint {checkpoint.path}: checkpoint does not match the model"
    stored = checkpoint.weight_dtype is not None
    if stored:
        check_stored(tensors, checkpoint.scales, checkpoint.weight_dtype, expected, what)
        if set(quantized) != set(checkpoint.scales):
            raise LlavaError(f"{what}: its quantized weights are not the model's")
    else:
        check(tensors, expected, what)
    files = {}
    try:
        for name, param in params.items():
            info = tensors[name]
            f = files.get(info.path) or files.setdefault(info.path, open(info.path, "rb"))
            if stored and name in quantized:            # as made by convert_weight.py --dtype: no quantizing
                scale = checkpoint.scales[name]
                g = files.get(scale.path) or files.setdefault(scale.path, open(scale.path, "rb"))
                put(quantized[name], read_stored(f, info), read_stored(g, scale))
                continue
            if name in quantized:
                _store_quantized(f, name, info, rank, world, quantized[name])
                continue
            array = rank_array(f, name, info, rank, world)
            _set(param, array)
            del array
    except OSError as e:
        raise LlavaError(f"--load_checkpoint {checkpoint.path}: cannot read {e.filename or ''}: "
                         f"{e.strerror or e}") from None
    except LlavaError as e:
        raise LlavaError(f"--load_checkpoint {checkpoint.path}: {e}") from None
    finally:
        for f in files.values():
            f.close()
    return model


def load_weights(model, param_dict):
    """Strictly load `param_dict` (name -> Parameter/Tensor/ndarray, e.g. mindspore.load_checkpoint) into
    `model`: every weight must be present with its shape and no unknown key may remain (KV-cache entries
    are ignored). Raises LlavaError naming the offending keys."""
    from mindspore import Tensor
    from llama_text import is_cache_param
    params = model.weight_parameters()
    given = {k: v for k, v in param_dict.items() if not is_cache_param(k)}
    quantized = quantized_weights(model)
    problems = match({n: tuple(v.shape) for n, v in given.items()}, checkpoint_shapes(params, quantized))
    if problems:
        raise LlavaError("checkpoint does not match the model: " + "; ".join(problems))
    for name, param in params.items():
        value = given[name]
        if name in quantized:
            store(quantized[name], value.asnumpy() if isinstance(value, Tensor) else np.asarray(value))
        elif isinstance(value, Tensor):
            param.set_data(value.astype(param.dtype))
        else:
            param.set_data(Tensor(np.asarray(value)).astype(param.dtype))
    return model


def slice_checkpoint(src, dst, tp, expected):
    """Write rank tp.rank's share of the complete checkpoint `src` to `dst` (atomically), reading one tensor at
    a time: memory stays at one full tensor, the output holds 1/N of every split weight. `expected`: name ->
    complete shape."""
    try:
        tensors = io.scan_ckpt(src)
    except LlavaError as e:
        raise LlavaError(f"--load_checkpoint {src}: not a readable MindSpore checkpoint ({e})") from None
    check(tensors, expected, f"--load_checkpoint {src}: checkpoint does not match the model")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with io.AtomicFile(dst) as out, open(src, "rb") as f:
        writer = io.CkptWriter(out.f)
        for name, t in tensors.items():
            dtype = io.float_dtype(t.dtype)
            part = rank_array(f, name, t, tp.rank, tp.world)
            if dtype == "bfloat16":          # read_array widened it; back to the stored bits, exactly
                raw, _ = io.convert_chunk(part.tobytes(), "float32", "bfloat16")
                writer.write_tensor(name, list(part.shape), dtype, len(raw), [raw])
            else:
                writer.write_tensor(name, list(part.shape), dtype, part.nbytes, [part.data])
            del part
        out.commit()
    return dst
