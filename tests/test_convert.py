"""[D] convert_weight.py --model llava: streaming safetensors <-> MindSpore .ckpt, validated, and weight_map.

Expected values come from the Hugging Face files themselves (read with the `safetensors` library and numpy,
casts done by numpy / torch), from MindSpore's own `load_checkpoint` / `save_checkpoint` / protobuf classes,
and from the real 7B key listing; never from the converter's own reader.
"""
import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import helpers
from helpers import CONVERT, ROOT, config_of, hf_tensors, interrupt_convert, signal_midway
from llava_config import LlavaConfig
from llava_errors import LlavaError
import checkpoint_io
import weight_map

FIXTURE_KEYS = os.path.join(ROOT, "tests", "fixtures", "llava_1_5_7b_keys.json")
sys.path.insert(0, ROOT)
import convert_weight as cw  # noqa: E402


def run_cli(*args, cwd=None, timeout=300):
    """convert_weight.py --model llava *args; cwd None: this process's working folder."""
    return helpers.run_cli([CONVERT, "--model", "llava", *args], cwd=cwd, timeout=timeout)


def leftovers(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


def config_7b():
    with open(FIXTURE_KEYS) as f:
        return LlavaConfig.from_hf_config(json.load(f)["config"])


# ------------------------------------------------------------------------------------------------ weight_map

def test_expected_params_equal_real_7b_listing(real_7b_keys):
    expected = weight_map.expected_params(config_7b())
    assert {k: list(v[0]) for k, v in expected.items()} == real_7b_keys


def test_expected_params_match_the_hf_fixtures(tiny_hf_dir, tiny_gqa_hf_dir):
    for folder in (tiny_hf_dir, tiny_gqa_hf_dir):
        tensors = hf_tensors(folder)
        expected = weight_map.expected_params(config_of(folder))
        assert {weight_map.hf_to_ms(k): v.shape for k, v in tensors.items()} == \
            {k: v[0] for k, v in expected.items()}


def test_names_and_split_rules(real_7b_keys):
    rules = {}
    for name in real_7b_keys:
        ms = weight_map.hf_to_ms(name)
        assert ms == name  # the model's parameters mirror the llava-hf legacy names
        assert weight_map.ms_to_hf(ms) == name
        rules[name] = weight_map.split_rule(ms)
    assert rules == {k: v[1] for k, v in weight_map.expected_params(config_7b()).items()}
    t = "language_model.model.layers.7."
    assert [rules[t + p] for p in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                   "mlp.gate_proj.weight", "mlp.up_proj.weight")] == ["column"] * 5
    assert rules[t + "self_attn.o_proj.weight"] == rules[t + "mlp.down_proj.weight"] == "row"
    assert rules["language_model.model.embed_tokens.weight"] == rules["language_model.lm_head.weight"] == "vocab"
    assert rules[t + "input_layernorm.weight"] == rules["language_model.model.norm.weight"] == "replicated"
    assert all(rules[k] == "replicated" for k in rules if not k.startswith("language_model."))
    assert weight_map.split_axis(t + "self_attn.o_proj.weight") == 1
    assert weight_map.split_axis(t + "self_attn.q_proj.weight") == 0
    assert weight_map.split_axis("multi_modal_projector.linear_1.weight") is None
    for bad in ("language_model.model.layers.0.self_attn.qkv.weight", "model.embed_tokens.weight", ""):
        with pytest.raises(LlavaError, match="unknown"):
            weight_map.hf_to_ms(bad)
        with pytest.raises(LlavaError, match="unknown"):
            weight_map.split_rule(bad)
    assert weight_map.is_ignored_hf("vision_tower.vision_model.embeddings.position_ids")
    assert weight_map.is_ignored_hf("language_model.model.layers.3.self_attn.rotary_emb.inv_freq")
    assert not weight_map.is_ignored_hf("language_model.model.norm.weight")


