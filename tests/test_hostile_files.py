"""[N] Hostile files: crafted .ckpt, crafted JSON (safetensors headers, config.json, the index), YAML bombs,
FIFOs and devices where a file goes, absurd config shapes, and safetensors tensors whose data overlap.

Each class is a table of cases. Most run as direct calls of the reader where the data enters (each must raise
one LlavaError, one line, naming the file and the problem, within a few seconds: a SIGALRM deadline fails
a case that hangs instead of blocking the suite); representative cases run the real commands
(convert_weight.py, run_mindformer.py --run_mode predict) from an empty folder, which must exit 2 with one
`<prog>: error:` line and no traceback, print nothing on stdout, leave no output (no .ckpt, no
.safetensors, no created output folder, no temporary file, no predict_results.jsonl) and finish in time.

Independent references: the safetensors library itself (it must refuse every safetensors file refused here,
and read the accepted ones to the same shapes), MindFormers' own yaml depth rule (check_yaml_depth_before_loading)
for the depth boundary, and mindspore.load_checkpoint for the hand-encoded .ckpt the crafted ones start from.
"""
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import CONVERT, IMAGES, PLUGIN, RUN, TINY_YAML

import checkpoint_io as io
import file_checks
import weights
from llava_errors import LlavaError

DIRECT_SECONDS = 5       # a direct case that runs longer has failed (most take milliseconds)
CLI_SECONDS = 30         # a command that fails before the framework imports
CLI_IMPORT_SECONDS = 150  # the converter's shape check needs MindFormers imported: 10-60 s on a shared machine
WORKERS = 3
CAT = os.path.join(IMAGES, "chelsea.jpg")


