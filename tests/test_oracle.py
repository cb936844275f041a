"""The Hugging Face oracle itself: fixtures laid out exactly like llava-hf/llava-1.5-7b-hf."""
import json
import os

import pytest
from safetensors import safe_open

from conftest import TOKENIZER_MODEL

LEGACY_PREFIXES = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                   "multi_modal_projector.linear_1.", "multi_modal_projector.linear_2.")


def _keys(hf_dir):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    with safe_open(os.path.join(hf_dir, "model.safetensors"), "np") as f:
        return set(f.keys())


def test_tiny_uses_legacy_llava_hf_key_names(tiny_hf_dir):
    keys = _keys(tiny_hf_dir)
    assert all(k.startswith(LEGACY_PREFIXES) for k in keys), sorted(keys)[:5]
    assert "language_model.lm_head.weight" in keys
    assert "vision_tower.vision_model.pre_layrnorm.weight" in keys
    assert "multi_modal_projector.linear_2.bias" in keys
    for name in ("config.json", "preprocessor_config.json", "tokenizer.model"):
        assert os.path.exists(os.path.join(tiny_hf_dir, name)), name


def test_tiny_round_trips_through_from_pretrained(tiny_hf_dir):
    import torch
    from transformers import LlavaForConditionalGeneration
    model, info = LlavaForConditionalGeneration.from_pretrained(tiny_hf_dir, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    with safe_open(os.path.join(tiny_hf_dir, "model.safetensors"), "pt") as f:
        stored = f.get_tensor("language_model.model.layers.1.self_attn.o_proj.weight")
        head = f.get_tensor("language_model.lm_head.weight")
    assert torch.equal(model.model.language_model.layers[1].self_attn.o_proj.weight, stored)
    assert torch.equal(model.lm_head.weight, head)
    cfg = model.config
    assert cfg.image_token_index == 32000 and cfg.text_config.vocab_size == 32064
    assert cfg.vision_config.image_size == 112 and (112 // cfg.vision_config.patch_size) ** 2 == 64


def test_real_7b_listing_has_the_public_shapes(real_7b_keys):
    assert len(real_7b_keys) == 686
    assert real_7b_keys["language_model.model.embed_tokens.weight"] == [32064, 4096]
    assert real_7b_keys["language_model.model.layers.31.mlp.gate_proj.weight"] == [11008, 4096]
    assert real_7b_keys["vision_tower.vision_model.embeddings.patch_embedding.weight"] == [1024, 3, 14, 14]
    assert real_7b_keys["vision_tower.vision_model.embeddings.position_embedding.weight"] == [577, 1024]
    assert real_7b_keys["multi_modal_projector.linear_1.weight"] == [4096, 1024]


def test_tokenizer_model_matches_llava_hf_ids():
    from make_tiny_llava import make_hf_tokenizer
    tok = make_hf_tokenizer(TOKENIZER_MODEL)
    ids = tok("USER: <image>\nDescribe the image. ASSISTANT:")["input_ids"]
    assert ids == [1, 3148, 1001, 29901, 29871, 32000, 29871, 13, 4002, 29581, 278, 1967, 29889,
                   319, 1799, 9047, 13566, 29901]
    assert tok.convert_ids_to_tokens([0, 1, 2, 29871, 32001]) == ["<unk>", "<s>", "</s>", "\u2581", "<pad>"]


@pytest.mark.parametrize("preset", ["tiny_gqa"])
def test_second_shape_is_really_different(preset, tiny_gqa_hf_dir):
    with open(os.path.join(tiny_gqa_hf_dir, "config.json")) as f:
        cfg = json.load(f)
    t = cfg["text_config"]
    assert t["num_key_value_heads"] < t["num_attention_heads"] and t["rope_theta"] != 10000.0


def test_package_and_plugin_modules_are_the_same_classes():
    """`research.llava` re-exports the top-level plugin modules: one class, registered once."""
    import llava_model
    import research.llava as pkg
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    assert pkg.LlavaModel is llava_model.LlavaModel
    assert MindFormerRegister.get_cls(MindFormerModuleType.MODELS, "LlavaModel") is llava_model.LlavaModel