def test_shard_slices_follow_the_split_rule():
    rng = np.random.default_rng(0)
    cases = {"language_model.model.layers.0.self_attn.q_proj.weight": (8, 6, 0),
             "language_model.model.layers.0.mlp.down_proj.weight": (6, 8, 1),
             "language_model.lm_head.weight": (12, 4, 0),
             "language_model.model.layers.0.input_layernorm.weight": (6, None, None)}
    for name, (a, b, axis) in cases.items():
        full = rng.standard_normal((a,) if b is None else (a, b)).astype(np.float32)
        parts = [weight_map.shard(name, full, r, 2) for r in range(2)]
        if axis is None:
            assert all(p is full for p in parts)
        else:
            assert all(p.shape[axis] == full.shape[axis] // 2 for p in parts)
            np.testing.assert_array_equal(np.concatenate(parts, axis=axis), full)
    with pytest.raises(LlavaError, match=r"q_proj.*not divisible by 4"):
        weight_map.shard("language_model.model.layers.0.self_attn.q_proj.weight", np.zeros((6, 4)), 0, 4)
    with pytest.raises(LlavaError, match="rank"):
        weight_map.shard("language_model.lm_head.weight", np.zeros((4, 4)), 2, 2)


def test_check_parallel(tiny_gqa_hf_dir):
    cfg = config_7b()
    for world in (1, 2, 4, 8, 16, 32):
        weight_map.check_parallel(cfg, world)
    with pytest.raises(LlavaError, match="num_heads=32 is not divisible by 3"):
        weight_map.check_parallel(cfg, 3)
    with pytest.raises(LlavaError, match="64 ranks exceed text_config.n_kv_heads=32"):
        weight_map.check_parallel(cfg, 64)
    gqa = config_of(tiny_gqa_hf_dir)   # 6 heads, 2 KV heads
    weight_map.check_parallel(gqa, 2)
    with pytest.raises(LlavaError, match="n_kv_heads=2"):
        weight_map.check_parallel(gqa, 3)
    with pytest.raises(LlavaError, match="positive integer"):
        weight_map.check_parallel(gqa, 0)


# ------------------------------------------------------------------------------------ checkpoint format

def test_entry_encoding_is_protobuf_checkpoint():
    from mindspore.train.checkpoint_pb2 import Checkpoint
    for tag, dims, ttype, content in (("a.b", [3, 4], "Float32", b"\x01" * 48),
                                      ("vision_tower.x" * 20, [300, 70000], "BFloat16", b"\x02" * 1000),
                                      ("s", [7], "Float16", b"")):
        msg = Checkpoint()
        value = msg.value.add()
        value.tag = tag
        value.tensor.dims.extend(dims)
        value.tensor.tensor_type = ttype
        value.tensor.tensor_content = content
        assert checkpoint_io.ckpt_entry_header(tag, dims, ttype, len(content)) + content == msg.SerializeToString()


def test_sliced_entries_are_joined_by_load_checkpoint(tmp_path):
    """Tensors bigger than a slice are written as several entries, as save_checkpoint does for > 512 MB."""
    import mindspore as ms
    x = np.arange(3 * 1001, dtype=np.float32).reshape(3, 1001)
    y = np.arange(7, dtype=np.float16)
    path = str(tmp_path / "sliced.ckpt")
    with open(path, "wb") as f:
        w = checkpoint_io.CkptWriter(f, slice_bytes=1000)
        w.write_tensor("a", x.shape, "float32", x.nbytes,
                       checkpoint_io.iter_chunks(io.BytesIO(x.tobytes()), [(0, x.nbytes)], 4, chunk_bytes=333))
        w.write_tensor("b", y.shape, "float16", y.nbytes, [y.tobytes()])
    params = ms.load_checkpoint(path)
    np.testing.assert_array_equal(params["a"].asnumpy(), x)
    np.testing.assert_array_equal(params["b"].asnumpy(), y)
    scanned = checkpoint_io.scan_ckpt(path)
    assert len(scanned["a"].segments) == 13 and scanned["a"].nbytes == x.nbytes and scanned["a"].shape == (3, 1001)


def test_dtype_casts_match_torch():
    import torch
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(50000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 50000),
                        np.array([np.inf, -np.inf, 3.4e38, -3.4e38, 0.0, -0.0, 1e-40, 65504, 65520, 7e4],
                                 np.float32)]).astype(np.float32)
    t = torch.from_numpy(x)
    bf, over = checkpoint_io.convert_chunk(x.tobytes(), "float32", "bfloat16")
    assert bytes(bf) == t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert over == int(np.count_nonzero(np.isfinite(x) & ~torch.isfinite(t.to(torch.bfloat16)).numpy()))
    hf, over = checkpoint_io.convert_chunk(x.tobytes(), "float32", "float16")
    assert bytes(hf) == t.half().numpy().tobytes()
    assert over == int(np.count_nonzero(np.isfinite(x) & ~np.isfinite(t.half().numpy())))
    back, _ = checkpoint_io.convert_chunk(bytes(bf), "bfloat16", "float32")
    assert bytes(back) == t.to(torch.bfloat16).float().numpy().tobytes()
    h2, _ = checkpoint_io.convert_chunk(bytes(bf), "bfloat16", "float16")
    assert bytes(h2) == t.to(torch.bfloat16).half().numpy().tobytes()
    nan, _ = checkpoint_io.convert_chunk(np.array([np.nan], np.float32).tobytes(), "float32", "bfloat16")
    assert np.isnan((np.frombuffer(bytes(nan), np.uint16).astype(np.uint32) << 16).view(np.float32)).all()


