"""[M] The plugin through MindFormers' own entry points (the installed wheel): its repository's run_mindformer.py
flow (reproduced by tests/mindformers_run.py), `Trainer(args=config).predict` with the plugin's trainer and with
MindFormers' stock MultiModalToTextGenerationTrainer, and `mindformers.pipeline(task=...)`. Each runs in a
subprocess from an empty working folder laid out like a MindFormers checkout (plugin at research/llava); token ids
are compared with Hugging Face `generate` and with this project's run_mindformer.py."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import (IMAGES, MAX_NEW, PAIRS, PLUGIN, ROOT, TOKENIZER_MODEL, ImageServer, launcher_argv,
                     oracle_setups, predict, results)

HELPER = os.path.join(ROOT, "tests", "mindformers_run.py")
QUERY_ARGS = ["--predict_data", *[x for pair in PAIRS for x in pair], "--modal_type", "image", "text", "image",
              "text"]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A MindFormers-checkout-like folder: the entry script at its root, this plugin at research/llava."""
    root = tmp_path_factory.mktemp("mindformers_checkout")
    os.makedirs(root / "research")
    os.symlink(PLUGIN, root / "research" / "llava")
    shutil.copy(HELPER, root / "mindformers_run.py")
    return root


@pytest.fixture(scope="module")
def setups(tmp_path_factory, tiny_hf_dir, tiny_gqa_hf_dir):
    base = tmp_path_factory.mktemp("mf")
    # MindFormers' tokenizer build takes a relative vocab_file from the working folder
    out = oracle_setups(base, {"tiny": tiny_hf_dir, "tiny_gqa": tiny_gqa_hf_dir}, vocab_file=TOKENIZER_MODEL,
                        max_new_tokens=MAX_NEW)
    for name, s in out.items():   # this project's run_mindformer.py
        _, s["cli"] = predict(s["yaml"], s["ckpt"], str(base / f"{name}_cli"), PAIRS)
    return out


