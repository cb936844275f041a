"""Shared fixtures: the Hugging Face oracle checkpoints (built once, cached) and the bundled test data.

Plugin modules are imported the way MindFormers' `--register_path research/llava` imports them (top-level
`llava_config`, `llava_model`, ...), so each class is registered once per process.
"""
import hashlib
import os

import pytest

from helpers import FIXTURES, IMAGES, ROOT  # helpers also puts the plugin and the fixtures on sys.path

SLOW = "--slow / CI / LLAVA_SLOW_TESTS=1"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (CI runs them; a local run skips them)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow") or os.environ.get("CI") or os.environ.get("LLAVA_SLOW_TESTS"):
        return
    skip = pytest.mark.skip(reason=f"slow: run with {SLOW}")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


CACHE = os.environ.get("LLAVA_FIXTURE_CACHE", os.path.join(ROOT, ".cache", "fixtures"))


def _builder_digest():
    h = hashlib.sha256()
    for name in ("make_tiny_llava.py", "tokenizer.model"):
        with open(os.path.join(FIXTURES, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def hf_checkpoint(preset, shard_mb=None, seed=0):
    """Path of the HF-layout checkpoint for `preset`, built on first use and cached by builder digest."""
    import make_tiny_llava
    name = f"{preset}-s{seed}" + (f"-shard{shard_mb}" if shard_mb else "") + f"-{_builder_digest()}"
    out = os.path.join(CACHE, name)
    if not os.path.exists(os.path.join(out, "config.json")):
        os.makedirs(CACHE, exist_ok=True)
        make_tiny_llava.make_checkpoint(preset, out, seed=seed, shard_mb=shard_mb)
        _check_llava_hf_layout(out, preset, shard_mb)
    return out


LEGACY_PREFIXES = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                   "multi_modal_projector.linear_1.", "multi_modal_projector.linear_2.")


def _check_llava_hf_layout(hf_dir, preset, shard_mb):
    """A freshly built oracle checkpoint is laid out exactly like llava-hf/llava-1.5-7b-hf (legacy key names, the
    side files), transformers loads it without a missing or unexpected key, and tiny_gqa really has another
    attention shape."""
    import json
    from safetensors import safe_open
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            keys = set(json.load(f)["weight_map"])
    else:
        with safe_open(os.path.join(hf_dir, "model.safetensors"), "np") as f:
            keys = set(f.keys())
    assert all(k.startswith(LEGACY_PREFIXES) for k in keys), sorted(keys)[:5]
    assert "language_model.lm_head.weight" in keys
    assert "vision_tower.vision_model.pre_layrnorm.weight" in keys
    assert "multi_modal_projector.linear_2.bias" in keys
    for name in ("config.json", "preprocessor_config.json", "tokenizer.model"):
        assert os.path.exists(os.path.join(hf_dir, name)), name
    if preset == "tiny" and not shard_mb:
        import torch
        from transformers import LlavaForConditionalGeneration
        model, info = LlavaForConditionalGeneration.from_pretrained(hf_dir, output_loading_info=True)
        assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
        with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as f:
            stored = f.get_tensor("language_model.model.layers.1.self_attn.o_proj.weight")
            head = f.get_tensor("language_model.lm_head.weight")
        assert torch.equal(model.model.language_model.layers[1].self_attn.o_proj.weight, stored)
        assert torch.equal(model.lm_head.weight, head)
        cfg = model.config
        assert cfg.image_token_index == 32000 and cfg.text_config.vocab_size == 32064
        assert cfg.vision_config.image_size == 112 and (112 // cfg.vision_config.patch_size) ** 2 == 64
    if preset == "tiny_gqa":
        with open(os.path.join(hf_dir, "config.json")) as f:
            t = json.load(f)["text_config"]
        assert t["num_key_value_heads"] < t["num_attention_heads"] and t["rope_theta"] != 10000.0


@pytest.fixture(scope="session")
def tiny_hf_dir():
    return hf_checkpoint("tiny")


@pytest.fixture(scope="session")
def tiny_gqa_hf_dir():
    return hf_checkpoint("tiny_gqa")


@pytest.fixture(scope="session")
def mid_hf_dir():
    """The ~175M-parameter preset, sharded like the real 7B repository."""
    return hf_checkpoint("mid", shard_mb=200)


@pytest.fixture(scope="session")
def image_paths():
    return {os.path.splitext(n)[0]: os.path.join(IMAGES, n) for n in sorted(os.listdir(IMAGES))}


@pytest.fixture(scope="session")
def real_7b_keys():
    """The real llava-1.5-7b-hf checkpoint's tensor names and shapes (checked against the public shapes)."""
    import json
    with open(os.path.join(FIXTURES, "llava_1_5_7b_keys.json")) as f:
        keys = json.load(f)["keys"]
    assert len(keys) == 686
    assert keys["language_model.model.embed_tokens.weight"] == [32064, 4096]
    assert keys["language_model.model.layers.31.mlp.gate_proj.weight"] == [11008, 4096]
    assert keys["vision_tower.vision_model.embeddings.patch_embedding.weight"] == [1024, 3, 14, 14]
    assert keys["vision_tower.vision_model.embeddings.position_embedding.weight"] == [577, 1024]
    assert keys["multi_modal_projector.linear_1.weight"] == [4096, 1024]
    return keys


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_hf_dir):
    """The tiny model's serve yaml and checkpoint (helpers.serve_files), once per test module."""
    from helpers import serve_files
    return serve_files(tmp_path_factory.mktemp("serve"), tiny_hf_dir)


@pytest.fixture(scope="module")
def server(setup):
    """`run_mindformer.py --run_mode serve` on the tiny model, once per test module."""
    from helpers import ServerProcess
    s = ServerProcess(setup["yaml"], setup["ckpt"], str(setup["dir"] / "out"))
    yield s
    s.close()


# ---------------------------------------------------------------------------------------- execution mode
MODES = ("pynative", "graph")


def use_mode(name):
    """Switch the process-global execution mode; returns a restore function. PyNative runs with
    pynative_synchronize (ops execute on the calling thread): on a 2-core CPU the asynchronous op queue's
    thread hand-offs make every dependent op wait ~1 ms (tiny decode: 8 vs 67 steps/s)."""
    import mindspore as ms
    old = ms.get_context("mode"), ms.get_context("pynative_synchronize")
    ms.set_context(mode=ms.PYNATIVE_MODE if name == "pynative" else ms.GRAPH_MODE,
                   pynative_synchronize=(name == "pynative"))
    return lambda: ms.set_context(mode=old[0], pynative_synchronize=old[1])


@pytest.fixture(params=MODES)
def mode(request):
    restore = use_mode(request.param)
    yield request.param
    restore()


@pytest.fixture
def graph_mode():
    restore = use_mode("graph")
    yield
    restore()


@pytest.fixture
def pynative_mode():
    restore = use_mode("pynative")
    yield
    restore()