# ------------------------------------------------------------------------------------------ tiny (CLI)

@pytest.fixture(scope="module")
def tiny_ckpts(tiny_hf_dir, tmp_path_factory):
    """tiny converted in float32 (default: stored dtype), float16 and bfloat16, in parallel."""
    out = tmp_path_factory.mktemp("tiny_ckpt")
    jobs = {"stored": [], "float16": ["--dtype", "float16"], "bfloat16": ["--dtype", "bf16", "--quiet"]}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(run_cli, "--input_path", tiny_hf_dir, "--output_path",
                                  str(out / f"tiny_{k}.ckpt"), *extra, cwd=str(out))
                   for k, extra in jobs.items()}
        results = {k: f.result() for k, f in futures.items()}
    for k, r in results.items():
        assert r.returncode == 0, (k, r.stderr)
    return {k: str(out / f"tiny_{k}.ckpt") for k in jobs}, results


def _load(path):
    import mindspore as ms
    return ms.load_checkpoint(path)


def test_tiny_float32_is_exact(tiny_hf_dir, tiny_ckpts):
    import mindspore as ms
    paths, results = tiny_ckpts
    params = _load(paths["stored"])
    hf = hf_tensors(tiny_hf_dir)
    expected = weight_map.expected_params(config_of(tiny_hf_dir))
    assert sorted(params) == sorted(expected)
    for name, (shape, _) in expected.items():
        p = params[name]
        assert isinstance(p, ms.Parameter) and p.name == name
        assert p.dtype == ms.float32 and tuple(p.shape) == shape
        assert p.asnumpy().tobytes() == hf[weight_map.ms_to_hf(name)].tobytes(), name
    out = results["stored"]
    assert "wrote" in out.stdout and "80 tensors" in out.stdout
    assert "hf -> ckpt" in out.stderr and "80/80 tensors" in out.stderr     # the progress bar
    assert results["bfloat16"].stderr == "" and results["bfloat16"].stdout == ""   # --quiet


def test_tiny_is_byte_identical_to_mindspore_save_checkpoint(tiny_ckpts, tmp_path):
    """Same entries in the same order -> the very bytes mindspore.save_checkpoint writes."""
    import mindspore as ms
    paths, _ = tiny_ckpts
    for path in paths.values():
        order = list(checkpoint_io.scan_ckpt(path))
        params = ms.load_checkpoint(path)
        ref = str(tmp_path / "ref.ckpt")
        ms.save_checkpoint([{"name": k, "data": params[k]} for k in order], ref)
        with open(path, "rb") as a, open(ref, "rb") as b:
            assert a.read() == b.read(), path


def test_load_ckpt_lean_equals_load_checkpoint(tiny_ckpts):
    import mindspore as ms
    paths, _ = tiny_ckpts
    for path in paths.values():
        lean, ref = checkpoint_io.load_ckpt_lean(path), ms.load_checkpoint(path)
        assert list(lean) == list(ref)
        for k, p in ref.items():
            q = lean[k]
            assert isinstance(q, ms.Parameter) and q.name == k and q.dtype == p.dtype and q.shape == p.shape
            assert q.astype(ms.float32).asnumpy().tobytes() == p.astype(ms.float32).asnumpy().tobytes(), k


def test_tiny_float16_and_bfloat16(tiny_hf_dir, tiny_ckpts):
    import mindspore as ms
    import torch
    paths, _ = tiny_ckpts
    hf = hf_tensors(tiny_hf_dir)
    p16 = _load(paths["float16"])
    pbf = _load(paths["bfloat16"])
    for name, value in hf.items():
        assert p16[name].dtype == ms.float16
        assert p16[name].asnumpy().tobytes() == value.astype(np.float16).tobytes(), name
        assert pbf[name].dtype == ms.bfloat16 and tuple(pbf[name].shape) == value.shape
        want = torch.from_numpy(value).to(torch.bfloat16).float().numpy()
        assert pbf[name].astype(ms.float32).asnumpy().tobytes() == want.tobytes(), name