# ------------------------------------------------------------------------------------------------ harness
@contextlib.contextmanager
def deadline(seconds=DIRECT_SECONDS):
    """Fail (TimeoutError) instead of hanging: SIGALRM interrupts even a blocking open() of a FIFO."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(call, *needles):
    """`call()` raises exactly one LlavaError: one line holding every needle, within DIRECT_SECONDS."""
    start = time.monotonic()
    with deadline():
        with pytest.raises(LlavaError) as info:
            call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert time.monotonic() - start < DIRECT_SECONDS
    return message


def write(path, data):
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return str(path)


def fifo(path):
    os.mkfifo(path)
    return str(path)


# ------------------------------------------------------------------------------------- hand-made protobuf
# Checkpoint { repeated Value value = 1 }, Value { string tag = 1; TensorProto tensor = 2 },
# TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3 }: encoded here by
# hand from the protobuf wire format, independently of checkpoint_io's writer.
def varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def ld(field, payload, length=None):
    """A length-delimited field; `length` overrides the true length (a lie)."""
    return varint(field << 3 | 2) + varint(len(payload) if length is None else length) + payload


def tensor(dims, ttype=b"Float32", content=None, extra=b""):
    content = np.arange(int(np.prod(dims)), dtype="<f4").tobytes() if content is None else content
    return b"".join(varint(1 << 3) + varint(d) for d in dims) + ld(2, ttype) + ld(3, content) + extra


def entry(tag=b"w", body=None):
    return ld(1, ld(1, tag) + ld(2, tensor([2, 3]) if body is None else body))


GOOD_CKPT = entry(b"w") + entry(b"b", tensor([3]))
BIG = 1 << 40            # a length far beyond any of these files


def ckpt_cases():
    """name -> (file bytes, needle of the message)."""
    t = tensor([2, 3])
    return {
        "entry_longer_than_file": (varint(10) + varint(BIG) + b"\x0a\x01w", "an entry of 1099511627776 bytes"),
        "tag_longer_than_entry": (ld(1, varint(10) + varint(BIG) + b"w" * 8), "the tag of 1099511627776 bytes"),
        "tag_of_a_megabyte": (entry(b"w" * (1 << 20)), "at most 65536 expected"),
        "tensor_longer_than_entry": (ld(1, ld(1, b"w") + varint(18) + varint(BIG) + t), "the tensor of"),
        "content_longer_than_tensor": (ld(1, ld(1, b"w") + ld(2, tensor([2, 3], content=b"")[:-1]
                                                                + varint(BIG))), "runs past the end"),
        "content_length_2_63": (ld(1, ld(1, b"w") + ld(2, ld(2, b"Float32") + varint(26) + varint(1 << 63))),
                                "the tensor data of 9223372036854775808 bytes"),
        "unknown_field_of_huge_length": (ld(1, ld(1, b"w") + ld(9, b"", length=BIG)), "field 9 of"),
        "unknown_field_of_length_2_63_minus_1": (ld(1, ld(1, b"w") + ld(9, b"", length=(1 << 63) - 1)),
                                                 "field 9 of 9223372036854775807 bytes"),
        "unknown_field_inside_tensor": (entry(body=t + ld(7, b"", length=BIG)), "field 7 of"),
        "type_string_too_long": (entry(body=tensor([2], ttype=b"F" * 1000)), "at most 64 expected"),
        "varint_of_eleven_bytes": (b"\x0a" + b"\xff" * 11, "a number longer than 10 bytes"),
        "file_ends_inside_a_number": (b"\x0a\xff", "a number runs past the end"),
        "wire_type_start_group": (ld(1, ld(1, b"w") + varint(5 << 3 | 3)), "wire type 3"),
        "fixed64_past_the_entry": (ld(1, ld(1, b"w") + varint(5 << 3 | 1) + b"\0\0"), "field 5 runs past"),
        "packed_dims_past_the_tensor": (entry(body=ld(1, b"\x02", length=50) + b"\x02"), "the dims of 50 bytes"),
        "too_many_dims": (entry(body=tensor([1] * 100)), "more than 64 dims"),
        "negative_dim": (entry(body=varint(1 << 3) + varint((1 << 64) - 1) + ld(2, b"Float32") + ld(3, b"\0" * 8)),
                         "needs"),
        "entry_without_tag": (ld(1, ld(2, t)), "has no tag"),
        "empty_entry": (b"\x0a\x00", "has no tag"),
        "other_top_level_field": (b"\x12\x00", "unexpected field 2"),
        "data_not_matching_shape": (entry(body=tensor([1000, 1000], content=b"\0" * 8)), "needs 4000000"),
        "good_then_garbage": (GOOD_CKPT + b"\x0a\xff\xff\xff\xff\x0f", "runs past the end"),
    }


CKPT_CASES = sorted(ckpt_cases())


def test_hand_made_checkpoint_is_read_like_mindspore(tmp_path):
    """The base the crafted files start from is a real checkpoint: MindSpore reads it, and so does scan_ckpt."""
    import mindspore as ms
    path = write(tmp_path / "good.ckpt", GOOD_CKPT)
    params = ms.load_checkpoint(path)
    np.testing.assert_array_equal(params["w"].asnumpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    tensors = io.scan_ckpt(path)
    assert {n: (t.shape, t.dtype) for n, t in tensors.items()} == {"w": ((2, 3), "Float32"), "b": ((3,), "Float32")}
    with open(path, "rb") as f:
        np.testing.assert_array_equal(io.read_array(f, tensors["w"]), params["w"].asnumpy())


@pytest.mark.parametrize("name", CKPT_CASES)
def test_crafted_ckpt_is_one_error(tmp_path, name):
    """scan_ckpt (the converter's --reversed input) and predict's early check refuse it, naming the file."""
    data, needle = ckpt_cases()[name]
    path = write(tmp_path / f"{name}.ckpt", data)
    refused(lambda: io.scan_ckpt(path), path, needle)
    refused(lambda: weights.check_early(path), f"--load_checkpoint {path}", needle)


# Crafted files that mindspore.load_checkpoint may read anyway: 100 dims; an entry without its (proto2 required)
# tag, read as the name ""; an empty entry; 8 bytes of data for a 1000 x 1000 tensor. The scanner refuses them.
MINDSPORE_READS = {"too_many_dims", "entry_without_tag", "empty_entry", "data_not_matching_shape"}


def test_crafted_ckpt_table_is_invalid_for_mindspore_too(tmp_path):
    """MindSpore's own reader refuses the other crafted files (none is a valid checkpoint that the scanner would
    wrongly refuse)."""
    import mindspore as ms
    for name, (data, _) in ckpt_cases().items():
        if name in MINDSPORE_READS:
            continue
        path = write(tmp_path / f"{name}.ckpt", data)
        try:
            ms.load_checkpoint(path)
        except (ValueError, AttributeError):
            continue
        raise AssertionError(f"MindSpore reads {name}")


# ------------------------------------------------------------------------------------------- safetensors
def sf_bytes(header, data, raw_header=None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def f32(n, a, b):
    return {"dtype": "F32", "shape": [n], "data_offsets": [a, b]}


def deep(depth):
    return "[" * depth + "]" * depth


SF_GOOD = {
    "two_tensors": ({"a": f32(2, 0, 8), "b": f32(1, 8, 12)}, 12),
    "stored_out_of_order": ({"b": f32(1, 8, 12), "a": f32(2, 0, 8)}, 12),
    "empty_tensor": ({"a": f32(2, 0, 8), "z": f32(0, 8, 8)}, 8),
    "with_metadata": ({"__metadata__": {"format": "pt"}, "a": f32(2, 0, 8)}, 8),
}
# name -> (header dict or raw JSON text, data bytes, needle)
SF_BAD = {
    # class 13: the data ranges must tile the data area exactly
    "overlap": ({"a": f32(2, 0, 8), "b": f32(1, 4, 8)}, 8, "overlap"),
    "same_range_twice": ({"a": f32(2, 0, 8), "b": f32(2, 0, 8)}, 8, "overlap"),
    "inside_another": ({"a": f32(4, 0, 16), "b": f32(1, 4, 8), "c": f32(2, 16, 24)}, 24, "overlap"),
    "gap": ({"a": f32(1, 0, 4), "b": f32(1, 8, 12)}, 12, "belong to no tensor"),
    "not_from_zero": ({"a": f32(1, 4, 8)}, 8, "belong to no tensor"),
    "trailing_bytes": ({"a": f32(2, 0, 8)}, 12, "after the last tensor"),
    "past_the_end": ({"a": f32(2, 0, 8), "b": f32(2, 8, 16)}, 12, "truncated"),
    "offset_far_out": ({"a": f32(1, 1 << 50, (1 << 50) + 4)}, 4, "belong to no tensor"),
    "begin_after_end": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, 8, "data_offsets"),
    # class 6: JSON types where the reader expects a string, a list of sizes, two offsets, an object
    "dtype_is_a_list": ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, 8, "dtype"),
    "dtype_is_an_object": ({"a": {"dtype": {"F": 32}, "shape": [2], "data_offsets": [0, 8]}}, 8, "dtype"),
    "dtype_missing": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, 8, "dtype"),
    "dtype_unknown": ({"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype"),
    "shape_is_a_string": ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, 8, "shape"),
    "shape_has_a_bool": ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, "shape"),
    "shape_negative": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "shape"),
    "shape_float": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, "shape"),
    "shape_nested": ({"a": {"dtype": "F32", "shape": [[2]], "data_offsets": [0, 8]}}, 8, "shape"),
    "offsets_one_number": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, 8, "data_offsets"),
    "offsets_strings": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, 8, "data_offsets"),
    "offsets_object": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": {"0": 8}}}, 8, "data_offsets"),
    "entry_is_a_list": ({"a": ["F32", [2], [0, 8]]}, 8, "not an object"),   # the library reads it by position
    "metadata_is_a_list": ({"__metadata__": ["pt"], "a": f32(2, 0, 8)}, 8, "__metadata__"),
    "metadata_value_number": ({"__metadata__": {"step": 3}, "a": f32(2, 0, 8)}, 8, "__metadata__"),
    "header_is_a_list": ([f32(2, 0, 8)], 8, "not a JSON object"),
    "header_nested_100000": ('{"__metadata__": {"x": ' + deep(100000) + '}}', 0, "nests 100002 levels deep"),
    "header_nested_40": ('{"a": ' + deep(40) + '}', 0, "nests 41 levels deep"),
    "header_nan": ('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', 8, "NaN"),
    "header_not_utf8": (b'{"\xff": 1}', 0, "not UTF-8"),
    "header_not_json": ("{not json", 0, "not valid JSON"),
}


def sf_file(folder, name, spec, data_len):
    header = spec if isinstance(spec, (dict, list)) else None
    raw = None if header is not None else (spec if isinstance(spec, bytes) else spec.encode())
    return write(os.path.join(folder, f"{name}.safetensors"), sf_bytes(header, b"\x01" * data_len, raw))


@pytest.mark.parametrize("name", sorted(SF_GOOD))
def test_valid_safetensors_are_read_like_the_library(tmp_path, name):
    from safetensors.numpy import load_file
    path = sf_file(tmp_path, name, *SF_GOOD[name])
    ours = io.read_safetensors_header(path)
    theirs = load_file(path)
    assert {k: t.shape for k, t in ours.items()} == {k: v.shape for k, v in theirs.items()}
    with open(path, "rb") as f:
        for k, t in ours.items():
            np.testing.assert_array_equal(io.read_array(f, t), theirs[k])


@pytest.mark.parametrize("name", sorted(SF_BAD))
def test_malformed_safetensors_header_is_one_error(tmp_path, name):
    """Refused here (naming the file and the problem) and by the safetensors library."""
    from safetensors import safe_open
    spec, data_len, needle = SF_BAD[name]
    path = sf_file(tmp_path, name, spec, data_len)
    refused(lambda: io.read_safetensors_header(path), path, needle)
    if name == "entry_is_a_list":
        return       # serde, under the library, also reads a struct from a list; the format says an object
    with pytest.raises(Exception):
        with safe_open(path, "np") as f:
            [f.get_tensor(k) for k in f.keys()]


# ------------------------------------------------------------------------------- config.json and the index
def hf_config_text(tiny_hf_dir):
    import llava_config  # noqa: F401  (the MindFormers import, once, outside the timed calls)
    with open(os.path.join(tiny_hf_dir, "config.json")) as f:
        return json.load(f)


def config_cases(cfg):
    """name -> (config.json text, needle)."""
    def edit(fn):
        c = json.loads(json.dumps(cfg))
        fn(c)
        return json.dumps(c)
    return {
        "nested_100000": ('{"model_type": "llava", "x": ' + deep(100000) + "}", "nests 100001 levels deep"),
        "nested_in_text_config": (edit(lambda c: c["text_config"].update(x=json.loads(deep(33)))), "nests 35"),
        "top_level_list": ("[" + json.dumps(cfg) + "]", "not a LLaVA config"),
        "vision_config_list": (edit(lambda c: c.update(vision_config=[1, 2])), "vision_config must be an object"),
        "text_config_string": (edit(lambda c: c.update(text_config="llama")), "text_config must be an object"),
        "positions_list": (edit(lambda c: c["text_config"].update(max_position_embeddings=[2048])),
                           "max_position_embeddings must be int"),
        "hidden_size_string": (edit(lambda c: c["text_config"].update(hidden_size="64")), "hidden_size must be int"),
        "hidden_act_list": (edit(lambda c: c["text_config"].update(hidden_act=["silu"])), "hidden_act must be str"),
        "layers_float": (edit(lambda c: c["vision_config"].update(num_hidden_layers=2.5)),
                         "num_hidden_layers must be int"),
        "eps_nan": (json.dumps(cfg).replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN'), "NaN"),
        "not_utf8": (b'{"model_type": "llava\xff"}', "not UTF-8"),
    }


def test_config_cases_are_crafted_as_meant(tiny_hf_dir):
    cfg = hf_config_text(tiny_hf_dir)
    assert cfg["text_config"]["rms_norm_eps"] == 1e-05 and '"rms_norm_eps": 1e-05' in json.dumps(cfg)


@pytest.mark.parametrize("name", sorted(config_cases({"text_config": {}, "vision_config": {}})))
def test_crafted_config_json_is_one_error(tmp_path, tiny_hf_dir, name):
    text, needle = config_cases(hf_config_text(tiny_hf_dir))[name]
    path = write(tmp_path / "config.json", text)
    refused(lambda: weights.read_hf_config(path), path, needle)


def index_cases():
    """name -> (model.safetensors.index.json text, needle)."""
    wm = lambda m: json.dumps({"metadata": {}, "weight_map": m})  # noqa: E731
    return {
        "nested_100000": ('{"weight_map": {}, "x": ' + deep(100000) + "}", "nests 100001 levels deep"),
        "top_level_list": ("[]", "no 'weight_map'"),
        "weight_map_list": (json.dumps({"weight_map": ["model.safetensors"]}), "no 'weight_map'"),
        "weight_map_value_list": (wm({"a": ["model.safetensors"]}), "no 'weight_map'"),
        "shard_outside_the_folder": (wm({"a": "../model.safetensors"}), "../model.safetensors"),
        "shard_absolute_device": (wm({"a": "/dev/zero"}), "/dev/zero"),
        "shard_pickle": (wm({"a": "pytorch_model.bin"}), "pytorch_model.bin"),
        "not_json": ("{", "not valid JSON"),
    }


@pytest.mark.parametrize("name", sorted(index_cases()))
def test_crafted_index_is_one_error(tmp_path, tiny_hf_dir, name):
    text, needle = index_cases()[name]
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir, "config.json"), folder / "config.json")
    os.symlink(os.path.join(tiny_hf_dir, "model.safetensors"), folder / "model.safetensors")
    path = write(folder / "model.safetensors.index.json", text)
    refused(lambda: io.read_safetensors_folder(str(folder)), path, needle)


def test_json_depth_limit_can_be_raised(tmp_path, monkeypatch):
    path = write(tmp_path / "x.json", '{"a": ' + deep(40) + "}")
    refused(lambda: file_checks.load_json(path), "LLAVA_JSON_MAX_DEPTH")
    monkeypatch.setenv("LLAVA_JSON_MAX_DEPTH", "41")
    assert file_checks.load_json(path) == {"a": json.loads(deep(40))}
    monkeypatch.setenv("LLAVA_JSON_MAX_DEPTH", "lots")
    refused(lambda: file_checks.load_json(path), "LLAVA_JSON_MAX_DEPTH='lots' must be a positive integer")
    monkeypatch.delenv("LLAVA_JSON_MAX_DEPTH")
    big = write(tmp_path / "big.json", json.dumps({"a": "x" * (16 << 20)}))
    refused(lambda: file_checks.load_json(big), big, "larger than 16777216 bytes", "LLAVA_JSON_MAX_BYTES")
    monkeypatch.setenv("LLAVA_JSON_MAX_BYTES", str(17 << 20))
    assert len(file_checks.load_json(big)["a"]) == 16 << 20


@pytest.mark.parametrize("text,depth", [("{}", 1), ('{"a": "[[[{{"}', 1), ('[{"a": [1, [2]]}, "]]]"]', 4),
                                        ('{"a\\"[": [["\\\\"]]}', 3), ("1", 0)])
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert file_checks.json_depth(text.encode()) == (depth, True)


# ------------------------------------------------------------------------------------------------- YAML
def nested_mapping(depth):
    """A mapping `depth` levels deep (a scalar at the bottom)."""
    return "".join("  " * i + f"k{i}:\n" for i in range(depth - 1)) + "  " * (depth - 1) + "leaf: 1\n"


def laughs(levels, fan=10):
    lines = ["a0: &a0 [" + ", ".join(["lol"] * fan) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
    return "\n".join(lines) + "\n"


YAML_CASES = {
    "billion_laughs": (laughs(9), "expands to more than 100000 nodes"),
    "laughs_in_mappings": ("a0: &a0 {x: 1, y: 2, z: 3}\n" + "".join(
        f"a{i}: &a{i} {{" + ", ".join(f"k{j}: *a{i - 1}" for j in range(10)) + "}\n" for i in range(1, 8)),
        "expands to more than"),
    "laughs_by_merge_keys": ("a0: &a0 {" + ", ".join(f"k{j}: [1, 2, 3, 4, 5, 6, 7, 8]" for j in range(50)) + "}\n"
                             + "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 5))
                             + "m: {<<: *a0}\n", "expands to more than"),
    "recursive_list": ("a: &a [1, *a]\n", "recursive alias"),
    "recursive_mapping": ("model: &m\n  model_config: *m\n", "recursive alias"),
    "recursive_indirect": ("a: &a {b: &b {c: [*a]}}\n", "recursive alias"),
    "mapping_11_deep": (nested_mapping(11), "nests deeper than 10 levels"),
    "mapping_1000_deep": (nested_mapping(1000), "nests deeper than 10 levels"),
    "list_100000_deep": ("x: " + deep(100000) + "\n", "nests deeper than 10 levels"),
    "flow_mapping_5000_deep": ("{a: " * 5000 + "1" + "}" * 5000 + "\n", "nests deeper than 10 levels"),
    "alias_makes_it_deeper": ("a: &a {b: {c: {d: {e: {f: 1}}}}}\nx: {y: {z: {w: {v: {u: *a}}}}}\n",
                              "through its aliases"),
    "over_a_megabyte": ("# " + "x" * (1 << 20) + "\nmodel: {}\n", "larger than 1048576 bytes"),
    "python_tag": ("a: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "two_documents": ("a: 1\n---\nb: 2\n", "not valid YAML"),
    "not_utf8": (b"a: \xff\n", "not UTF-8"),
}


@pytest.mark.parametrize("name", sorted(YAML_CASES))
def test_hostile_yaml_is_one_error(tmp_path, name):
    """The predict job's yaml reader (the one place the plugin reads yaml) refuses it in milliseconds."""
    import llava_predict
    text, needle = YAML_CASES[name]
    path = write(tmp_path / f"{name}.yaml", text)
    refused(lambda: llava_predict.read_yaml(path), f"--config {path}", needle)


