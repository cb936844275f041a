"""[F] Tensor-parallel prediction over 2 ranks with scripts/msrun_launcher.sh (msrun on CPU, loopback).

A rank killed mid-run and a folder with a missing rank are covered, with the fault suite's stricter checks
(no stray processes, nothing outside --output_dir), by tests/test_robustness.py.
"""
import os
import re
import subprocess

import numpy as np
import pytest

from conftest import hf_checkpoint
from helpers import (MAX_NEW, PAIRS, ROOT, check_records, launcher_argv, oracle_setups, predict_order, results,
                     run_cli)


def launch(yaml_path, ckpt, out_dir, pairs, port, *extra, workers=2, timeout_s=120, auto_trans=True):
    items = [x for pair in pairs for x in pair]
    order = predict_order(yaml_path, ckpt, out_dir, items, auto_trans, ("--max_new_tokens", str(MAX_NEW), *extra))
    log_dir = os.path.join(out_dir, "msrun_log")
    return subprocess.Popen(launcher_argv(order, workers, port, log_dir, timeout_s), cwd=ROOT,
                            env=dict(os.environ, GLOG_v="3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True), log_dir


def finish(proc, limit=900):
    out, err = proc.communicate(timeout=limit)
    return proc.returncode, out, err


def worker_log(log_dir, rank):
    with open(os.path.join(log_dir, f"worker_{rank}.log"), errors="replace") as f:
        return f.read()


@pytest.fixture(scope="module")
def tp_setups(tmp_path_factory, tiny_hf_dir, mid_hf_dir):
    base = tmp_path_factory.mktemp("parallel")
    out = {}
    for name, hf_dir, seq in (("tiny", tiny_hf_dir, 256), ("mid", mid_hf_dir, 1024)):
        out.update(oracle_setups(base, {name: hf_dir}, seq_length=seq))
        with open(out[name]["yaml"]) as f:
            text = f.read()
        with open(out[name]["yaml"], "w") as f:
            f.write(text.replace("model_parallel: 1", "model_parallel: 2"))
    return out


@pytest.fixture(scope="module")
def tiny_run(tp_setups, tmp_path_factory):
    """One 2-rank run on tiny from the complete checkpoint (sliced on the fly)."""
    s = tp_setups["tiny"]
    out_dir = str(tmp_path_factory.mktemp("tiny_tp"))
    proc, log_dir = launch(s["yaml"], s["ckpt"], out_dir, PAIRS, 8311)
    code, out, err = finish(proc)
    assert code == 0, err[-3000:] + worker_log(log_dir, 0)[-3000:]
    return dict(out_dir=out_dir, log_dir=log_dir, stdout=out)


def test_two_ranks_give_the_single_process_and_hf_answers(tp_setups, tiny_run):
    check_records(results(tiny_run["out_dir"]), PAIRS, tp_setups["tiny"]["expected"])
    for rank in (0, 1):
        assert os.path.isfile(os.path.join(tiny_run["out_dir"], "transformed_checkpoint", f"rank_{rank}",
                                           f"checkpoint_{rank}.ckpt"))
    # rank 0 alone streams: its answer lines reach the console through the launcher
    for i, (_, text) in enumerate(tp_setups["tiny"]["expected"]):
        assert f"[{i}] {text}" in tiny_run["stdout"]
    assert "[0] " not in worker_log(tiny_run["log_dir"], 1)


def test_each_rank_holds_half_of_the_language_model(tp_setups, tiny_run):
    from safetensors import safe_open
    with safe_open(os.path.join(tp_setups["tiny"]["hf_dir"], "model.safetensors"), "np") as f:
        full = sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith("language_model."))
    for rank in (0, 1):
        m = re.search(r"\[rank %d/2\] loaded .*: (\d+) weight bytes \((\d+) in the language model\)" % rank,
                      worker_log(tiny_run["log_dir"], rank))
        assert m, f"rank {rank} did not report its weights"
        lm = int(m.group(2))
        assert 0.49 * full <= lm <= 0.51 * full, (lm, full)


@pytest.mark.slow
def test_presliced_rank_folder_loads_directly(tp_setups, tiny_run, tmp_path):
    s = tp_setups["tiny"]
    sliced = os.path.join(tiny_run["out_dir"], "transformed_checkpoint")
    proc, log_dir = launch(s["yaml"], sliced, str(tmp_path), PAIRS[:1], 8312, auto_trans=False)
    code, _, err = finish(proc)
    assert code == 0, err[-2000:] + worker_log(log_dir, 0)[-3000:]
    check_records(results(str(tmp_path)), PAIRS[:1], s["expected"][:1])
    assert not os.path.exists(tmp_path / "transformed_checkpoint")


@pytest.mark.parametrize("layout", ["single", pytest.param("sharded", marks=pytest.mark.slow)])
def test_two_ranks_load_the_hf_folder_directly(tp_setups, tmp_path, layout):
    """--load_checkpoint HF_DIR (model.safetensors, or shards + index; no conversion): each rank reads its half
    of the language model from the safetensors, nothing is written, and the answers are HF's."""
    s = tp_setups["tiny"]
    folder = s["hf_dir"] if layout == "single" else hf_checkpoint("tiny", shard_mb=4)
    proc, log_dir = launch(s["yaml"], folder, str(tmp_path), PAIRS, 8317 if layout == "single" else 8318,
                           auto_trans=False)
    code, out, err = finish(proc)
    assert code == 0, err[-2000:] + worker_log(log_dir, 0)[-3000:]
    check_records(results(str(tmp_path)), PAIRS, s["expected"])
    for i, (_, text) in enumerate(s["expected"]):
        assert f"[{i}] {text}" in out
    assert not os.path.exists(tmp_path / "transformed_checkpoint")
    from safetensors import safe_open
    with safe_open(os.path.join(s["hf_dir"], "model.safetensors"), "np") as f:
        full = sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith("language_model."))
    for rank in (0, 1):
        m = re.search(r"\[rank %d/2\] loaded %s: (\d+) weight bytes \((\d+) in the language model\)"
                      % (rank, re.escape(folder)), worker_log(log_dir, rank))
        assert m, f"rank {rank} did not report its weights"
        assert 0.49 * full <= int(m.group(2)) <= 0.51 * full


