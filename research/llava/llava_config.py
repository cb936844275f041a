"""LlavaConfig / LlavaCLIPConfig / LlavaTextConfig: parse and validate every shape of the model.

This is the only place shapes live: the model, the processor (image size, image-token count) and the weight
converter (expected parameter shapes) all ask these objects. The yaml layout follows MindFormers' research
config for LLaVA-1.5 (`model.model_config.{vision,text}_config.model_config.*`); `from_hf_config` reads a
`llava-hf` `config.json`.
"""
from mindformers.models.configuration_utils import PretrainedConfig
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from llava_errors import LlavaError
from mindformers_hooks import PLUGIN_DIR  # noqa: F401  (importing it installs the MindFormers hooks)

DTYPES = ("float32", "float16", "bfloat16")
WEIGHT_DTYPES = DTYPES + ("int8", "int4")

# Keys that MindFormers' own LLaVA yaml carries (and its Trainer passes: parallel_config, moe_config to every
# model config) but that do not change inference here (dropout is off at
# inference, flash attention/paged attention are Ascend kernels, freezing is for training). Accepted so that
# a seed yaml loads; anything else unknown is an error.
_IGNORED_COMMON = {"type", "arch", "auto_register", "checkpoint_name_or_path", "use_flash_attention",
                   "initializer_range", "initializer_factor", "dropout", "attention_dropout",
                   "emb_dropout_prob", "use_past_shard", "offset", "scaling_factor", "parallel_config",
                   "moe_config",
                   "projection_dim", "num_queries", "model_type", "name_or_path", "pretrained_model_dir",
                   "mindformers_version", "tokenizer_class", "architectures", "is_encoder_decoder",
                   "is_sample_acceleration", "quantization_config", "quantization", "pet_config",
                   "_commit_hash"}


def _flatten(kwargs, what):
    """Accept both the yaml nesting `{type, arch, model_config: {...}}` and plain keyword arguments."""
    kwargs = dict(kwargs)
    nested = kwargs.pop("model_config", None)
    if nested is not None:
        if not isinstance(nested, dict):
            raise LlavaError(f"{what}.model_config must be a mapping, got {type(nested).__name__}")
        kwargs.update(dict(nested))
    return kwargs


def _take(kwargs, spec, what):
    """Pop the known keys (with defaults and type checks) from kwargs; unknown keys are an error."""
    values = {}
    for key, (kind, default) in spec.items():
        value = kwargs.pop(key, default)
        if value is None and default is None:
            values[key] = None
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise LlavaError(f"{what}.{key} must be {kind.__name__}, got {value!r}")
        values[key] = value
    unknown = sorted(k for k in kwargs if k not in _IGNORED_COMMON)
    if unknown:
        raise LlavaError(f"{what}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(spec))}")
    return values


def _positive(what, **values):
    for key, value in values.items():
        if value is None or value <= 0:
            raise LlavaError(f"{what}.{key} must be a positive number, got {value!r}")


def _divides(what, a_name, a, b_name, b):
    if a % b:
        raise LlavaError(f"{what}: {a_name}={a} is not divisible by {b_name}={b}")