def test_tiny_round_trip_and_bfloat16_source(tiny_hf_dir, tiny_ckpts, tmp_path):
    """HF -> MS -> HF is bit-identical; a bfloat16 checkpoint goes back to bfloat16 safetensors, and that
    bfloat16 HF folder (which numpy cannot read) converts forward again."""
    import torch
    from safetensors.torch import load_file
    paths, _ = tiny_ckpts
    back = tmp_path / "back"
    back.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir, "config.json"), back / "config.json")   # config found in the folder
    bf_dir = tmp_path / "bf_dir"
    bf_dir.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir, "config.json"), bf_dir / "config.json")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        f1 = pool.submit(run_cli, "--reversed", "--input_path", paths["stored"], "--output_path", str(back),
                         "--quiet", cwd=str(tmp_path))
        f2 = pool.submit(run_cli, "--reversed", "--input_path", paths["bfloat16"], "--output_path",
                         str(bf_dir / "model.safetensors"), "--quiet", cwd=str(tmp_path))
        r1, r2 = f1.result(), f2.result()
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr, r2.stderr)
    assert r1.stdout == r1.stderr == ""
    orig = load_file(os.path.join(tiny_hf_dir, "model.safetensors"))
    again = load_file(str(back / "model.safetensors"))
    assert sorted(again) == sorted(orig)
    for k in orig:
        assert again[k].dtype == orig[k].dtype == torch.float32
        assert again[k].numpy().tobytes() == orig[k].numpy().tobytes(), k
    with safe_open(str(back / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}
    bf = load_file(str(bf_dir / "model.safetensors"))
    for k in orig:
        assert bf[k].dtype == torch.bfloat16 and torch.equal(bf[k], orig[k].to(torch.bfloat16)), k
    # forward from a bfloat16 source folder, to float32 and kept as bfloat16
    cw.convert_hf_to_ms(str(bf_dir), str(tmp_path / "bf32.ckpt"), "float32", quiet=True)
    params = _load(str(tmp_path / "bf32.ckpt"))
    for k in orig:
        assert params[k].asnumpy().tobytes() == orig[k].to(torch.bfloat16).float().numpy().tobytes(), k
    assert leftovers(str(tmp_path)) == [] and leftovers(str(back)) == [] and leftovers(str(bf_dir)) == []


def test_reversed_folder_loads_in_transformers(tiny_hf_dir, tiny_ckpts, tmp_path):
    """--reversed into a folder that does not exist yet: config.json + model.safetensors, or (with a small shard
    size) shards + model.safetensors.index.json as save_pretrained writes them; transformers'
    from_pretrained loads each as it is, with the source's weights and logits."""
    import torch
    from transformers import LlavaForConditionalGeneration
    paths, _ = tiny_ckpts
    cfg = os.path.join(tiny_hf_dir, "config.json")
    single = tmp_path / "single"
    r = run_cli("--reversed", "--input_path", paths["stored"], "--output_path", str(single), "--config", cfg,
                cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert f"wrote {single}" in r.stdout
    assert sorted(os.listdir(single)) == ["config.json", "model.safetensors"]
    assert (single / "config.json").read_bytes() == open(cfg, "rb").read()
    sharded = tmp_path / "sharded"
    cw.convert_ms_to_hf(paths["stored"], str(sharded), cfg, quiet=True, shard_bytes=2_000_000)
    files = sorted(os.listdir(sharded))
    shards = [n for n in files if n.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for n in shards[:-1]:      # every shard but a lone oversized tensor stays within the limit
        with safe_open(str(sharded / n), framework="np") as f:
            keys = list(f.keys())
            assert len(keys) == 1 or sum(f.get_tensor(k).nbytes for k in keys) <= 2_000_000, n
    source = LlavaForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 3148, 1001, 29901, 29871, 13, 29871, 319, 1799, 9047, 13566, 29901]])
    with torch.no_grad():
        want = source(input_ids=ids).logits
    ref = source.state_dict()
    for folder in (single, sharded):
        model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
        state = model.state_dict()
        assert sorted(state) == sorted(ref)
        for k in ref:
            assert torch.equal(state[k], ref[k]), (folder, k)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, want), folder
    # weight files the new ones would not replace are an error, before anything is written
    with pytest.raises(LlavaError, match=r"holds weight file\(s\) the new ones would not replace: model-00001"):
        cw.convert_ms_to_hf(paths["stored"], str(sharded), cfg, quiet=True)
    assert sorted(os.listdir(sharded)) == files


