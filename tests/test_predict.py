"""[E] run_mindformer.py end to end, as a subprocess: convert → predict → predict_results.jsonl == HF generate."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import IMAGES, ROOT

TINY_YAML = os.path.join(ROOT, "research", "llava", "llava_tiny", "predict_llava_tiny.yaml")
MAX_NEW = 24
PAIRS = [(os.path.join(IMAGES, "chelsea.jpg"), "Describe the image in English:"),
         (os.path.join(IMAGES, "coffee.jpg"), "What is on the table? Answer briefly.")]


def run_cli(args, timeout=600):
    env = dict(os.environ, GLOG_v="3")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def convert(hf_dir, out):
    proc = run_cli(["convert_weight.py", "--model", "llava", "--input_path", hf_dir, "--output_path", out,
                    "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return out


def yaml_for(hf_dir, path, **model_overrides):
    """The tiny yaml with model_config shapes taken from an HF checkpoint's config.json."""
    from llava_config import LlavaConfig
    with open(TINY_YAML) as f:
        data = yaml.safe_load(f)
    with open(os.path.join(hf_dir, "config.json")) as f:
        shapes = LlavaConfig.from_hf_config(json.load(f)).to_dict()
    mc = data["model"]["model_config"]
    mc["vision_config"]["model_config"].update(shapes["vision_config"])
    mc["text_config"]["model_config"].update(shapes["text_config"])
    mc.update(model_overrides)
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def predict(yaml_path, ckpt, out_dir, pairs, *extra):
    items = [x for pair in pairs for x in pair]
    proc = run_cli(["run_mindformer.py", "--config", yaml_path, "--register_path", "research/llava",
                    "--run_mode", "predict", "--predict_data", *items, "--modal_type", "image", "text",
                    "--load_checkpoint", ckpt, "--use_parallel", "False", "--auto_trans_ckpt", "False",
                    "--output_dir", out_dir, "--max_new_tokens", str(MAX_NEW), *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out_dir, "predict_results.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return proc, records


@pytest.fixture(scope="module")
def setups(tmp_path_factory, tiny_hf_dir, tiny_gqa_hf_dir):
    from oracle import HFOracle
    base = tmp_path_factory.mktemp("predict")
    out = {}
    for name, hf_dir in (("tiny", tiny_hf_dir), ("tiny_gqa", tiny_gqa_hf_dir)):
        ckpt = convert(hf_dir, str(base / f"{name}.ckpt"))
        cfg = yaml_for(hf_dir, str(base / f"{name}.yaml"))
        oracle = HFOracle(hf_dir)
        expected = [oracle.generate(img, prompt, MAX_NEW) for img, prompt in PAIRS]
        out[name] = dict(ckpt=ckpt, yaml=cfg, expected=expected)
    return out


def check_records(records, pairs, expected):
    assert len(records) == len(pairs)
    for rec, (img, prompt), (ids, text) in zip(records, pairs, expected):
        assert rec["image"] == img and rec["prompt"] == prompt
        assert rec["output_ids"] == ids
        assert rec["output_text"] == text


@pytest.mark.parametrize("preset", ["tiny", "tiny_gqa"])
def test_batch_of_two_pairs_equals_hf_generate(preset, setups, tmp_path):
    s = setups[preset]
    proc, records = predict(s["yaml"], s["ckpt"], str(tmp_path), PAIRS)
    check_records(records, PAIRS, s["expected"])
    # a batch prints one line per input at the end: "[i] text"
    assert proc.stdout.splitlines() == [f"[{i}] {text}" for i, (_, text) in enumerate(s["expected"])]


def test_single_pair_streams_exactly_the_answer(setups, tmp_path):
    s = setups["tiny"]
    proc, records = predict(s["yaml"], s["ckpt"], str(tmp_path), PAIRS[1:])
    check_records(records, PAIRS[1:], s["expected"][1:])
    assert proc.stdout == s["expected"][1][1] + "\n"  # stdout holds the answer and nothing else


def test_pynative_equals_graph_mode(setups, tmp_path):
    s = setups["tiny"]
    _, records = predict(s["yaml"], s["ckpt"], str(tmp_path), PAIRS[:1], "--mode", "1")
    check_records(records, PAIRS[:1], s["expected"][:1])


def test_results_are_appended(setups, tmp_path):
    s = setups["tiny"]
    predict(s["yaml"], s["ckpt"], str(tmp_path), PAIRS[:1], "--max_new_tokens", "3")
    _, records = predict(s["yaml"], s["ckpt"], str(tmp_path), PAIRS[:1], "--max_new_tokens", "3")
    assert len(records) == 2 and records[0] == records[1]
    assert records[0]["output_ids"] == s["expected"][0][0][:3]


# ------------------------------------------------------------------------------------------- bad input
def fails(args, *needles):
    proc = run_cli(["run_mindformer.py", *args])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines, "no error message"
    last = lines[-1]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in last, last
    return last


def base_args(s, out_dir, *, ckpt=None, cfg=None, data=None):
    return ["--config", cfg or s["yaml"], "--predict_data", *(data or list(PAIRS[0])), "--modal_type", "image",
            "text", "--load_checkpoint", ckpt or s["ckpt"], "--output_dir", out_dir]


def test_bad_config_key(setups, tiny_hf_dir, tmp_path):
    s = setups["tiny"]
    bad = yaml_for(tiny_hf_dir, str(tmp_path / "bad.yaml"), numm_layers=3)
    fails(base_args(s, str(tmp_path / "o"), cfg=bad), "numm_layers")


def test_missing_checkpoint(setups, tmp_path):
    s = setups["tiny"]
    missing = str(tmp_path / "nope.ckpt")
    fails(base_args(s, str(tmp_path / "o"), ckpt=missing), "nope.ckpt", "no such file")
    assert not os.path.exists(tmp_path / "o" / "predict_results.jsonl")


def test_checkpoint_of_another_shape(setups, tmp_path):
    s = setups["tiny"]
    last = fails(base_args(s, str(tmp_path / "o"), ckpt=setups["tiny_gqa"]["ckpt"]), "does not match the model")
    assert "shape" in last or "missing" in last


def test_odd_number_of_predict_items(setups, tmp_path):
    s = setups["tiny"]
    fails(base_args(s, str(tmp_path / "o"), data=[PAIRS[0][0], PAIRS[0][1], PAIRS[1][0]]), "--predict_data",
          "pairs")


def test_unknown_flag(setups, tmp_path):
    s = setups["tiny"]
    fails(base_args(s, str(tmp_path / "o")) + ["--frobnicate", "1"], "--frobnicate")


def test_missing_image(setups, tmp_path):
    s = setups["tiny"]
    fails(base_args(s, str(tmp_path / "o"), data=[str(tmp_path / "cat.jpg"), "hi"]), "cat.jpg")
