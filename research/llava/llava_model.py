"""LlavaModel: CLIP vision tower -> projector -> merge into token embeddings -> LLaMA with a static KV cache.

Parameter names are exactly llava-hf's checkpoint keys (`vision_tower.vision_model.*`,
`multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`, `language_model.lm_head.weight`), so a
converted checkpoint loads with the identity name map; the KV caches
(`language_model.model.layers.N.self_attn.{k,v}_cache`) are not checkpoint weights.

This file wires the cells together, as transformers' `modeling_llava.py` does: `image_features` (vision tower,
feature selection, projector) and `embed` (token embeddings with the image features merged in at the
`<image>` positions) are what the engine's compiled steps call. Running requests (steps, KV cache, inputs,
the generate loop) is engine.py's job; `generate` is the entry MindFormers' pipeline and Trainer call.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops
from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from clip_vision import CLIPVisionModel, LlavaMultiModalProjector
from engine import Engine
from lowbit_kernels import is_scale_param
from generation import GenerationSettings
from llama_text import CACHE_NAMES, LlamaForCausalLM, is_cache_param
from llava_config import LlavaConfig
from mindformers_hooks import tensor_parallel_for
from weights import load_weights


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class LlavaModel(PreTrainedModel):
    """LLaVA-1.5 for inference. Built by MindFormers as `LlavaModel(config=LlavaConfig, parallel_config=...,
    moe_config=...)`; a PreTrainedModel so that MindFormers' pipelines and checkpoint loading accept it."""

    def __init__(self, config=None, **kwargs):
        if config is None:
            config = LlavaConfig()
        elif not isinstance(config, LlavaConfig):
            config = LlavaConfig(**dict(config))
        super().__init__(config)
        self.config = config
        # tensor parallelism: the language model is split over the ranks (parallel.py); vision is replicated.
        # MindFormers' build_network passes the yaml's parallel_config (and moe_config, unused: no experts).
        kwargs.pop("moe_config", None)
        parallel_config = kwargs.pop("parallel_config", None)
        self.tp = kwargs.pop("tensor_parallel", None) or tensor_parallel_for(parallel_config)
        self.vision_tower = CLIPVisionModel(config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = LlamaForCausalLM(config, self.tp)
        vc = config.vision_config
        self.vision_tokens = vc.num_patches + 1
        self.vision_dim = vc.hidden_size
        self.drop_cls = vc.vision_feature_select_strategy == "default"
        options = ("jit_steps", "eager", "block_size", "prefix_cache", "image_cache_bytes")
        self.__dict__["engine_options"] = {k: kwargs.pop(k) for k in options if k in kwargs}
        self.__dict__["_engine"] = None

    # ------------------------------------------------------------------ MindFormers integration
    def can_generate(self):
        """Generation goes through LlavaModel.generate, not MindFormers' GenerationMixin."""
        return False

    def fuse_weight_from_ckpt(self, checkpoint_dict):
        """MindFormers' load_ckpt hook (Trainer / run_mindformer.py with the stock trainer): strict loading of
        this rank's share of every weight, as the plugin's own loader does. A complete checkpoint is sliced
        for this rank (weight_map's split rules); a rank slice is taken as is. Raises LlavaError for a missing,
        unknown or wrongly shaped weight. Returns the loaded parameters, so MindFormers' own (lenient)
        load_param_into_net that follows finds every name and changes nothing."""
        import weight_map
        full = weight_map.expected_params(self.config)
        shares = {}
        for name, value in checkpoint_dict.items():
            if self.tp.enabled and name in full and tuple(value.shape) == tuple(full[name][0]):
                value = weight_map.shard(name, value.asnumpy() if isinstance(value, Tensor) else np.asarray(value),
                                         self.tp.rank, self.tp.world)
            shares[name] = value
        load_weights(self, shares)
        return dict(self.weight_parameters())

    def construct(self, input_ids, image_features, merge_index, position_ids, mask):
        """Cache-free full forward on prepared inputs (engine.prepare_prompt) -> float32 logits [B, L, V]:
        input_ids [B, L] int32 with image tokens replaced by any valid id, image_features [M, D] (M >= 1),
        merge_index [B * L] int32 into concat(token embeddings, image features), position_ids [B, L] int32,
        mask [B, L, L] int32 (causal and padding)."""
        b, l = input_ids.shape
        merged = self.embed(input_ids, image_features, merge_index)
        return self.language_model(merged, position_ids, mask, b, l)

    def engine(self):
        """The Engine that runs this model (built on first use)."""
        if self._engine is None:
            self.__dict__["_engine"] = Engine(self, **self.engine_options)
        return self._engine

    def generate(self, input_ids, pixel_values=None, attention_mask=None, streamer=None, **overrides):
        """Generate after left-padded prompts whose `<image>` tokens are already expanded (Engine.generate).
        Settings come from the config; `overrides` (GenerationSettings fields) win. Returns one list of new
        token ids per row, up to and including its first EOS."""
        settings = GenerationSettings.from_config(self.config, **overrides)
        return self.engine().generate(input_ids, pixel_values, attention_mask, settings=settings,
                                      streamer=streamer)

    # ------------------------------------------------------------------ parts the engine's steps call
    def image_features(self, pixel_values):
        """pixel_values [n, C, H, W] -> projected image features [n * num_image_tokens, text_hidden]."""
        n = pixel_values.shape[0]
        feats = self.vision_tower(pixel_values, n)                                   # n * tokens, Dv
        if self.drop_cls:
            feats = ops.reshape(ops.reshape(feats, (n, self.vision_tokens, self.vision_dim))[:, 1:, :],
                                (n * (self.vision_tokens - 1), self.vision_dim))
        return self.multi_modal_projector(feats)

    def embed(self, input_ids, image_features, merge_index):
        """Token embeddings [b * l, D] with row merge_index[i] of concat(token embeddings, image features)
        at position i: the image features take the places of the `<image>` tokens."""
        b, l = input_ids.shape
        emb = self.language_model.embed(ops.reshape(input_ids, (b * l,)))
        return ops.gather(ops.concat((emb, image_features), 0), merge_index, 0)

    def embed_rows(self, input_ids, image_features, image_mask):
        """A row step's embeddings: input_ids [n] int32 (image positions hold any valid id), image_features
        [n, D] (the feature of each image position, zeros elsewhere), image_mask [n, 1] compute dtype (1 at
        image positions) -> [n, D]. Exact in any float dtype: one of the two terms is multiplied by 0."""
        emb = self.language_model.embed(input_ids)
        return emb * (1 - image_mask) + image_features * image_mask

    def get_image_features(self, pixel_values):
        """pixel_values [N, 3, H, W] -> Tensor [N, num_image_tokens, text_hidden] (after the projector)."""
        feats = self.engine().image_features(pixel_values)
        n = feats.shape[0] // self.config.num_image_tokens
        return ops.reshape(feats, (n, self.config.num_image_tokens, self.config.text_config.hidden_size))

    # ------------------------------------------------------------------ parameters
    def weight_parameters(self):
        """name -> Parameter for every checkpoint weight (KV caches and int8 weights' scales excluded)."""
        return {p.name: p for p in self.get_parameters()
                if not is_cache_param(p.name) and not is_scale_param(p.name)}


__all__ = ["LlavaModel", "load_weights", "CACHE_NAMES"]
