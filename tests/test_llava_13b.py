"""[T] LLaVA-1.5-13B: the research/llava/llava1_5_13B yamls describe llava-hf/llava-1.5-13b-hf, a 13B-shaped
folder in llava-hf's layout passes the converter's and loader's strict key/shape check, and the memory
estimate plans it: int8 on a 24 GB CPU, float16 over 2 Ascend cards.

The folder holds the real 26 GB of float16 tensors only as sparse files (safetensors headers, then a hole):
no byte of weights is written, nothing is read but the headers.

The 13B's shapes, from its public config.json: the 7B's text model with hidden_size 5120, 40 layers, 40
heads (and key/value heads), intermediate_size 13824; the same CLIP-L/336 vision tower. The expected listing
below is the real 7B listing (tests/fixtures/llava_1_5_7b_keys.json) with those sizes, not our weight map.
"""
import copy
import json
import os

import pytest

from helpers import FIXTURES, ROOT

HERE = os.path.join(ROOT, "research", "llava", "llava1_5_13B")
GIB = 2 ** 30


def real_13b_listing():
    """name -> shape of llava-1.5-13b-hf, and its config.json, derived by hand from the 7B's: decoder and
    projector sizes 4096 -> 5120 and 11008 -> 13824, layers 32..39 like layer 0 (the vision tower keeps its
    1024/4096: CLIP-L's own)."""
    with open(os.path.join(FIXTURES, "llava_1_5_7b_keys.json")) as f:
        seven = json.load(f)
    size = {4096: 5120, 11008: 13824}
    keys = {}
    for name, shape in seven["keys"].items():
        if name.startswith("vision_tower."):
            keys[name] = shape
            continue
        keys[name] = [size.get(d, d) for d in shape]
        if ".layers.0." in name:
            for layer in range(32, 40):
                keys[name.replace(".layers.0.", f".layers.{layer}.")] = keys[name]
    config = copy.deepcopy(seven["config"])
    config["text_config"].update(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40)
    return keys, config