def run_helper(checkout, cwd, *args, timeout=600):
    """The helper from `cwd` (an empty folder), MindFormers' log kept out of it as a user would (LOG_MF_PATH)."""
    env = dict(os.environ, GLOG_v="3", LOG_MF_PATH=os.path.join(str(cwd) + "_log"))
    env.pop("OM_MODULES_CACHE", None)
    os.makedirs(cwd, exist_ok=True)
    return subprocess.run([sys.executable, str(checkout / "mindformers_run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def check_ids(records, s):
    assert [r["output_ids"] for r in records] == [ids for ids, _ in s["expected"]]        # HF generate
    assert [r["output_text"] for r in records] == [text for _, text in s["expected"]]
    assert [r["output_ids"] for r in records] == [r["output_ids"] for r in s["cli"]]      # our run_mindformer.py


@pytest.mark.parametrize("preset", ["tiny", pytest.param("tiny_gqa", marks=pytest.mark.slow)])
def test_mindformers_run_script_single_card(preset, setups, checkout, tmp_path):
    """The seed's single-card command as typed in a MindFormers checkout (relative --config/--register_path)."""
    s = setups[preset]
    shutil.copy(s["yaml"], checkout / "research" / f"m_{preset}.yaml")
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    proc = run_helper(checkout, cwd, "script", "--config", f"research/m_{preset}.yaml", "--register_path",
                      "research/llava", "--run_mode", "predict", *QUERY_ARGS, "--load_checkpoint", s["ckpt"],
                      "--use_parallel", "False", "--auto_trans_ckpt", "False", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_ids(results(out), s)
    # the batch's answers are streamed to stdout by the plugin's trainer, one "[i] text" line per input
    for i, (_, text) in enumerate(s["expected"]):
        assert f"[{i}] {text}" in proc.stdout.splitlines()
    assert os.listdir(cwd) == []   # no ./modules, no result file, no ./output in the working folder


@pytest.mark.parametrize("preset", ["tiny", pytest.param("tiny_gqa", marks=pytest.mark.slow)])
def test_trainer_predict_with_plugin_trainer(preset, setups, checkout, tmp_path):
    s = setups[preset]
    cwd = tmp_path / "cwd"
    out_json = str(tmp_path / "out" / "result.json")
    os.makedirs(tmp_path / "out")
    proc = run_helper(checkout, cwd, "trainer", out_json, s["yaml"], s["ckpt"], *[x for p in PAIRS for x in p])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out_json) as f:
        check_ids(json.load(f), s)
    check_ids(results(tmp_path / "out"), s)
    assert os.listdir(cwd) == []


@pytest.mark.parametrize("preset", ["tiny", pytest.param("tiny_gqa", marks=pytest.mark.slow)])
def test_trainer_predict_with_stock_trainer(preset, setups, checkout, tmp_path):
    """MindFormers' own MultiModalToTextGenerationTrainer: its processor build, network build (delayed init),
    load_ckpt (through LlavaModel.fuse_weight_from_ckpt) and the multi_modal_to_text_generation pipeline."""
    s = setups[preset]
    cwd = tmp_path / "cwd"
    out_json = str(tmp_path / "out" / "result.json")
    os.makedirs(tmp_path / "out")
    proc = run_helper(checkout, cwd, "trainer", out_json, s["yaml"], s["ckpt"], "stock",
                      *[x for p in PAIRS for x in p])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out_json) as f:
        assert json.load(f) == [text for _, text in s["expected"]]
    assert os.listdir(cwd) == []


@pytest.mark.parametrize("preset", ["tiny", pytest.param("tiny_gqa", marks=pytest.mark.slow)])
def test_mindformers_pipeline(preset, setups, checkout, tmp_path):
    s = setups[preset]
    out_json = str(tmp_path / "out" / "result.json")
    os.makedirs(tmp_path / "out")
    proc = run_helper(checkout, tmp_path / "cwd", "pipeline", out_json, s["yaml"], s["ckpt"],
                      *[x for p in PAIRS for x in p])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out_json) as f:
        got = json.load(f)
    # built by MindFormers from the yaml's auto_register keys, yet the very class the plugin imports
    assert got["model_class"] == "llava_model.LlavaModel"
    assert got["texts"] == [text for _, text in s["expected"]]
    assert got["ids"] == [ids for ids, _ in s["expected"]] == [r["output_ids"] for r in s["cli"]]


def _bad_checkpoint(src, dst, kind):
    """A copy of `src` with one weight missing and an unknown key, or one weight of the wrong shape."""
    import mindspore as ms
    params = ms.load_checkpoint(src)
    name = "language_model.model.layers.0.mlp.down_proj.weight"
    if kind == "missing_and_unknown":
        params["language_model.model.layers.0.mlp.extra.weight"] = params.pop(name)
    else:
        params[name] = ms.Parameter(ms.Tensor(params[name].asnumpy()[:, :-1]), name=name)
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], dst)
    return dst


@pytest.mark.parametrize("entry", [pytest.param("stock", marks=pytest.mark.slow), "plugin"])
@pytest.mark.parametrize("kind", ["missing_and_unknown", "wrong_shape"])
def test_bad_checkpoint_is_refused(entry, kind, setups, checkout, tmp_path):
    s = setups["tiny"]
    bad = _bad_checkpoint(s["ckpt"], str(tmp_path / "bad.ckpt"), kind)
    out_json = str(tmp_path / "out" / "result.json")
    os.makedirs(tmp_path / "out")
    extra = ["stock"] if entry == "stock" else []
    proc = run_helper(checkout, tmp_path / "cwd", "trainer", out_json, s["yaml"], bad, *extra, *PAIRS[0])
    assert proc.returncode != 0
    assert "checkpoint does not match the model" in proc.stderr, proc.stderr[-2000:]
    if kind == "missing_and_unknown":
        assert "1 missing: language_model.model.layers.0.mlp.down_proj.weight" in proc.stderr
        assert "1 unknown: language_model.model.layers.0.mlp.extra.weight" in proc.stderr
    else:
        assert "1 with the wrong shape: language_model.model.layers.0.mlp.down_proj.weight" in proc.stderr
    assert not os.path.exists(out_json)
    assert not os.path.exists(tmp_path / "out" / "predict_results.jsonl")