@pytest.mark.parametrize("depth", [1, 5, 10, 11, 12])
def test_yaml_mapping_depth_limit_is_mindformers_limit(tmp_path, depth):
    """Mappings: accepted exactly when MindFormers' own loader check accepts them (depth <= 10)."""
    import yaml
    from mindformers.tools.check_rules import check_yaml_depth_before_loading
    text = nested_mapping(depth)
    path = write(tmp_path / "d.yaml", text)
    try:
        check_yaml_depth_before_loading(text)
        mindformers_ok = True
    except ValueError:
        mindformers_ok = False
    assert mindformers_ok == (depth <= 10)
    if mindformers_ok:
        assert file_checks.load_yaml(path) == yaml.safe_load(text)
    else:
        refused(lambda: file_checks.load_yaml(path), "nests deeper than 10 levels")


def test_yaml_limits_can_be_raised(tmp_path, monkeypatch):
    import yaml
    deep11 = write(tmp_path / "deep.yaml", nested_mapping(11))
    bomb = write(tmp_path / "bomb.yaml", laughs(5))         # 10^5 + ... nodes
    refused(lambda: file_checks.load_yaml(deep11), "LLAVA_YAML_MAX_DEPTH")
    refused(lambda: file_checks.load_yaml(bomb), "LLAVA_YAML_MAX_NODES")
    monkeypatch.setenv("LLAVA_YAML_MAX_DEPTH", "11")
    monkeypatch.setenv("LLAVA_YAML_MAX_NODES", "200000")
    assert file_checks.load_yaml(deep11) == yaml.safe_load(nested_mapping(11))
    assert file_checks.load_yaml(bomb)["a4"][9][9][9][9] == ["lol"] * 10
    monkeypatch.setenv("LLAVA_YAML_MAX_BYTES", "100")
    refused(lambda: file_checks.load_yaml(deep11), "larger than 100 bytes", "LLAVA_YAML_MAX_BYTES")