def sparse_folder(path, keys, config, shards=3):
    """A llava-hf folder whose float16 tensors are holes: per shard a safetensors header and a file size
    covering its tensors' bytes (os.truncate makes a sparse file), an index, the config."""
    import struct
    names = sorted(keys)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, at = {}, 0
        for n in part:
            nbytes = 2
            for d in keys[n]:
                nbytes *= d
            header[n] = {"dtype": "F16", "shape": keys[n], "data_offsets": [at, at + nbytes]}
            at += nbytes
            weight_map[n] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(path, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
        os.truncate(os.path.join(path, fname), 8 + len(raw) + at)
        total += at
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return total


def yaml_config(name):
    import file_checks
    from llava_config import LlavaConfig
    data = file_checks.load_yaml(os.path.join(HERE, name))
    return data, LlavaConfig(**data["model"]["model_config"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    keys, config = real_13b_listing()
    path = tmp_path_factory.mktemp("llava13b")
    total = sparse_folder(str(path), keys, config)
    return dict(path=str(path), keys=keys, total=total)


def test_the_listing_is_13b_sized(folder):
    # 686 tensors of the 7B + 8 more decoder layers of 9 tensors = 758; 13.35e9 parameters * 2 bytes
    assert len(folder["keys"]) == 686 + 8 * 9 == 758
    assert folder["total"] / 2 == pytest.approx(13.35e9, rel=0.005)
    disk = sum(os.stat(os.path.join(folder["path"], n)).st_blocks * 512 for n in os.listdir(folder["path"]))
    assert disk < 1 << 20          # sparse: headers only on disk


@pytest.mark.parametrize("name", ["predict_llava1_5_13b.yaml", "predict_llava1_5_13b_cpu.yaml"])
def test_yamls_match_the_folder(name, folder):
    """The yaml's model agrees with the folder's config.json, and the converter's plan (every key with its
    shape, strictly) accepts the folder; the conversion streams one tensor at a time, the largest of which is
    the 32064 x 5120 embedding: 0.66 GB as float32."""
    import checkpoint_io
    from weights import conversion, matching
    data, config = yaml_config(name)
    hf = matching.read_hf_config(os.path.join(folder["path"], "config.json"))
    assert matching.config_differences(hf, config) == []
    tensors = checkpoint_io.read_safetensors_folder(folder["path"])
    plan = conversion.plan_ckpt(tensors, config, "13B folder", dtype="float32")
    assert len(plan.rows) == 758 and plan.total == 2 * folder["total"]
    assert max(r[3] for r in plan.rows) == 32064 * 5120 * 4


def test_the_cpu_yaml_builds_the_13b_model(folder):
    """Built without weights, the CPU yaml's model has exactly the 13B's weight names and shapes (int8 linear
    layers keep their [out, in] shapes)."""
    import mindspore as ms
    from mindspore.nn.utils import no_init_parameters
    from llava_model import LlavaModel
    _, config = yaml_config("predict_llava1_5_13b_cpu.yaml")
    with no_init_parameters():
        model = LlavaModel(config)
    weights = model.weight_parameters()
    assert {n: list(p.shape) for n, p in weights.items()} == folder["keys"]
    assert weights["language_model.model.layers.39.mlp.down_proj.weight"].dtype == ms.int8


def hand_int8_bytes():
    """The CPU yaml's weights by hand: int8 for the decoder's and vision tower's linear layers and lm_head
    (1 byte per value + a float32 scale per output row), float32 for everything else."""
    h, i, layers, vocab = 5120, 13824, 40, 32064
    decoder = layers * (4 * h * h + 3 * h * i + (4 * h + 2 * i + h) * 4)          # q k v o, gate up down + scales
    head = vocab * h + vocab * 4
    vision = 24 * (4 * 1024 * 1024 + 2 * 1024 * 4096 + (4 * 1024 + 4096 + 1024) * 4)
    floats = (vocab * h                                                 # embed_tokens
              + 1024 * 5120 + 5120 + 5120 * 5120 + 5120                 # projector
              + 1024 * 3 * 14 * 14 + 577 * 1024 + 1024 + 4 * 1024       # patches, positions, class, pre/post norms
              + 24 * (4 * 1024 + 4096 + 1024 + 2 * 2 * 1024)         # vision biases, 2 layer norms per layer
              + layers * 2 * h + h) * 4                                 # decoder norms
    return decoder + head + vision + floats


def test_int8_on_a_24_gb_cpu():
    import memory_budget
    from llava_errors import LlavaError
    _, config = yaml_config("predict_llava1_5_13b_cpu.yaml")
    est = memory_budget.estimate(config, batch=1)
    assert est.weights == pytest.approx(hand_int8_bytes(), rel=0.002)          # ~13.0 GiB
    # KV: 40 layers x (keys, values) x 1024 positions x 5120 x float32 = 1.5625 GiB per row
    assert est.kv_cache == 40 * 2 * 1024 * 5120 * 4
    room = (22 * GIB, "a 24 GB machine with 22 GiB free (test)")
    memory_budget.check(config, batch=1, available=room)
    # --max_batch 8 (serve/eval): 8 rows would need 12.5 GiB of KV; the pool shrinks to what fits, >= 1 row
    need = memory_budget.check(config, batch=8, available=room, shrink_kv=True)
    assert est.kv_cache <= need.kv_cache < 8 * est.kv_cache and need.total <= room[0]
    # float16 weights (26 GB) do not fit: refused with the figures before anything loads
    config.weight_dtype = "float16"
    with pytest.raises(LlavaError, match="this run needs"):
        memory_budget.check(config, batch=1, available=room)


def test_int4_on_a_24_gb_cpu():
    import memory_budget
    from llava_config import WEIGHT_DTYPES
    if "int4" not in WEIGHT_DTYPES:
        pytest.skip("int4 weights are not in this tree yet")
    _, config = yaml_config("predict_llava1_5_13b_cpu.yaml")
    int8 = memory_budget.estimate(config, batch=1).weights
    config.weight_dtype = "int4"
    est = memory_budget.estimate(config, batch=1)
    # int4 halves the layers' bytes (lm_head stays int8): well under the int8 figure, and it fits 24 GB
    assert est.weights < 0.65 * int8
    memory_budget.check(config, batch=8, available=(22 * GIB, "test"), shrink_kv=True)


def test_float16_over_two_ascend_cards():
    """The Ascend yaml: float16, model_parallel 2, 29 GB per card (a 32 GB card). Per rank: half of the
    decoder's weights, the vision tower whole, half the KV heads."""
    import memory_budget
    import weight_map
    data, config = yaml_config("predict_llava1_5_13b.yaml")
    assert data["parallel_config"]["model_parallel"] == 2 and data["context"]["device_target"] == "Ascend"
    weight_map.check_parallel(config, 2)          # 40 heads, 32064 vocabulary rows: both split in two
    one = memory_budget.estimate(config, batch=1, world=1)
    two = memory_budget.check(config, batch=1, world=2, device_target="Ascend",
                              max_device_memory=data["context"]["max_device_memory"])
    # float16: 13.35e9 parameters * 2 bytes = 26.7 GB on one card; the vision tower (0.3e9) is not split
    assert one.weights == pytest.approx(2 * 13.35e9, rel=0.01)
    assert two.weights == pytest.approx((13.35e9 - 0.30e9) + 0.30e9 * 2, rel=0.02)
    # KV float16 at seq_length 2048: 40 x 2 x 2048 x 5120 x 2 bytes = 1.56 GiB, half per rank
    assert one.kv_cache == 40 * 2 * 2048 * 5120 * 2 and two.kv_cache == one.kv_cache // 2
    assert two.total < memory_budget.parse_size(data["context"]["max_device_memory"])
