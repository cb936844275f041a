"""[E] run_mindformer.py end to end, as a subprocess: convert → predict → predict_results.jsonl == HF generate."""
import os

import pytest

from helpers import PAIRS, check_records, oracle_setups, predict, run_cli, yaml_for


@pytest.fixture(scope="module")
def setups(tmp_path_factory, tiny_hf_dir, tiny_gqa_hf_dir):
    return oracle_setups(tmp_path_factory.mktemp("predict"), {"tiny": tiny_hf_dir, "tiny_gqa": tiny_gqa_hf_dir})


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
