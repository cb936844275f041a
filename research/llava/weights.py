"""The weights layer: where this rank's weights come from, whether they fit the model, and loading them.

`--load_checkpoint` is one of
  * a complete MindSpore .ckpt (what convert_weight.py writes);
  * a folder of rank shares, `model_dir/rank_K/*.ckpt` (e.g. the transformed_checkpoint of an earlier run);
  * a Hugging Face llava-hf folder: config.json with model.safetensors, or shards listed by
    model.safetensors.index.json. It is read lazily: headers first, then one tensor at a time, only this rank's
    rows of a row-split weight, cast to the model's parameter dtype; nothing is converted or written.

Every source goes through one strict check, `match` (missing / unknown / wrongly shaped weights), which the
converter, the loader and the rank slicer share. Names, shapes and split rules live in weight_map; file formats
in checkpoint_io. MindSpore is imported only by the functions that build tensors, so that `check_early` runs
before the framework imports.
"""
import json
import math
import os

import numpy as np

import checkpoint_io as io
import weight_map
from llava_errors import LlavaError

REQUIRED = ("--load_checkpoint is required: a complete .ckpt file, a model_dir/rank_K/ folder or a "
            "llava-hf folder (config.json + safetensors)")
HF_CONFIG = "config.json"
# LlavaConfig fields that must agree between a llava-hf config.json and the yaml's model_config: the shapes,
# and the settings that change the answers without changing a shape.
CONFIG_FIELDS = {
    "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps",
                      "vision_feature_layer", "vision_feature_select_strategy"),
    "text_config": ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size", "vocab_size",
                    "rms_norm_eps", "theta", "hidden_act"),
    None: ("image_token_index", "projector_hidden_act"),
}


# ---------------------------------------------------------------------------------------------- the check