def _dtype(what, key, value):
    if value not in DTYPES:
        raise LlavaError(f"{what}.{key} must be one of {', '.join(DTYPES)}, got {value!r}")
    return value


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class LlavaCLIPConfig(PretrainedConfig):
    """CLIP ViT vision tower (ViT-L/14-336 for LLaVA-1.5-7B)."""
    model_type = "llava_clip"

    SPEC = {
        "hidden_size": (int, 1024),
        "intermediate_size": (int, 4096),
        "num_hidden_layers": (int, 24),
        "num_attention_heads": (int, 16),
        "num_channels": (int, 3),
        "image_size": (int, 336),
        "patch_size": (int, 14),
        "hidden_act": (str, "quick_gelu"),
        "layer_norm_eps": (float, 1e-5),
        "vision_feature_layer": (int, -2),
        "vision_feature_select_strategy": (str, "default"),
    }

    def __init__(self, **kwargs):
        what = "vision_config"
        kwargs = _flatten(kwargs, what)
        values = _take(kwargs, self.SPEC, what)
        super().__init__()
        self.__dict__.update(values)
        _positive(what, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                  num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                  image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
                  layer_norm_eps=self.layer_norm_eps)
        _divides(what, "hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        _divides(what, "image_size", self.image_size, "patch_size", self.patch_size)
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise LlavaError(f"{what}.hidden_act must be quick_gelu or gelu, got {self.hidden_act!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise LlavaError(f"{what}.vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        # hidden_states has num_hidden_layers + 1 entries (embeddings first), as in transformers.
        n = self.num_hidden_layers
        if not -(n + 1) <= self.vision_feature_layer <= n:
            raise LlavaError(f"{what}.vision_feature_layer={self.vision_feature_layer} is out of range "
                             f"for {n} layers (allowed {-(n + 1)}..{n})")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self):
        """Features per image that replace `<image>` tokens: patches, plus CLS for the 'full' strategy."""
        return self.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def feature_layer_index(self):
        """Index into hidden_states (0 = embeddings after pre_layrnorm, i = after layer i)."""
        n = self.num_hidden_layers
        return self.vision_feature_layer % (n + 1)


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class LlavaTextConfig(PretrainedConfig):
    """LLaMA / Vicuna decoder. Key names follow MindFormers' LlamaConfig (num_layers, n_kv_heads, theta)."""
    model_type = "llava_llama"

    SPEC = {
        "hidden_size": (int, 4096),
        "num_layers": (int, 32),
        "num_heads": (int, 32),
        "n_kv_heads": (int, None),
        "intermediate_size": (int, 11008),
        "vocab_size": (int, 32064),
        "rms_norm_eps": (float, 1e-5),
        "theta": (float, 10000.0),
        "max_position_embedding": (int, 4096),
        "hidden_act": (str, "silu"),
        "bos_token_id": (int, 1),
        "eos_token_id": (int, 2),
        "pad_token_id": (int, 32001),
    }

    def __init__(self, **kwargs):
        what = "text_config"
        kwargs = _flatten(kwargs, what)
        values = _take(kwargs, self.SPEC, what)
        super().__init__()
        self.__dict__.update(values)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.num_heads
        _positive(what, hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
                  n_kv_heads=self.n_kv_heads, intermediate_size=self.intermediate_size,
                  vocab_size=self.vocab_size, rms_norm_eps=self.rms_norm_eps, theta=self.theta,
                  max_position_embedding=self.max_position_embedding)
        _divides(what, "hidden_size", self.hidden_size, "num_heads", self.num_heads)
        _divides(what, "num_heads", self.num_heads, "n_kv_heads", self.n_kv_heads)
        if self.head_dim % 2:
            raise LlavaError(f"{what}: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise LlavaError(f"{what}.hidden_act must be silu, got {self.hidden_act!r}")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, key) < self.vocab_size:
                raise LlavaError(f"{what}.{key}={getattr(self, key)} is outside the vocabulary "
                                 f"(vocab_size={self.vocab_size})")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads


def _sub_config(value, cls, what):
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    raise LlavaError(f"{what} must be a mapping, got {type(value).__name__}")


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class LlavaConfig(PretrainedConfig):
    """The whole LLaVA-1.5 model: vision tower, projector, text decoder, and generation defaults."""
    model_type = "llava"

    SPEC = {
        "image_token_index": (int, 32000),
        "projector_hidden_act": (str, "gelu"),
        "seq_length": (int, 2048),
        "batch_size": (int, 1),
        "compute_dtype": (str, "float32"),
        "param_init_type": (str, "float32"),
        "layernorm_compute_type": (str, "float32"),
        "softmax_compute_type": (str, "float32"),
        "rotary_dtype": (str, "float32"),
        # storage of the decoder's and vision tower's linear weights (float32 = param_init_type's Linear)
        "weight_dtype": (str, "float32"),
        "use_past": (bool, True),
        # generation defaults (overridable from the command line)
        "max_decode_length": (int, 1024),
        "max_new_tokens": (int, None),
        "do_sample": (bool, False),
        "top_k": (int, 0),
        "top_p": (float, 1.0),
        "temperature": (float, 1.0),
        "repetition_penalty": (float, 1.0),
        "seed": (int, None),
        # carried by MindFormers' seed yaml; training-only or Ascend paged-attention settings
        "freeze_vision": (bool, True),
        "freeze_llm": (bool, True),
        "ignore_token_id": (int, -100),
        "block_size": (int, 16),
        "num_blocks": (int, 512),
        "is_dynamic": (bool, True),
    }

    def __init__(self, vision_config=None, text_config=None, **kwargs):
        what = "model_config"
        values = _take(kwargs, self.SPEC, what)
        super().__init__()
        self.__dict__.update(values)
        self.vision_config = _sub_config(vision_config, LlavaCLIPConfig, "vision_config")
        self.text_config = _sub_config(text_config, LlavaTextConfig, "text_config")
        for key in ("compute_dtype", "param_init_type", "layernorm_compute_type", "softmax_compute_type",
                    "rotary_dtype"):
            _dtype(what, key, getattr(self, key))
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise LlavaError(f"{what}.weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, "
                             f"got {self.weight_dtype!r}")
        _positive(what, seq_length=self.seq_length, batch_size=self.batch_size,
                  max_decode_length=self.max_decode_length, top_p=self.top_p,
                  temperature=self.temperature, repetition_penalty=self.repetition_penalty)
        if self.max_new_tokens is not None:
            _positive(what, max_new_tokens=self.max_new_tokens)
        if self.top_p > 1:
            raise LlavaError(f"{what}.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LlavaError(f"{what}.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.projector_hidden_act != "gelu":
            raise LlavaError(f"{what}.projector_hidden_act must be gelu, got {self.projector_hidden_act!r}")
        if not 0 <= self.image_token_index < self.text_config.vocab_size:
            raise LlavaError(f"{what}.image_token_index={self.image_token_index} is outside the vocabulary "
                             f"(vocab_size={self.text_config.vocab_size})")
        if self.seq_length > self.text_config.max_position_embedding:
            raise LlavaError(f"{what}.seq_length={self.seq_length} exceeds text_config."
                             f"max_position_embedding={self.text_config.max_position_embedding}")
        if self.seq_length <= self.num_image_tokens:
            raise LlavaError(f"{what}.seq_length={self.seq_length} cannot hold one image "
                             f"({self.num_image_tokens} image tokens)")

    @property
    def num_image_tokens(self):
        return self.vision_config.num_image_tokens

    def to_dict(self):
        out = {k: v for k, v in self.__dict__.items() if k in self.SPEC}
        out["vision_config"] = {k: getattr(self.vision_config, k) for k in LlavaCLIPConfig.SPEC}
        out["text_config"] = {k: getattr(self.text_config, k) for k in LlavaTextConfig.SPEC}
        return out

    @classmethod
    def from_hf_config(cls, hf, **overrides):
        """Build from a llava-hf `config.json` dict (transformers' LlavaConfig layout)."""
        if not isinstance(hf, dict) or hf.get("model_type") != "llava":
            got = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
            raise LlavaError(f"config.json is not a LLaVA config (model_type={got!r}, expected 'llava')")
        v = hf.get("vision_config") or {}
        t = hf.get("text_config") or {}
        for key, section in (("vision_config", v), ("text_config", t)):
            if not isinstance(section, dict):
                raise LlavaError(f"config.json: {key} must be an object, got {type(section).__name__}")
        vision = dict(
            hidden_size=v.get("hidden_size", 1024), intermediate_size=v.get("intermediate_size", 4096),
            num_hidden_layers=v.get("num_hidden_layers", 24),
            num_attention_heads=v.get("num_attention_heads", 16), num_channels=v.get("num_channels", 3),
            image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
            hidden_act=v.get("hidden_act", "quick_gelu"), layer_norm_eps=v.get("layer_norm_eps", 1e-5),
            vision_feature_layer=hf.get("vision_feature_layer", -2),
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"))
        heads = t.get("num_attention_heads", 32)
        rope = t.get("rope_scaling")
        if rope:
            raise LlavaError(f"config.json: text_config.rope_scaling={rope!r} is not supported")
        text = dict(
            hidden_size=t.get("hidden_size", 4096), num_layers=t.get("num_hidden_layers", 32),
            num_heads=heads, n_kv_heads=t.get("num_key_value_heads") or heads,
            intermediate_size=t.get("intermediate_size", 11008),
            vocab_size=t.get("vocab_size", hf.get("vocab_size", 32000)),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6), theta=t.get("rope_theta", 10000.0),
            max_position_embedding=t.get("max_position_embeddings", 2048),
            hidden_act=t.get("hidden_act", "silu"), bos_token_id=t.get("bos_token_id", 1),
            eos_token_id=t.get("eos_token_id", 2),
            pad_token_id=hf.get("pad_token_id", t.get("pad_token_id")) or 0)
        positions = text["max_position_embedding"]
        if isinstance(positions, bool) or not isinstance(positions, int):
            raise LlavaError(f"config.json: text_config.max_position_embeddings must be int, got {positions!r}")
        kwargs = dict(image_token_index=hf.get("image_token_index", 32000),
                      projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
                      seq_length=min(2048, positions))
        kwargs.update(overrides)
        return cls(vision_config=vision, text_config=text, **kwargs)
