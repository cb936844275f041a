"""`--load_checkpoint` -> this rank's Checkpoint: a complete .ckpt, rank folders or a llava-hf folder."""
import os

import checkpoint_io as io
from file_checks import check_type
from llava_errors import LlavaError
from weights.loading import slice_checkpoint
from weights.matching import check, check_scale, config_differences, expected_shapes, hf_names, read_hf_config
from weights.quantize import check_format, check_stored, split_scales

REQUIRED = ("--load_checkpoint is required: a complete .ckpt file, a model_dir/rank_K/ folder or a "
            "llava-hf folder (config.json + safetensors)")
HF_CONFIG = "config.json"


class Checkpoint:
    """Where this rank's weights are: `tensors` (parameter name -> TensorInfo, headers only) and whether they
    are `complete` (every rank reads its share of them) or already this rank's share. A pre-quantized
    checkpoint (weights/quantize.py) also has `scales` (weight name -> TensorInfo) and the `weight_dtype` it was
    made for; a float one has none and None."""

    def __init__(self, path, tensors, complete, scales=None, weight_dtype=None):
        self.path, self.tensors, self.complete = path, tensors, complete
        self.scales, self.weight_dtype = scales or {}, weight_dtype

    def __repr__(self):
        return f"Checkpoint({self.path!r}, {len(self.tensors)} tensors, complete={self.complete})"


def is_hf_folder(path):
    """A folder laid out as llava-hf (config.json or safetensors weights), as opposed to rank folders."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in (
        HF_CONFIG, io.SAFETENSORS_FILE, io.SAFETENSORS_INDEX))


def _hf_tensors(path):
    """name -> TensorInfo of a llava-hf folder, from its headers; file-level problems name the folder."""
    if not os.path.lexists(os.path.join(path, HF_CONFIG)):
        raise LlavaError(f"--load_checkpoint {path}: has no {HF_CONFIG} (a llava-hf folder holds config.json "
                         f"and the safetensors files)")
    check_type(os.path.join(path, HF_CONFIG), "--load_checkpoint")
    try:
        return io.read_safetensors_folder(path)
    except LlavaError as e:
        raise LlavaError(f"--load_checkpoint {path}: {e}") from None


def _ckpt_file(path, complete):
    check_type(path, "--load_checkpoint")
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
    check_type(path, "--load_checkpoint", folder_ok=True)
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            raise LlavaError(f"--load_checkpoint {path}: give the llava-hf folder that holds this file and its "
                             f"config.json, not the file itself")
        _ckpt_file(path, True)
    elif is_hf_folder(path):
        _hf_tensors(path)


def _rank_file(path, rank):
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
    folder needs neither: its config.json must agree with the yaml and each rank reads its share directly.
    The checkpoint is compared with the yaml's model before the model is built: its size (check_scale), and for
    a complete checkpoint every name and shape (the check load_into makes again)."""
    checkpoint = _locate(path, tp, model_config, auto_trans_ckpt, output_dir)
    what = f"--load_checkpoint {path}: checkpoint does not match the model"
    check_scale(checkpoint.tensors, model_config, what)
    if checkpoint.weight_dtype is not None:
        check_format(checkpoint.weight_dtype, model_config.weight_dtype, f"--load_checkpoint {path}")
        if tp.world > 1:
            raise LlavaError(f"--load_checkpoint {path}: a pre-quantized checkpoint loads on one process; give "
                             f"the float checkpoint for {tp.world} tensor-parallel ranks (each quantizes its share)")
        check_stored(checkpoint.tensors, checkpoint.scales, checkpoint.weight_dtype, expected_shapes(model_config),
                     what)
    elif checkpoint.complete:
        from llama_text import is_cache_param
        check({n: t for n, t in checkpoint.tensors.items() if not is_cache_param(n)},
              expected_shapes(model_config), what)
    return checkpoint


def _split(named):
    """(tensors, complete, scales, weight_dtype) of a llava-hf folder's tensors under the model's names."""
    tensors, scales, weight_dtype = split_scales(named)
    return tensors, True, scales, weight_dtype


def _locate(path, tp, model_config, auto_trans_ckpt, output_dir):
    if not path:
        raise LlavaError(REQUIRED)
    check_type(path, "--load_checkpoint", folder_ok=True)
    if os.path.isfile(path):
        if tp.world == 1:
            return _ckpt_file(path, True)
        if not auto_trans_ckpt:
            raise LlavaError(f"--load_checkpoint {path} is a complete checkpoint: pass --auto_trans_ckpt True "
                             f"to slice it for {tp.world} ranks, or give a folder with rank_0..rank_{tp.world - 1}")
        dst = os.path.join(output_dir, "transformed_checkpoint", f"rank_{tp.rank}", f"checkpoint_{tp.rank}.ckpt")
        check_scale(_ckpt_file(path, True).tensors, model_config,
                    f"--load_checkpoint {path}: checkpoint does not match the model")
        slice_checkpoint(path, dst, tp, expected_shapes(model_config))
        return _ckpt_file(dst, False)
    if not os.path.isdir(path):
        raise LlavaError(f"--load_checkpoint {path}: no such file or folder")
    if is_hf_folder(path):
        tensors = _hf_tensors(path)
        differences = config_differences(read_hf_config(os.path.join(path, HF_CONFIG)), model_config)
        if differences:
            raise LlavaError(f"--load_checkpoint {path}: its config.json does not match the yaml's model_config "
                             f"(use the yaml made for these weights): " + "; ".join(differences))
        return Checkpoint(path, *_split(hf_names(tensors)[0]))
    ranks = sorted(d for d in os.listdir(path) if d.startswith("rank_") and os.path.isdir(os.path.join(path, d)))
    want = [f"rank_{k}" for k in range(tp.world)]
    if sorted(ranks, key=lambda d: int(d[5:]) if d[5:].isdigit() else -1) != want:
        raise LlavaError(f"--load_checkpoint {path}: has {len(ranks)} rank folder(s) "
                         f"({', '.join(ranks[:8]) or 'none'}) but the job runs {tp.world} rank(s): "
                         f"expected {', '.join(want)}")
    return _ckpt_file(_rank_file(path, tp.rank), False)