def match(found, expected):
    """Problems with `found` (name -> shape) as the weights of `expected` (name -> shape): one string each for
    the missing, the unknown and the wrongly shaped names (at most a few names shown); [] when they fit."""
    missing = sorted(n for n in expected if n not in found)
    unknown = sorted(n for n in found if n not in expected)
    wrong = [f"{n} {list(found[n])} (expected {list(expected[n])})"
             for n in sorted(expected) if n in found and tuple(found[n]) != tuple(expected[n])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {io.short_list(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} unknown: {io.short_list(unknown)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {io.short_list(wrong)}")
    return problems


def check(tensors, expected, what):
    """Raise LlavaError("`what`: problems") unless `tensors` (name -> TensorInfo) match `expected`
    (name -> shape) and are all float tensors."""
    problems = match({n: t.shape for n, t in tensors.items()}, expected)
    not_float = [f"{n} ({t.dtype})" for n, t in sorted(tensors.items()) if io.float_dtype(t.dtype) is None]
    if not_float:
        problems.append(f"{len(not_float)} with a non-float dtype: {io.short_list(not_float)}")
    if problems:
        raise LlavaError(f"{what}: " + "; ".join(problems))


def expected_shapes(config):
    """Parameter name -> complete shape for `config` (a LlavaConfig), in model order."""
    return {name: shape for name, (shape, _) in weight_map.expected_params(config).items()}


def hf_names(tensors):
    """A Hugging Face folder's tensors (name -> TensorInfo) under the model's parameter names, without the
    buffers old checkpoints carry (position_ids, rotary inv_freq); and the names of those skipped buffers.
    Names that are not LLaVA weights are kept as they are (`check` reports them)."""
    named, skipped = {}, []
    for name, t in tensors.items():
        if weight_map.is_ignored_hf(name):
            skipped.append(name)
            continue
        try:
            named[weight_map.hf_to_ms(name)] = t
        except LlavaError:
            named[name] = t
    return named, skipped


# ------------------------------------------------------------------------------------------ llava-hf folders

def is_hf_folder(path):
    """A folder laid out as llava-hf (config.json or safetensors weights), as opposed to rank folders."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in (
        HF_CONFIG, io.SAFETENSORS_FILE, io.SAFETENSORS_INDEX))


def read_hf_config(path):
    """LlavaConfig from a llava-hf config.json (LlavaError naming the file when it is not one)."""
    import llava_config
    if not os.path.isfile(path):
        raise LlavaError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LlavaError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    try:
        return llava_config.LlavaConfig.from_hf_config(hf)
    except LlavaError as e:
        raise LlavaError(f"{path}: {e}") from e


def config_differences(hf_config, model_config):
    """'text_config.hidden_size is 96 in config.json, 64 in the yaml' for every field of CONFIG_FIELDS on
    which the two LlavaConfigs disagree."""
    out = []
    for section, keys in CONFIG_FIELDS.items():
        a = getattr(hf_config, section) if section else hf_config
        b = getattr(model_config, section) if section else model_config
        for key in keys:
            x, y = getattr(a, key), getattr(b, key)
            same = math.isclose(x, y, rel_tol=1e-9) if isinstance(x, float) and isinstance(y, float) else x == y
            if not same:
                out.append(f"{section + '.' if section else ''}{key} is {x!r} in config.json, {y!r} in the yaml")
    return out


def check_hf_folder(path):
    """name -> TensorInfo of a llava-hf folder, from its headers; file-level problems name the folder."""
    if not os.path.isfile(os.path.join(path, HF_CONFIG)):
        raise LlavaError(f"--load_checkpoint {path}: has no {HF_CONFIG} (a llava-hf folder holds config.json "
                         f"and the safetensors files)")
    try:
        return io.read_safetensors_folder(path)
    except LlavaError as e:
        raise LlavaError(f"--load_checkpoint {path}: {e}") from None


# ------------------------------------------------------------------------------------------ --load_checkpoint

class Checkpoint:
    """Where this rank's weights are: `tensors` (parameter name -> TensorInfo, headers only) and whether they
    are `complete` (every rank reads its share of them) or already this rank's share."""

    def __init__(self, path, tensors, complete):
        self.path, self.tensors, self.complete = path, tensors, complete

    def __repr__(self):
        return f"Checkpoint({self.path!r}, {len(self.tensors)} tensors, complete={self.complete})"


def _ckpt_file(path, complete):
    if os.path.getsize(path) == 0:
        raise LlavaError(f"--load_checkpoint {path}: empty file")
    try:
        tensors = io.scan_ckpt(path)
    except LlavaError as e:
        raise LlavaError(f"--load_checkpoint {path}: not a readable MindSpore checkpoint ({e})") from None
    if not tensors:
        raise LlavaError(f"--load_checkpoint {path}: holds no tensors (not a checkpoint of this model)")
    return Checkpoint(path, tensors, complete)


def check_early(path):
    """Fail in about a second, before the framework imports and the model build, on a missing, empty, truncated
    or foreign checkpoint file or llava-hf folder (headers only). Rank folders are checked per rank later."""
    if not path:
        raise LlavaError(REQUIRED)
    if not os.path.exists(path):
        raise LlavaError(f"--load_checkpoint {path}: no such file or folder")
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            raise LlavaError(f"--load_checkpoint {path}: give the llava-hf folder that holds this file and its "
                             f"config.json, not the file itself")
        _ckpt_file(path, True)
    elif is_hf_folder(path):
        check_hf_folder(path)


def find_rank_file(path, rank):
    """model_dir/rank_K/*.ckpt for rank K: exactly one .ckpt."""
    rank_dir = os.path.join(path, f"rank_{rank}")
    files = sorted(f for f in os.listdir(rank_dir) if f.endswith(".ckpt")) if os.path.isdir(rank_dir) else []
    if len(files) != 1:
        raise LlavaError(f"--load_checkpoint {path}: expected exactly one .ckpt in {rank_dir}, found {len(files)}")
    return os.path.join(rank_dir, files[0])


def rank_checkpoint(path, tp, model_config, auto_trans_ckpt=False, output_dir="."):
    """The Checkpoint this rank (tp: rank, world) loads for a model of `model_config`.

    A complete .ckpt is loaded as it is by a single process; under tensor parallelism (with auto_trans_ckpt)
    each rank first writes its share to output_dir/transformed_checkpoint/rank_K/checkpoint_K.ckpt. A llava-hf
    folder needs neither: its config.json must agree with the yaml and each rank reads its share directly."""
    if not path:
        raise LlavaError(REQUIRED)
    if os.path.isfile(path):
        if tp.world == 1:
            return _ckpt_file(path, True)
        if not auto_trans_ckpt:
            raise LlavaError(f"--load_checkpoint {path} is a complete checkpoint: pass --auto_trans_ckpt True "
                             f"to slice it for {tp.world} ranks, or give a folder with rank_0..rank_{tp.world - 1}")
        dst = os.path.join(output_dir, "transformed_checkpoint", f"rank_{tp.rank}", f"checkpoint_{tp.rank}.ckpt")
        slice_checkpoint(path, dst, tp, expected_shapes(model_config))
        return _ckpt_file(dst, False)
    if not os.path.isdir(path):
        raise LlavaError(f"--load_checkpoint {path}: no such file or folder")
    if is_hf_folder(path):
        tensors = check_hf_folder(path)
        differences = config_differences(read_hf_config(os.path.join(path, HF_CONFIG)), model_config)
        if differences:
            raise LlavaError(f"--load_checkpoint {path}: its config.json does not match the yaml's model_config "
                             f"(use the yaml made for these weights): " + "; ".join(differences))
        return Checkpoint(path, hf_names(tensors)[0], True)
    ranks = sorted(d for d in os.listdir(path) if d.startswith("rank_") and os.path.isdir(os.path.join(path, d)))
    want = [f"rank_{k}" for k in range(tp.world)]
    if sorted(ranks, key=lambda d: int(d[5:]) if d[5:].isdigit() else -1) != want:
        raise LlavaError(f"--load_checkpoint {path}: has {len(ranks)} rank folder(s) "
                         f"({', '.join(ranks[:8]) or 'none'}) but the job runs {tp.world} rank(s): "
                         f"expected {', '.join(want)}")
    return _ckpt_file(find_rank_file(path, tp.rank), False)


# ------------------------------------------------------------------------------------------------- loading

def _rank_array(f, name, info, rank, world):
    """This rank's share of one stored tensor as a numpy array; a dim-0 split reads only its own rows."""
    index = weight_map.shard_index(name, info.shape, rank, world)
    if index is None:
        return io.read_array(f, info)
    if weight_map.split_axis(name) == 0:
        return io.read_array(f, info, rows=index[0])
    return np.ascontiguousarray(io.read_array(f, info)[index])


def _set(param, array):
    """param.set_data from a float numpy array, cast to the parameter's dtype (one tensor at a time)."""
    import mindspore as ms
    if param.dtype == ms.bfloat16:
        tensor = ms.Tensor(array.astype(np.float32, copy=False)).astype(ms.bfloat16)
    else:
        np_dtype = np.float16 if param.dtype == ms.float16 else np.float32
        tensor = ms.Tensor.from_numpy(np.ascontiguousarray(array.astype(np_dtype, copy=False)))
    param.set_data(tensor)


def load_into(model, checkpoint, tp):
    """Strictly load `checkpoint` into `model` (its weight_parameters(); KV-cache entries of a checkpoint are
    ignored), reading and casting one tensor at a time: peak memory is the model plus about one tensor.
    Every problem is one LlavaError naming the checkpoint."""
    from llama_text import is_cache_param
    params = model.weight_parameters()
    world = tp.world if checkpoint.complete else 1
    rank = tp.rank if checkpoint.complete else 0
    expected = {n: weight_map.full_shape(n, p.shape, world) for n, p in params.items()}
    tensors = {n: t for n, t in checkpoint.tensors.items() if not is_cache_param(n)}
    check(tensors, expected, f"--load_checkpoint {checkpoint.path}: checkpoint does not match the model")
    files = {}
    try:
        for name, param in params.items():
            info = tensors[name]
            f = files.get(info.path) or files.setdefault(info.path, open(info.path, "rb"))
            array = _rank_array(f, name, info, rank, world)
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
    problems = match({n: tuple(v.shape) for n, v in given.items()}, {n: tuple(p.shape) for n, p in params.items()})
    if problems:
        raise LlavaError("checkpoint does not match the model: " + "; ".join(problems))
    for name, param in params.items():
        value = given[name]
        if isinstance(value, Tensor):
            param.set_data(value.astype(param.dtype))
        else:
            param.set_data(Tensor(np.asarray(value)).astype(param.dtype))
    return model


def slice_checkpoint(src, dst, tp, expected):
    """Write this rank's share of the complete checkpoint `src` to `dst` (atomically), reading one tensor at a
    time: memory stays at one full tensor, the output holds 1/N of every split weight. `expected`: name ->
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
            part = _rank_array(f, name, t, tp.rank, tp.world)
            if dtype == "bfloat16":          # read_array widened it; back to the stored bits, exactly
                raw, _ = io.convert_chunk(part.tobytes(), "float32", "bfloat16")
                writer.write_tensor(name, list(part.shape), dtype, len(raw), [raw])
            else:
                writer.write_tensor(name, list(part.shape), dtype, part.nbytes, [part.data])
            del part
        out.commit()
    return dst