def test_reversed_accepts_mindspore_crc_footer_and_detects_damage(tiny_hf_dir, tiny_ckpts, tmp_path):
    import mindspore as ms
    paths, _ = tiny_ckpts
    params = ms.load_checkpoint(paths["stored"])
    crc = str(tmp_path / "crc.ckpt")
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], crc, crc_check=True)
    assert checkpoint_io.check_ckpt_crc(crc)
    cfg = os.path.join(tiny_hf_dir, "config.json")
    out = cw.convert_ms_to_hf(crc, str(tmp_path / "a.safetensors"), cfg, quiet=True)
    with safe_open(out, framework="np") as f:
        assert sorted(f.keys()) == sorted(params)
    data = bytearray(open(crc, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(crc, "wb") as f:
        f.write(data)
    with pytest.raises(LlavaError, match="damaged"):
        cw.convert_ms_to_hf(crc, str(tmp_path / "b.safetensors"), cfg, quiet=True)
    assert not os.path.exists(tmp_path / "b.safetensors") and leftovers(str(tmp_path)) == []


def test_old_buffers_are_skipped(tiny_hf_dir, tmp_path):
    """position_ids / rotary inv_freq buffers that old transformers versions saved are not weights."""
    src = tmp_path / "with_buffers"
    src.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir, "config.json"), src / "config.json")
    tensors = hf_tensors(tiny_hf_dir)
    tensors["vision_tower.vision_model.embeddings.position_ids"] = np.arange(65, dtype=np.int64)[None]
    tensors["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = str(tmp_path / "o.ckpt")
    cw.convert_hf_to_ms(str(src), out, quiet=True)
    assert sorted(checkpoint_io.scan_ckpt(out)) == sorted(weight_map.expected_params(config_of(tiny_hf_dir)))


def test_stale_temp_file_of_a_killed_run_is_reported(tiny_hf_dir, tmp_path, capsys):
    stale = tmp_path / "o.ckpt.tmp-99999999"      # no such pid: a run killed with SIGKILL
    stale.write_bytes(b"partial")
    out = str(tmp_path / "o.ckpt")
    cw.convert_hf_to_ms(tiny_hf_dir, out, quiet=True)
    err = capsys.readouterr().err
    assert "warning" in err and "o.ckpt.tmp-99999999" in err and "safe to delete" in err
    assert stale.read_bytes() == b"partial" and os.path.exists(out)


# ------------------------------------------------------------------------------------------- bad inputs

def _save_variant(tensors, folder, config_from, **edits):
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(config_from, "config.json"), os.path.join(folder, "config.json"))
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def _bad_cases(tiny, tiny_gqa, base):
    """case -> (argv, output path that must not appear, substrings the one-line message must contain)."""
    t = hf_tensors(tiny)
    out = os.path.join(base, "out")
    os.makedirs(out)
    o = os.path.join(out, "llava.ckpt")
    cases = {}

    def add(name, argv, must, output=o, in_process=False):
        cases[name] = (argv, output, must, in_process)

    add("unknown_model", ["--model", "llama", "--input_path", tiny, "--output_path", o],
        ["'llama' is not supported", "llava"])
    add("missing_input", ["--input_path", os.path.join(base, "nope"), "--output_path", o], ["nope", "does not exist"])
    add("bad_dtype", ["--input_path", tiny, "--output_path", o, "--dtype", "int8"], ["--dtype", "int8"])
    add("output_folder_missing", ["--input_path", tiny, "--output_path", os.path.join(base, "no_dir", "x.ckpt")],
        ["no_dir", "does not exist"], os.path.join(base, "no_dir", "x.ckpt"))
    if os.geteuid() == 0:      # root writes anywhere chmod allows; /sys refuses new files even to root
        locked = "/sys"
    else:
        locked = os.path.join(base, "locked")
        os.makedirs(locked)
        os.chmod(locked, 0o555)
    add("output_not_writable", ["--input_path", tiny, "--output_path", os.path.join(locked, "x.ckpt")],
        [locked, "not writable"], os.path.join(locked, "x.ckpt"))
    add("output_not_ckpt", ["--input_path", tiny, "--output_path", os.path.join(out, "x.bin")], ["x.bin", ".ckpt"],
        os.path.join(out, "x.bin"))

    wrong = os.path.join(base, "wrong_type")
    os.makedirs(wrong)
    with open(os.path.join(tiny, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"] = "llama"
    with open(os.path.join(wrong, "config.json"), "w") as f:
        json.dump(cfg, f)
    os.symlink(os.path.join(tiny, "model.safetensors"), os.path.join(wrong, "model.safetensors"))
    add("wrong_model_type", ["--input_path", wrong, "--output_path", o], ["config.json", "model_type='llama'"])

    renamed = dict(t)
    renamed["language_model.model.final_norm.weight"] = renamed.pop("language_model.model.norm.weight")
    add("renamed_key", ["--input_path", _save_variant(renamed, os.path.join(base, "renamed"), tiny),
                        "--output_path", o],
        ["1 unknown: language_model.model.final_norm.weight",
         "1 missing: language_model.model.norm.weight"])
    missing = {k: v for k, v in t.items() if k != "multi_modal_projector.linear_2.bias"}
    add("missing_key", ["--input_path", _save_variant(missing, os.path.join(base, "missing"), tiny),
                        "--output_path", o], ["1 missing: multi_modal_projector.linear_2.bias"],
        in_process=True)
    extra = dict(t)
    extra["language_model.model.layers.2.input_layernorm.weight"] = np.ones(64, np.float32)  # tiny has 2 layers
    extra["language_model.model.extra.weight"] = np.ones(3, np.float32)
    add("extra_key", ["--input_path", _save_variant(extra, os.path.join(base, "extra"), tiny), "--output_path", o],
        ["2 unknown: ", "language_model.model.extra.weight", "layers.2.input_layernorm.weight"],
        in_process=True)
    many = {k: v for k, v in t.items() if ".layers." not in k}
    add("many_missing_truncated_list", ["--input_path", _save_variant(many, os.path.join(base, "many"), tiny),
                                        "--output_path", o], ["missing: ", "more)"], in_process=True)
    shape = dict(t)
    shape["vision_tower.vision_model.embeddings.position_embedding.weight"] = \
        t["vision_tower.vision_model.embeddings.position_embedding.weight"][:-1]
    add("wrong_shape", ["--input_path", _save_variant(shape, os.path.join(base, "shape"), tiny), "--output_path", o],
        ["1 with the wrong shape: ", "position_embedding.weight [64, 64] (expected [65, 64])"])
    add("other_config_shapes", ["--input_path", _save_variant(t, os.path.join(base, "gqa_cfg"), tiny_gqa),
                                "--output_path", o], ["with the wrong shape", "(expected "], in_process=True)

    trunc = os.path.join(base, "truncated")
    os.makedirs(trunc)
    shutil.copy(os.path.join(tiny, "config.json"), trunc)
    with open(os.path.join(tiny, "model.safetensors"), "rb") as f:
        data = f.read()
    with open(os.path.join(trunc, "model.safetensors"), "wb") as f:
        f.write(data[: len(data) // 2])
    add("truncated_safetensors", ["--input_path", trunc, "--output_path", o],
        [os.path.join(trunc, "model.safetensors"), "truncated"])
    garbage = os.path.join(base, "garbage")
    os.makedirs(garbage)
    shutil.copy(os.path.join(tiny, "config.json"), garbage)
    with open(os.path.join(garbage, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    add("not_safetensors", ["--input_path", garbage, "--output_path", o],
        [os.path.join(garbage, "model.safetensors"), "not a safetensors file"])

    shards = os.path.join(base, "shards")
    os.makedirs(shards)
    shutil.copy(os.path.join(tiny, "config.json"), shards)
    keys = sorted(t)
    half = {"model-00001-of-00002.safetensors": keys[:40], "model-00002-of-00002.safetensors": keys[40:]}
    save_file({k: t[k] for k in half["model-00001-of-00002.safetensors"]},
              os.path.join(shards, "model-00001-of-00002.safetensors"))
    with open(os.path.join(shards, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, ks in half.items() for k in ks}}, f)
    add("index_missing_shard", ["--input_path", shards, "--output_path", o],
        ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "do not exist"])

    pickle_dir = os.path.join(base, "pickle")
    os.makedirs(pickle_dir)
    shutil.copy(os.path.join(tiny, "config.json"), pickle_dir)
    with open(os.path.join(pickle_dir, "pytorch_model.bin"), "wb") as f:
        f.write(b"not really a pickle")
    add("pickle_folder", ["--input_path", pickle_dir, "--output_path", o], ["pytorch_model.bin", "safetensors"])
    add("pickle_file", ["--input_path", os.path.join(pickle_dir, "pytorch_model.bin"), "--output_path", o],
        ["pytorch_model.bin", "pickle", "safetensors"])
    no_cfg = os.path.join(base, "no_config")
    os.makedirs(no_cfg)
    os.symlink(os.path.join(tiny, "model.safetensors"), os.path.join(no_cfg, "model.safetensors"))
    add("no_config", ["--input_path", no_cfg, "--output_path", o], [no_cfg, "config.json"])

    # --reversed
    ckpt = os.path.join(base, "tiny.ckpt")
    cw.convert_hf_to_ms(tiny, ckpt, quiet=True)
    rev_out = os.path.join(out, "model.safetensors")
    add("rev_no_config", ["--reversed", "--input_path", ckpt, "--output_path", out], ["config.json", "--config"],
        rev_out)
    add("rev_missing_ckpt", ["--reversed", "--input_path", os.path.join(base, "none.ckpt"), "--output_path", out,
                             "--config", os.path.join(tiny, "config.json")], ["none.ckpt", "does not exist"], rev_out)
    add("rev_wrong_config", ["--reversed", "--input_path", ckpt, "--output_path", out,
                             "--config", os.path.join(tiny_gqa, "config.json")],
        ["tiny.ckpt", "with the wrong shape"], rev_out, in_process=True)
    with open(ckpt, "rb") as f:
        data = f.read()
    cut = os.path.join(base, "cut.ckpt")
    with open(cut, "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    add("rev_truncated_ckpt", ["--reversed", "--input_path", cut, "--output_path", out,
                               "--config", os.path.join(tiny, "config.json")], ["cut.ckpt", "truncated"], rev_out)
    add("rev_output_parent_missing", ["--reversed", "--input_path", ckpt, "--output_path",
                                      os.path.join(base, "no_dir", "hf"), "--config", os.path.join(tiny, "config.json")],
        ["no_dir", "does not exist"], os.path.join(base, "no_dir", "hf", "model.safetensors"))
    return cases


@pytest.fixture(scope="module")
def bad_runs(tiny_hf_dir, tiny_gqa_hf_dir, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("bad"))
    cases = _bad_cases(tiny_hf_dir, tiny_gqa_hf_dir, base)

    def one(argv):
        args = [sys.executable, CONVERT] + ([] if argv[0] == "--model" else ["--model", "llava"]) + argv
        return subprocess.run(args, capture_output=True, text=True, cwd=base, timeout=300)

    def in_process(argv):
        """main() itself, for cases whose CLI wrapping the subprocess cases already cover (saves imports)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cw.main(["--model", "llava"] + argv)
        return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(one, c[0]) for name, c in cases.items() if not c[3]}
        results = {name: in_process(c[0]) for name, c in cases.items() if c[3]}
        results.update({name: f.result() for name, f in futures.items()})
    return {name: (results[name], cases[name][1], cases[name][2]) for name in cases}


BAD_CASES = ["unknown_model", "missing_input", "bad_dtype", "output_folder_missing", "output_not_writable",
             "output_not_ckpt", "wrong_model_type", "renamed_key", "missing_key", "extra_key",
             "many_missing_truncated_list", "wrong_shape", "other_config_shapes", "truncated_safetensors",
             "not_safetensors", "index_missing_shard", "pickle_folder", "pickle_file", "no_config",
             "rev_no_config", "rev_missing_ckpt", "rev_wrong_config", "rev_truncated_ckpt",
             "rev_output_parent_missing"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_error(bad_runs, case):
    result, output, must = bad_runs[case]
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("convert_weight.py: error: ")
    for text in must:
        assert text in lines[0], (text, lines[0])
    assert result.stdout == ""
    assert not os.path.exists(output)
    folder = os.path.dirname(output)
    if os.path.isdir(folder):
        assert leftovers(folder) == []


def test_debug_shows_the_traceback(tiny_hf_dir, tmp_path):
    r = run_cli("--input_path", str(tmp_path / "nope"), "--output_path", str(tmp_path / "x.ckpt"), "--debug",
                cwd=str(tmp_path))
    assert r.returncode != 0 and "Traceback" in r.stderr and "LlavaError" in r.stderr


def test_help_documents_the_interface():
    r = subprocess.run([sys.executable, CONVERT, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--model", "--input_path", "--output_path", "--dtype", "--reversed", "--config", "--quiet",
                 "--debug", "config.json in the output folder"):
        assert flag in r.stdout


# -------------------------------------------------------------------------------------------- mid (CLI)

@pytest.fixture(scope="module")
def mid_run(mid_hf_dir, tmp_path_factory):
    """SIGTERM during a conversion of `mid`, then a rerun to the same path (SIGINT and SIGKILL: the fault
    suite, tests/test_robustness.py, which also uses `interrupt_convert`)."""
    base = tmp_path_factory.mktemp("mid")
    outs = {signal.SIGTERM: str(base / "mid.ckpt")}
    interrupted = {s: interrupt_convert(mid_hf_dir, o, s, str(base)) for s, o in outs.items()}
    after = {s: (os.path.exists(o), leftovers(os.path.dirname(o))) for s, o in outs.items()}
    out = outs[signal.SIGTERM]
    start = time.monotonic()
    rerun = run_cli("--input_path", mid_hf_dir, "--output_path", out, cwd=str(base))
    return dict(out=out, base=str(base), interrupted=interrupted, after=after, rerun=rerun,
                seconds=time.monotonic() - start)


@pytest.mark.parametrize("signum", [signal.SIGTERM], ids=["SIGTERM"])
def test_mid_interrupt_leaves_nothing_and_rerun_succeeds(mid_run, mid_hf_dir, signum):
    rc, stderr, stdout, tmp, size = mid_run["interrupted"][signum]
    total = sum(os.path.getsize(os.path.join(mid_hf_dir, n)) for n in os.listdir(mid_hf_dir)
                if n.endswith(".safetensors"))
    assert 0 < size < total                                    # it was interrupted while writing
    assert rc == 128 + signum, stderr
    assert stderr.rstrip().splitlines()[-1] == \
        f"convert_weight.py: error: interrupted by {signal.Signals(signum).name}; no output written"
    assert "wrote" not in stdout
    assert mid_run["after"][signum] == (False, [])             # no OUT.ckpt, no temp file
    assert not os.path.exists(tmp)
    assert mid_run["rerun"].returncode == 0, mid_run["rerun"].stderr


def test_mid_converts_exactly(mid_run, mid_hf_dir):
    import mindspore as ms
    assert mid_run["rerun"].returncode == 0, mid_run["rerun"].stderr
    assert leftovers(mid_run["base"]) == []
    expected = weight_map.expected_params(config_of(mid_hf_dir))
    params = ms.load_checkpoint(mid_run["out"])
    assert sorted(params) == sorted(expected)
    done = set()
    for shard in sorted(n for n in os.listdir(mid_hf_dir) if n.endswith(".safetensors")):
        with safe_open(os.path.join(mid_hf_dir, shard), framework="np") as f:
            for key in f.keys():
                name = weight_map.hf_to_ms(key)
                p = params[name]
                assert p.dtype == ms.float32 and tuple(p.shape) == expected[name][0]
                assert p.asnumpy().tobytes() == f.get_tensor(key).tobytes(), key
                done.add(name)
    assert done == set(expected)


def test_mid_round_trip_is_bit_identical(mid_run, mid_hf_dir, tmp_path):
    assert mid_run["rerun"].returncode == 0
    out = str(tmp_path / "mid_back.safetensors")
    r = run_cli("--reversed", "--input_path", mid_run["out"], "--output_path", out, "--config",
                os.path.join(mid_hf_dir, "config.json"), "--quiet", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    seen = set()
    with safe_open(out, framework="np") as back:
        for shard in sorted(n for n in os.listdir(mid_hf_dir) if n.endswith(".safetensors")):
            with safe_open(os.path.join(mid_hf_dir, shard), framework="np") as f:
                for key in f.keys():
                    a, b = f.get_tensor(key), back.get_tensor(key)
                    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key
                    seen.add(key)
        assert set(back.keys()) == seen


def test_mid_reversed_interrupted_leaves_no_folder(mid_run, mid_hf_dir, tmp_path):
    """SIGINT while --reversed fills a folder it created: the folder goes again, with every temporary file."""
    assert mid_run["rerun"].returncode == 0
    out = tmp_path / "back"
    proc = subprocess.Popen([sys.executable, CONVERT, "--model", "llava", "--reversed", "--input_path",
                             mid_run["out"], "--output_path", str(out), "--config",
                             os.path.join(mid_hf_dir, "config.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path))
    _, _, stderr = signal_midway(proc, b"ckpt -> hf",
                                 lambda: out.is_dir() and any(".tmp-" in n for n in os.listdir(out)), signal.SIGINT)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert stderr.decode().rstrip().splitlines()[-1] == \
        "convert_weight.py: error: interrupted by SIGINT; no output written"
    assert os.listdir(tmp_path) == []
