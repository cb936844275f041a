"""The weights layer (research/llava/weights.py): one strict check, and `--load_checkpoint` as a complete .ckpt,
rank folders or the llava-hf folder itself (single file or shards), sliced per rank and cast per tensor.

Expected values come from the Hugging Face files read with the `safetensors` library (numpy / torch casts), and
from hand-written expectations; never from our own reader. End-to-end answers (run_mindformer.py on an HF
folder against the HF oracle, one process and 2 ranks) are in test_predict.py-style runs below and in
test_parallel.py.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import hf_checkpoint
from helpers import MAX_NEW, PAIRS, ROOT, check_records, config_of, convert, hf_tensors, predict, run_cli, yaml_for
from llava_errors import LlavaError
from parallel import TensorParallel
import weight_map
import weights


class Holder:
    """Real MindSpore Parameters with a rank's shapes, standing where a model's weight_parameters() would."""

    def __init__(self, config, tp, dtype="float32"):
        import mindspore as ms
        from mindspore.common.initializer import Zero
        self.params = {}
        for name, (shape, _) in weight_map.expected_params(config).items():
            local = list(shape)
            axis = weight_map.split_axis(name)
            if axis is not None:
                local[axis] //= tp.world
            self.params[name] = ms.Parameter(ms.Tensor(shape=local, dtype=getattr(ms, dtype), init=Zero()),
                                             name=name)

    def weight_parameters(self):
        return self.params


def load(path, config, tp=TensorParallel(), dtype="float32", **kw):
    holder = Holder(config, tp, dtype)
    weights.load_into(holder, weights.rank_checkpoint(path, tp, config, **kw), tp)
    return {n: p.asnumpy() for n, p in holder.params.items()}


@pytest.fixture(scope="module")
def tiny_sharded_dir():
    return hf_checkpoint("tiny", shard_mb=4)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("weights") / "tiny.ckpt")
    return convert(tiny_hf_dir, out)


# ------------------------------------------------------------------------------------------------ match
def test_match_names_every_problem():
    expected = {"a.weight": (4, 2), "b.weight": (3,), "c.bias": (3,)}
    assert weights.match({"a.weight": [4, 2], "b.weight": (3,), "c.bias": (3,)}, expected) == []
    assert weights.match({"a.weight": (2, 4), "b.weight": (3,), "z": (1,)}, expected) == [
        "1 missing: c.bias", "1 unknown: z", "1 with the wrong shape: a.weight [2, 4] (expected [4, 2])"]
    many = {f"w{i}": (1,) for i in range(7)}
    assert weights.match({}, many) == ["7 missing: w0, w1, w2, w3, w4 (and 2 more)"]


def test_check_refuses_non_float_tensors(tiny_hf_dir):
    import checkpoint_io
    tensors = checkpoint_io.read_safetensors_folder(tiny_hf_dir)
    expected = weights.expected_shapes(config_of(tiny_hf_dir))
    weights.check(tensors, expected, "x")                       # the fixture itself fits
    bad = dict(tensors)
    info = bad["language_model.model.norm.weight"]
    bad["language_model.model.norm.weight"] = checkpoint_io.TensorInfo(info.name, info.path, "I32", info.shape,
                                                                       info.offset, info.nbytes)
    with pytest.raises(LlavaError, match=r"^x: 1 with a non-float dtype: language_model\.model\.norm\.weight \(I32\)$"):
        weights.check(bad, expected, "x")


# ------------------------------------------------------------------------------------- sources, one process
def test_hf_folder_single_and_sharded_equal_the_safetensors(tiny_hf_dir, tiny_sharded_dir, tiny_ckpt):
    ref = hf_tensors(tiny_hf_dir)
    config = config_of(tiny_hf_dir)
    assert len([n for n in os.listdir(tiny_sharded_dir) if n.endswith(".safetensors")]) > 1
    for source in (tiny_hf_dir, tiny_sharded_dir, tiny_ckpt):
        got = load(source, config)
        assert sorted(got) == sorted(ref), source
        for name, value in ref.items():
            assert got[name].dtype == np.float32 and got[name].tobytes() == value.tobytes(), (source, name)


def test_hf_folder_dtypes_are_cast_per_tensor(tiny_hf_dir, tmp_path):
    """float16 and bfloat16 safetensors into a float32 model, and float32 safetensors into a float16 model."""
    import torch
    from safetensors.torch import save_file as save_torch
    ref = hf_tensors(tiny_hf_dir)
    config = config_of(tiny_hf_dir)
    for dtype in ("float16", "bfloat16"):
        folder = tmp_path / dtype
        folder.mkdir()
        shutil.copy(os.path.join(tiny_hf_dir, "config.json"), folder / "config.json")
        save_torch({k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in ref.items()},
                   str(folder / "model.safetensors"), metadata={"format": "pt"})
        got = load(str(folder), config)
        for name, value in ref.items():
            want = torch.from_numpy(value).to(getattr(torch, dtype)).float().numpy()
            assert got[name].dtype == np.float32 and got[name].tobytes() == want.tobytes(), (dtype, name)
    got = load(tiny_hf_dir, config, dtype="float16")
    for name, value in ref.items():
        assert got[name].dtype == np.float16 and got[name].tobytes() == value.astype(np.float16).tobytes(), name


@pytest.mark.parametrize("source", ["single", "sharded"])
def test_hf_folder_is_sliced_per_rank(tiny_hf_dir, tiny_sharded_dir, source):
    """Each of 2 ranks gets its half of every split weight (rows for column/vocab, columns for row splits),
    the whole of every replicated one; the halves put together are the HF tensors."""
    folder = tiny_hf_dir if source == "single" else tiny_sharded_dir
    ref = hf_tensors(tiny_hf_dir)
    config = config_of(tiny_hf_dir)
    ranks = [load(folder, config, TensorParallel(rank, 2)) for rank in range(2)]
    t = "language_model.model.layers.1."
    for name, value in ref.items():
        axis = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1,
                "embed_tokens": 0, "lm_head": 0}.get(name.split(".")[-2]) if name.startswith("language_model.") \
            else None
        if axis is None:
            assert all(r[name].tobytes() == value.tobytes() for r in ranks), name
        else:
            assert all(r[name].shape[axis] * 2 == value.shape[axis] for r in ranks), name
            np.testing.assert_array_equal(np.concatenate([r[name] for r in ranks], axis), value, err_msg=name)
    assert ranks[1][t + "self_attn.o_proj.weight"].shape == (64, 32)


# ---------------------------------------------------------------------------------------------- bad sources
def test_hf_config_that_disagrees_with_the_yaml_is_named(tiny_hf_dir, tiny_gqa_hf_dir):
    with pytest.raises(LlavaError) as info:
        weights.rank_checkpoint(tiny_hf_dir, TensorParallel(), config_of(tiny_gqa_hf_dir))
    message = str(info.value)
    assert message.startswith(f"--load_checkpoint {tiny_hf_dir}: its config.json does not match the yaml's "
                              f"model_config")
    for part in ("text_config.hidden_size is 64 in config.json, 96 in the yaml",
                 "text_config.n_kv_heads is 4 in config.json, 2 in the yaml",
                 "vision_config.image_size is 112 in config.json, 84 in the yaml",
                 "text_config.theta is 10000.0 in config.json, 500000.0 in the yaml"):
        assert part in message, part


def test_hf_folder_with_wrong_weights_fails_strictly(tiny_hf_dir, tmp_path):
    ref = hf_tensors(tiny_hf_dir)
    folder = tmp_path / "bad"
    folder.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir, "config.json"), folder / "config.json")
    bad = {k: v for k, v in ref.items() if k != "multi_modal_projector.linear_2.bias"}
    bad["language_model.model.norm.weight"] = ref["language_model.model.norm.weight"][:-1]
    bad["vision_tower.vision_model.embeddings.position_ids"] = np.arange(65, dtype=np.int64)[None]  # old buffer
    save_file(bad, str(folder / "model.safetensors"))
    with pytest.raises(LlavaError) as info:
        load(str(folder), config_of(tiny_hf_dir))
    assert str(info.value) == (
        f"--load_checkpoint {folder}: checkpoint does not match the model: "
        f"1 missing: multi_modal_projector.linear_2.bias; "
        f"1 with the wrong shape: language_model.model.norm.weight [63] (expected [64])")


def test_check_early_reads_headers_only(tiny_hf_dir, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(tiny_hf_dir, name), good / name)
    weights.check_early(str(good))
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir, "config.json"), cut / "config.json")
    with open(os.path.join(tiny_hf_dir, "model.safetensors"), "rb") as f:
        (cut / "model.safetensors").write_bytes(f.read()[:100_000])
    with pytest.raises(LlavaError, match=rf"^--load_checkpoint {cut}: {cut}/model.safetensors is truncated"):
        weights.check_early(str(cut))
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    os.symlink(os.path.join(tiny_hf_dir, "model.safetensors"), no_cfg / "model.safetensors")
    with pytest.raises(LlavaError, match="has no config.json"):
        weights.check_early(str(no_cfg))
    with pytest.raises(LlavaError, match="give the llava-hf folder that holds this file"):
        weights.check_early(os.path.join(tiny_hf_dir, "model.safetensors"))
    with pytest.raises(LlavaError, match="is required"):
        weights.check_early("")


# -------------------------------------------------------------------------------------------------- memory
MEMORY_PROBE = r"""
import json, sys
sys.path.insert(0, {plugin!r})
import mindspore as ms
from mindspore.nn.utils import no_init_parameters
ms.set_context(device_target="CPU", mode=ms.PYNATIVE_MODE)
from llava_config import LlavaConfig
from llava_model import LlavaModel
from parallel import TensorParallel
import weights

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

