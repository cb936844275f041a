"""The weights layer: where this rank's weights come from, whether they fit the model, loading and converting them.

`--load_checkpoint` is one of
  * a complete MindSpore .ckpt (what convert_weight.py writes);
  * a folder of rank shares, `model_dir/rank_K/*.ckpt` (e.g. the transformed_checkpoint of an earlier run);
  * a Hugging Face llava-hf folder: config.json with model.safetensors, or shards listed by
    model.safetensors.index.json. It is read lazily: headers first, then one tensor at a time, only this rank's
    rows of a row-split weight, cast to the model's parameter dtype; nothing is converted or written.

Every source, and both directions of convert_weight.py, go through one strict check, `match` (missing / unknown /
wrongly shaped weights). Names, shapes and split rules live in weight_map; file formats in checkpoint_io.

  matching    match / check: the one check; expected shapes; a llava-hf config.json against the yaml
  sources     --load_checkpoint -> this rank's Checkpoint (headers only); the early check before imports
  loading     a Checkpoint into the model, one tensor at a time; the rank slicer; a dict into the model
  conversion  llava-hf folder <-> .ckpt, and llava-hf -> a pre-quantized llava-hf folder (int8 / int4 weights
              with their scales, safetensors), streamed and atomic (convert_weight.py is its command line)
  quantize    the int8 / int4 formats: quantizing at load time, the pre-quantized checkpoint's checks

MindSpore is imported only inside the functions that build tensors, so that `check_early` and the converter's
file checks run before the framework imports.
"""
from weights.matching import check, config_differences, expected_shapes, hf_names, match, read_hf_config
from weights.sources import Checkpoint, check_early, is_hf_folder, rank_checkpoint
from weights.loading import load_into, load_weights, slice_checkpoint
from weights.conversion import (SHARD_BYTES, CkptPlan, HfPlan, QuantPlan, plan_ckpt, plan_hf, plan_quantized,
                                stale_files, write_ckpt, write_hf, write_quantized)

__all__ = ["match", "check", "expected_shapes", "hf_names", "read_hf_config", "config_differences",
           "Checkpoint", "check_early", "is_hf_folder", "rank_checkpoint",
           "load_into", "load_weights", "slice_checkpoint",
           "SHARD_BYTES", "CkptPlan", "HfPlan", "QuantPlan", "plan_ckpt", "plan_hf", "plan_quantized", "stale_files",
           "write_ckpt", "write_hf", "write_quantized"]