@pytest.mark.slow
def test_last_step_logits_match_hf(tp_setups, tiny_run, tmp_path):
    import torch
    from PIL import Image
    from oracle import HFOracle
    s = tp_setups["tiny"]
    image, prompt = PAIRS[0]
    steps = 8
    out = str(tmp_path / "logits.npy")
    env = dict(os.environ, GLOG_v="3")
    proc = subprocess.run(
        ["msrun", "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1", "--master_port=8313",
         f"--log_dir={tmp_path / 'log'}", "--join=True", "--cluster_time_out=120",
         os.path.join(ROOT, "tests", "tp_worker.py"), s["hf_dir"],
         os.path.join(tiny_run["out_dir"], "transformed_checkpoint"), "float32", "256", image, prompt, str(steps),
         out],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = np.load(out)
    oracle = HFOracle(s["hf_dir"])
    ids = torch.tensor([oracle.ids(prompt)])
    pixels = oracle.image_processor(Image.open(image), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        gen = oracle.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                    do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                                    output_logits=True, return_dict_in_generate=True, pad_token_id=32001)
    ref = torch.stack(gen.logits, 1)[0].float().numpy()
    scale = max(float(np.abs(ref).max()), 1.0)
    assert ours.shape == ref.shape
    assert np.abs(ours[-1] - ref[-1]).max() / scale <= 1e-5
    assert np.abs(ours - ref).max() / scale <= 1e-5


@pytest.mark.slow
def test_mid_two_ranks_equal_hf(tp_setups, tmp_path):
    s = tp_setups["mid"]
    proc, log_dir = launch(s["yaml"], s["ckpt"], str(tmp_path), PAIRS, 8314, timeout_s=300)
    code, _, err = finish(proc)
    assert code == 0, err[-2000:] + worker_log(log_dir, 0)[-3000:]
    check_records(results(str(tmp_path)), PAIRS, s["expected"])


# ------------------------------------------------------------------------- mismatches, caught early
def test_rank_folder_of_another_world_size_is_an_error(tp_setups, tiny_run, tmp_path):
    s = tp_setups["tiny"]
    single_yaml = str(tmp_path / "single.yaml")
    with open(s["yaml"]) as f, open(single_yaml, "w") as g:
        g.write(f.read().replace("model_parallel: 2", "model_parallel: 1"))
    proc = run_cli(["run_mindformer.py", "--config", single_yaml, "--predict_data", *PAIRS[0],
                    "--load_checkpoint", os.path.join(tiny_run["out_dir"], "transformed_checkpoint"),
                    "--output_dir", str(tmp_path / "o")])
    assert proc.returncode == 2
    assert "2 rank folder(s)" in proc.stderr.strip().splitlines()[-1]


def test_model_parallel_without_use_parallel_is_an_error(tp_setups, tmp_path):
    s = tp_setups["tiny"]
    proc = run_cli(["run_mindformer.py", "--config", s["yaml"], "--predict_data", *PAIRS[0],
                    "--load_checkpoint", s["ckpt"], "--output_dir", str(tmp_path / "o")])
    assert proc.returncode == 2
    assert "model_parallel=2 needs --use_parallel True" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_kv_heads_fewer_than_ranks_is_an_error_before_loading(tp_setups, tmp_path):
    s = tp_setups["tiny"]
    one_kv = str(tmp_path / "one_kv.yaml")
    with open(s["yaml"]) as f, open(one_kv, "w") as g:
        g.write(f.read().replace("n_kv_heads: 4", "n_kv_heads: 1"))
    proc, log_dir = launch(one_kv, s["ckpt"], str(tmp_path), PAIRS[:1], 8316, timeout_s=15)
    code, _, err = finish(proc, limit=300)
    assert code != 0
    log = worker_log(log_dir, 0)
    assert "cannot split the model over 2 tensor-parallel ranks" in log and "n_kv_heads=1" in log
    assert "loaded" not in log
    assert not os.path.exists(tmp_path / "transformed_checkpoint")