def test_shipped_yamls_load_as_safe_load_does():
    import yaml
    for folder in ("llava_tiny", "llava1_5_7B"):
        path = os.path.join(PLUGIN, folder, os.listdir(os.path.join(PLUGIN, folder))[0])
        with open(path) as f:
            assert file_checks.load_yaml(path) == yaml.safe_load(f)


# --------------------------------------------------------------------------------------- special files
def special_files(tmp_path):
    """kind -> a path of that kind (a FIFO, a character device, a socket)."""
    sock_path = str(tmp_path / "sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)
    s.close()
    return {"FIFO": fifo(tmp_path / "fifo"), "character device": "/dev/zero", "socket": sock_path}


def hf_folder_with(tmp_path, tiny_hf_dir, name, kind_path):
    """A llava-hf folder whose file `name` is a symlink to the special file."""
    folder = tmp_path / f"hf_{name}"
    folder.mkdir()
    for n in ("config.json", "model.safetensors"):
        os.symlink(kind_path if n == name else os.path.join(tiny_hf_dir, n), folder / n)
    return str(folder)


READERS = {
    "scan_ckpt": lambda p, tmp, hf: (lambda: io.scan_ckpt(p), p),
    "safetensors_header": lambda p, tmp, hf: (lambda: io.read_safetensors_header(p), p),
    "hf_config": lambda p, tmp, hf: (lambda: weights.read_hf_config(p), p),
    "yaml": lambda p, tmp, hf: (lambda: file_checks.load_yaml(p, "--config"), f"--config {p}"),
    "load_checkpoint": lambda p, tmp, hf: (lambda: weights.check_early(p), f"--load_checkpoint {p}"),
    "folder_weights": lambda p, tmp, hf: (
        lambda f=hf_folder_with(tmp, hf, "model.safetensors", p): io.read_safetensors_folder(f), "model.safetensors"),
    "folder_config": lambda p, tmp, hf: (
        lambda f=hf_folder_with(tmp, hf, "config.json", p): weights.check_early(f), "config.json"),
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("kind", ["FIFO", "character device", "socket"])
def test_special_file_is_refused_at_once(tmp_path, tiny_hf_dir, reader, kind):
    path = special_files(tmp_path)[kind]
    call, label = READERS[reader](path, tmp_path, tiny_hf_dir)
    refused(call, label, "is not a regular file", kind)


def test_fifo_swapped_in_after_the_check_does_not_block(tmp_path, monkeypatch):
    """The type is checked on the opened file too: a FIFO that replaces the file between the check and the
    open is refused without blocking."""
    path = str(tmp_path / "x.yaml")
    fifo(path)
    monkeypatch.setattr(file_checks, "check_type", lambda *a, **k: None)
    refused(lambda: file_checks.load_yaml(path), "is not a regular file (it is a FIFO)")


# ----------------------------------------------------------------------------------------- absurd shapes
# name -> (config.json edit, needles). Layer counts beyond the files' tensors are refused from the counts alone;
# absurd sizes by the strict check's wrong-shape figures (listing a few names is cheap).
SHAPE_CASES = {
    "text_layers_1e9": (("text_config", "num_hidden_layers", 10 ** 9),
                        ["9000000062 weight tensors", "text_config num_layers=1000000000", "holds 80 tensors"]),
    "vision_layers_1e9": (("vision_config", "num_hidden_layers", 10 ** 9),
                          ["16000000032 weight tensors", "vision_config num_hidden_layers=1000000000"]),
    "text_layers_1e6": (("text_config", "num_hidden_layers", 10 ** 6),
                        ["9000062 weight tensors", "num_layers=1000000)", "holds 80 tensors"]),
    "vocab_1e12": (("text_config", "vocab_size", 10 ** 12), ["2 with the wrong shape", "[1000000000000, 64]"]),
    "intermediate_1e9": (("text_config", "intermediate_size", 10 ** 9), ["6 with the wrong shape", "1000000000"]),
    "vision_hidden_1e8": (("vision_config", "hidden_size", 10 ** 8), ["with the wrong shape", "100000000"]),
}


def shape_config(tmp_path, tiny_hf_dir, section, key, value):
    cfg = hf_config_text(tiny_hf_dir)
    cfg[section][key] = value
    return weights.read_hf_config(write(tmp_path / "config.json", json.dumps(cfg)))


@pytest.mark.parametrize("name", sorted(SHAPE_CASES))
def test_absurd_config_is_refused_with_figures_at_once(tmp_path, tiny_hf_dir, name):
    """In both directions of the converter, against the files' own tensors, before any name is listed."""
    (section, key, value), needles = SHAPE_CASES[name]
    config = shape_config(tmp_path, tiny_hf_dir, section, key, value)
    tensors = io.read_safetensors_folder(tiny_hf_dir)
    refused(lambda: weights.plan_ckpt(tensors, config, tiny_hf_dir), "does not match the LLaVA config", *needles)
    ms_named = weights.hf_names(tensors)[0]
    refused(lambda: weights.plan_hf(ms_named, config, "x.ckpt"), "does not match the LLaVA config", *needles)


def test_predict_refuses_an_absurd_yaml_model_before_building_it(tmp_path, tiny_hf_dir):
    """run_mindformer.py's weights step (rank_checkpoint, before the model is built) compares the yaml's model
    with the checkpoint the same way."""
    from types import SimpleNamespace
    config = weights.read_hf_config(os.path.join(tiny_hf_dir, "config.json"))
    ckpt = str(tmp_path / "tiny.ckpt")
    weights.write_ckpt(weights.plan_ckpt(io.read_safetensors_folder(tiny_hf_dir), config, tiny_hf_dir), ckpt)
    tp = SimpleNamespace(rank=0, world=1, enabled=False)
    assert weights.rank_checkpoint(ckpt, tp, config).complete
    for name in ("text_layers_1e9", "vision_hidden_1e8"):
        (section, key, value), needles = SHAPE_CASES[name]
        absurd = shape_config(tmp_path, tiny_hf_dir, section, key, value)
        refused(lambda: weights.rank_checkpoint(ckpt, tp, absurd), f"--load_checkpoint {ckpt}",
                "checkpoint does not match the model", *needles)


def test_a_near_miss_still_lists_the_names(tmp_path, tiny_hf_dir):
    """One layer too many is not 'absurd': the message names the missing weights."""
    cfg = hf_config_text(tiny_hf_dir)
    layers = cfg["text_config"]["num_hidden_layers"]
    config = shape_config(tmp_path, tiny_hf_dir, "text_config", "num_hidden_layers", layers + 1)
    refused(lambda: weights.plan_ckpt(io.read_safetensors_folder(tiny_hf_dir), config, tiny_hf_dir),
            "missing", f"layers.{layers}.")


def test_tiny_figures_are_the_real_ones(tiny_hf_dir):
    """The counts check_scale compares: the tiny model's own config describes exactly its files."""
    import weight_map
    config = weights.read_hf_config(os.path.join(tiny_hf_dir, "config.json"))
    named = weights.hf_names(io.read_safetensors_folder(tiny_hf_dir))[0]
    assert weight_map.param_totals(config) == (len(named), sum(int(np.prod(t.shape)) for t in named.values()))


# ------------------------------------------------------------------------------------ the commands
class Cli:
    """One command that must fail: argv(out) given the output path/folder inside the empty working folder."""

    def __init__(self, prog, argv, needles, seconds=CLI_SECONDS):
        self.prog, self.argv, self.needles, self.seconds = prog, argv, needles, seconds


def _run(work, case):
    cwd, tmp = os.path.join(work, "cwd"), os.path.join(work, "tmp")
    os.makedirs(cwd)
    os.makedirs(tmp)
    out = os.path.join(cwd, "out")
    os.makedirs(out)
    env = dict(os.environ, GLOG_v="3", TMPDIR=tmp)
    env.pop("LOG_MF_PATH", None)
    start = time.monotonic()
    try:
        proc = subprocess.run(case.argv(out), cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=case.seconds)
    except subprocess.TimeoutExpired:
        return None, cwd, out, tmp, case.seconds
    return proc, cwd, out, tmp, time.monotonic() - start


def _leftovers(cwd, out, tmp):
    """Anything the run left: outside out/, or in out/ other than MindFormers' log folder."""
    left = [n for n in os.listdir(cwd) if n != "out"] + [f"TMPDIR/{n}" for n in os.listdir(tmp)]
    if os.path.isdir(out):
        left += [f"out/{n}" for n in os.listdir(out) if n != "log"]
    return left


def cli_cases(base, hf):
    C, P = "convert_weight.py", "run_mindformer.py"
    cases = {}
    inp = os.path.join(base, "inputs")
    os.makedirs(inp)
    j = lambda *n: os.path.join(inp, *n)  # noqa: E731
    cfg_path = os.path.join(hf, "config.json")

    def folder(name, files):
        """A llava-hf folder: file name -> bytes, or a path to symlink, or None for a FIFO."""
        path = j(name)
        os.makedirs(path)
        for n, v in files.items():
            if v is None:
                fifo(os.path.join(path, n))
            elif isinstance(v, bytes):
                write(os.path.join(path, n), v)
            else:
                os.symlink(v, os.path.join(path, n))
        return path

    def forward(name, files, needles, seconds=CLI_SECONDS):
        src = folder(name, files)
        cases["conv_" + name] = Cli(C, lambda out: [sys.executable, CONVERT, "--model", "llava", "--input_path", src,
                                                     "--output_path", os.path.join(out, "x.ckpt")],
                                    [src] + needles, seconds)

    def reversed_(name, ckpt, needles, config=cfg_path):
        cases["conv_rev_" + name] = Cli(C, lambda out: [
            sys.executable, CONVERT, "--model", "llava", "--reversed", "--input_path", ckpt, "--config", config,
            "--output_path", os.path.join(out, "hf")], ([ckpt] if config == cfg_path else []) + needles)

    def predict(name, needles, cfg=TINY_YAML, ckpt=None):
        cases["pred_" + name] = Cli(P, lambda out: [
            sys.executable, RUN, "--config", cfg, "--register_path", PLUGIN, "--run_mode", "predict",
            "--predict_data", CAT, "Describe the image.", "--modal_type", "image", "text",
            "--load_checkpoint", ckpt or hf, "--use_parallel", "False", "--output_dir", out], needles)

    weights_path = os.path.join(hf, "model.safetensors")
    with open(weights_path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    # b takes the bytes of a, stored before it: the overlap comes before the gap b leaves behind
    same = next((a, b) for a in names for b in names if header[a]["data_offsets"] < header[b]["data_offsets"]
                and header[a]["shape"] == header[b]["shape"] and header[a]["dtype"] == header[b]["dtype"])
    overlapped = dict(header, **{same[1]: dict(header[same[1]], data_offsets=header[same[0]]["data_offsets"])})
    listed = dict(header, **{names[0]: dict(header[names[0]], dtype=[header[names[0]]["dtype"]])})

    def resave(h):
        return sf_bytes(h, raw[8 + n:])

    cfg_bytes = open(cfg_path, "rb").read()
    absurd = json.loads(cfg_bytes)
    absurd["text_config"]["num_hidden_layers"] = 10 ** 9
    # class 11: special files
    forward("fifo_config", {"config.json": None, "model.safetensors": weights_path},
            ["config.json", "is not a regular file (it is a FIFO)"])
    forward("fifo_weights", {"config.json": cfg_path, "model.safetensors": None},
            ["model.safetensors", "is not a regular file (it is a FIFO)"])
    forward("device_weights", {"config.json": cfg_path, "model.safetensors": "/dev/zero"},
            ["model.safetensors", "is not a regular file (it is a character device)"])
    reversed_("fifo_input", fifo(j("in.ckpt")), ["is not a regular file or folder (it is a FIFO)"])
    reversed_("device_config", j("good.ckpt"), ["/dev/zero", "is not a regular file"], config="/dev/zero")
    write(j("good.ckpt"), GOOD_CKPT)
    predict("fifo_checkpoint", ["--load_checkpoint", "is not a regular file or folder (it is a FIFO)"],
            ckpt=fifo(j("p.ckpt")))
    predict("fifo_yaml", ["--config", "is not a regular file (it is a FIFO)"], cfg=fifo(j("p.yaml")))
    # class 13 and 6: the safetensors header, the index, config.json
    forward("overlapping_tensors", {"config.json": cfg_path, "model.safetensors": resave(overlapped)},
            ["model.safetensors", "overlap", same[0], same[1]])
    forward("dtype_list", {"config.json": cfg_path, "model.safetensors": resave(listed)},
            ["model.safetensors", "dtype is not a string"])
    forward("deep_header", {"config.json": cfg_path, "model.safetensors": sf_bytes(
        None, b"", ('{"__metadata__": {"a": ' + deep(50000) + "}}").encode())}, ["nests 50002 levels deep"])
    forward("deep_index", {"config.json": cfg_path, "model.safetensors": weights_path,
                           "model.safetensors.index.json": ('{"weight_map": ' + deep(50000) + "}").encode()},
            ["model.safetensors.index.json", "nests 50001 levels deep"])
    forward("deep_config", {"config.json": ('{"model_type": "llava", "x": ' + deep(50000) + "}").encode(),
                            "model.safetensors": weights_path},
            ["config.json", "nests 50001 levels deep"])
    # class 12: absurd shapes
    forward("layers_1e9", {"config.json": json.dumps(absurd).encode(), "model.safetensors": weights_path},
            ["text_config num_layers=1000000000", "the checkpoint holds 80 tensors"], CLI_IMPORT_SECONDS)
    # class 5: crafted checkpoints
    for name in ("tag_longer_than_entry", "content_length_2_63", "unknown_field_of_huge_length", "tag_of_a_megabyte"):
        data, needle = ckpt_cases()[name]
        path = write(j(f"{name}.ckpt"), data)
        reversed_(name, path, [needle])
        predict(name, [f"--load_checkpoint {path}", needle], ckpt=path)
    # class 7: yaml
    for name in ("billion_laughs", "recursive_mapping", "mapping_11_deep", "list_100000_deep"):
        text, needle = YAML_CASES[name]
        path = write(j(f"{name}.yaml"), text)
        predict("yaml_" + name, [f"--config {path}", needle], cfg=path)
    return cases


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_hf_dir):
    base = str(tmp_path_factory.mktemp("hostile_cli"))
    cases = cli_cases(base, tiny_hf_dir)
    order = sorted(cases, key=lambda k: cases[k].seconds, reverse=True)   # the slow ones first
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {k: pool.submit(_run, os.path.join(base, "runs", k), cases[k]) for k in order}
        yield cases, {k: f.result() for k, f in futures.items()}


CLI_CASES = ["conv_fifo_config", "conv_fifo_weights", "conv_device_weights", "conv_rev_fifo_input",
             "conv_rev_device_config", "pred_fifo_checkpoint", "pred_fifo_yaml", "conv_overlapping_tensors",
             "conv_dtype_list", "conv_deep_header", "conv_deep_index", "conv_deep_config", "conv_layers_1e9"] + [
    f"{p}{n}" for n in ("tag_longer_than_entry", "content_length_2_63", "unknown_field_of_huge_length",
                        "tag_of_a_megabyte") for p in ("conv_rev_", "pred_")] + [
    f"pred_yaml_{n}" for n in ("billion_laughs", "recursive_mapping", "mapping_11_deep", "list_100000_deep")]


def test_every_cli_case_is_listed(cli_runs):
    assert sorted(cli_runs[0]) == sorted(CLI_CASES)


@pytest.mark.parametrize("name", CLI_CASES)
def test_command_fails_with_one_line(cli_runs, name):
    cases, runs = cli_runs
    case = cases[name]
    proc, cwd, out, tmp, seconds = runs[name]
    assert proc is not None, f"still running after {seconds} s"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    why = f"exit {proc.returncode} after {seconds:.1f} s: {proc.stderr[-2000:]}"
    assert proc.returncode == 2, why
    assert "Traceback" not in proc.stderr, why
    assert last.startswith(f"{case.prog}: error: "), why
    for needle in case.needles:
        assert needle in last, (needle, why)
    assert proc.stdout.strip() == "", why
    assert _leftovers(cwd, out, tmp) == [], why