@pytest.mark.slow
def test_mindformers_run_script_two_ranks_under_msrun(setups, checkout, tmp_path):
    """The seed's 2-card command: msrun_launcher.sh with MindFormers' run_mindformer.py flow, a complete
    checkpoint and --auto_trans_ckpt True (each rank slices it), model_parallel 2, parallel_mode 0."""
    import yaml
    s = setups["tiny"]
    with open(s["yaml"]) as f:
        data = yaml.safe_load(f)
    data["parallel_config"]["model_parallel"] = 2
    cfg = checkout / "research" / "m_tp2.yaml"
    with open(cfg, "w") as f:
        yaml.safe_dump(data, f)
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    os.makedirs(cwd)
    items = " ".join(f"'{x}'" for x in QUERY_ARGS[1:QUERY_ARGS.index("--modal_type")])
    order = (f"{checkout / 'mindformers_run.py'} script --config research/m_tp2.yaml --register_path research/llava "
             f"--run_mode predict --predict_data {items} --modal_type image text image text "
             f"--load_checkpoint {s['ckpt']} --use_parallel True --auto_trans_ckpt True --output_dir {out}")
    log_dir = tmp_path / "msrun_log"
    env = dict(os.environ, GLOG_v="3", LOG_MF_PATH=str(tmp_path / "mf_log"))
    proc = subprocess.run(launcher_argv(order, 2, 8331, str(log_dir), 300), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stderr[-2000:], open(log_dir / "worker_0.log", errors="replace").read()[-3000:])
    check_ids(results(out), s)
    for rank in (0, 1):   # each rank holds its half of the language model, sliced from the complete file
        assert os.path.isfile(out / "transformed_checkpoint" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt")
    assert sorted(os.listdir(cwd)) == []


def test_upper_case_extension_and_url_without_extension(setups, tmp_path):
    """MindFormers' run_mindformer.py refuses `X.JPG` and `http://host/photo` with --modal_type image (its
    extension check is case-sensitive); the plugin's run_mindformer.py reads images by content."""
    s = setups["tiny"]
    upper = str(tmp_path / "CHELSEA.JPG")
    shutil.copy(os.path.join(IMAGES, "chelsea.jpg"), upper)
    images = ImageServer(os.path.join(IMAGES, "coffee.jpg"))
    try:
        url = images.url("/photo")
        _, records = predict(s["yaml"], s["ckpt"], str(tmp_path / "o"), [(upper, PAIRS[0][1]), (url, PAIRS[1][1])])
    finally:
        images.close()
    assert [r["output_ids"] for r in records] == [ids for ids, _ in s["expected"]]


def test_query_list_splits_into_requests_as_the_cli_pairs_do():
    """MindFormers' run_mindformer.py turns `A P B Q --modal_type image text image text` into ONE query of four
    entries; each run of images followed by text is one request."""
    from llava_errors import LlavaError
    from llava_processor import LlavaProcessor
    split = LlavaProcessor.pairs_from_query_list
    q = [{"image": "a.jpg"}, {"text": "P"}, {"image": "b.jpg"}, {"text": "Q"}]
    assert split([q]) == [(["a.jpg"], "P"), (["b.jpg"], "Q")]
    assert split([[{"image": "a"}, {"image": "b"}, {"text": "P"}, {"text": "R"}]]) == [(["a", "b"], "P\nR")]
    with pytest.raises(LlavaError, match="ends with an image"):
        split([[{"image": "a"}, {"text": "P"}, {"image": "b"}]])


def test_package_and_plugin_modules_are_the_same_classes():
    """`research.llava` re-exports the top-level plugin modules: one class, registered once."""
    import llava_model
    import research.llava as pkg
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    assert pkg.LlavaModel is llava_model.LlavaModel
    assert MindFormerRegister.get_cls(MindFormerModuleType.MODELS, "LlavaModel") is llava_model.LlavaModel