source = sys.argv[1]
config = LlavaConfig.from_hf_config(json.load(open(sys.argv[2])), seq_length=1024)
with no_init_parameters():
    model = LlavaModel(config)
(ms.Tensor([1.0]) + 1).asnumpy()
before = status("VmRSS")
weights.load_into(model, weights.rank_checkpoint(source, TensorParallel(), config), TensorParallel())
peak = status("VmHWM")   # this process's own peak (ru_maxrss would include the parent's size at fork)
params = model.weight_parameters().values()
print(json.dumps(dict(before=before, peak=peak, model=sum(p.nbytes for p in params),
                      largest=max(p.nbytes for p in params))))
"""


def test_loading_the_mid_hf_folder_peaks_at_the_model_plus_one_tensor(mid_hf_dir, tmp_path):
    """Lazy loading: the process grows by the weights it loads plus at most about one tensor (the largest,
    131 MB embed_tokens for `mid`), not by a shard (200 MB) or the whole folder (700 MB) a second time."""
    script = tmp_path / "probe.py"
    script.write_text(MEMORY_PROBE.format(plugin=os.path.join(ROOT, "research", "llava")))
    r = subprocess.run([sys.executable, str(script), mid_hf_dir, os.path.join(mid_hf_dir, "config.json")],
                       capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                       env=dict(os.environ, GLOG_v="3", LOG_MF_PATH=str(tmp_path / "log")))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grown = m["peak"] - m["before"]
    print(f"mid: model {m['model'] / 1e6:.0f} MB, largest tensor {m['largest'] / 1e6:.0f} MB, "
          f"RSS grew {grown / 1e6:.0f} MB while loading")
    assert m["model"] > 600e6
    assert grown <= m["model"] + m["largest"] + 64e6, m


# ------------------------------------------------------------------------ run_mindformer.py on a llava-hf folder
@pytest.fixture(scope="module")
def predict_setup(tiny_hf_dir, tiny_ckpt, tmp_path_factory):
    from oracle import HFOracle
    base = tmp_path_factory.mktemp("predict_hf")
    return dict(yaml=yaml_for(tiny_hf_dir, str(base / "tiny.yaml")),
                expected=[HFOracle(tiny_hf_dir).generate(img, prompt, MAX_NEW) for img, prompt in PAIRS])


@pytest.mark.parametrize("source", ["single", pytest.param("sharded", marks=pytest.mark.slow)])
def test_predict_from_the_hf_folder_equals_hf_and_the_converted_ckpt(source, predict_setup, tiny_hf_dir,
                                                                     tiny_sharded_dir, tiny_ckpt, tmp_path):
    """`--load_checkpoint HF_DIR` (no conversion) gives the HF oracle's answers, and the very records and
    console output of the converted .ckpt."""
    folder = tiny_hf_dir if source == "single" else tiny_sharded_dir
    proc, records = predict(predict_setup["yaml"], folder, str(tmp_path / "hf"), PAIRS)
    check_records(records, PAIRS, predict_setup["expected"])
    ref_proc, ref_records = predict(predict_setup["yaml"], tiny_ckpt, str(tmp_path / "ckpt"), PAIRS)
    assert records == ref_records and proc.stdout == ref_proc.stdout
    assert sorted(os.listdir(tmp_path / "hf")) == ["log", "predict_results.jsonl"]   # nothing converted


def test_predict_names_a_config_that_disagrees_with_the_yaml(predict_setup, tiny_gqa_hf_dir, tmp_path):
    proc = run_cli(["run_mindformer.py", "--config", predict_setup["yaml"], "--predict_data", *PAIRS[0],
                    "--load_checkpoint", tiny_gqa_hf_dir, "--output_dir", str(tmp_path / "o")])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"run_mindformer.py: error: --load_checkpoint {tiny_gqa_hf_dir}: its config.json "
                           f"does not match the yaml's model_config"), last
    assert "text_config.hidden_size is 96 in config.json, 64 in the yaml" in last
    assert "Traceback" not in proc.stderr
