"""The one strict check (missing / unknown / wrongly shaped weights) and the model's expected shapes."""
import math

import checkpoint_io as io
import weight_map
from file_checks import load_json
from llava_errors import LlavaError

# LlavaConfig fields that must agree between a llava-hf config.json and the yaml's model_config: the shapes,
# and the settings that change the answers without changing a shape.
CONFIG_FIELDS = {
    "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps",
                      "vision_feature_layer", "vision_feature_select_strategy"),
    "text_config": ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size", "vocab_size",
                    "rms_norm_eps", "theta", "hidden_act"),
    None: ("image_token_index", "projector_hidden_act"),
}


def match(found, expected):
    """Problems with `found` (name -> shape) as the weights of `expected` (name -> shape): one string each for
    the missing, the unknown and the wrongly shaped names (at most a few names shown); [] when they fit."""
    missing = sorted(n for n in expected if n not in found)
    unknown = sorted(n for n in found if n not in expected)
    wrong = [f"{n} {list(found[n])} (expected {list(expected[n])})"
             for n in sorted(expected) if n in found and tuple(found[n]) != tuple(expected[n])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {io.short_list(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} unknown: {io.short_list(unknown)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {io.short_list(wrong)}")
    return problems


def check(tensors, expected, what):
    """Raise LlavaError("`what`: problems") unless `tensors` (name -> TensorInfo) match `expected`
    (name -> shape) and are all float tensors."""
    problems = match({n: t.shape for n, t in tensors.items()}, expected)
    not_float = [f"{n} ({t.dtype})" for n, t in sorted(tensors.items()) if io.float_dtype(t.dtype) is None]
    if not_float:
        problems.append(f"{len(not_float)} with a non-float dtype: {io.short_list(not_float)}")
    if problems:
        raise LlavaError(f"{what}: " + "; ".join(problems))


# A config whose model lists more than SCALE_FACTOR times the weight tensors of the files, plus LISTABLE, is
# refused with figures before its weights are listed: listing takes time and memory in proportion to the config
# (a crafted num_hidden_layers of 10^9 would run for hours), and no list of missing names helps with such a
# mismatch. Below that, the strict `check` lists the names (milliseconds for LISTABLE names); wrong sizes
# (hidden_size, vocab_size) are its wrong-shape figures.
SCALE_FACTOR = 2
LISTABLE = 10_000


def check_scale(tensors, config, what):
    """Raise LlavaError, with the figures, when `config` describes a model of far more weight tensors than
    `tensors` (name -> TensorInfo) hold; constant time in the config's layer counts."""
    want_n, want_values = weight_map.param_totals(config)
    have_n = len(tensors)
    if want_n <= SCALE_FACTOR * have_n + LISTABLE:
        return
    v, t = config.vision_config, config.text_config
    raise LlavaError(
        f"{what}: the config describes a model of {want_n} weight tensors ({want_values:.3g} values; "
        f"vision_config num_hidden_layers={v.num_hidden_layers}, text_config num_layers={t.num_layers}), "
        f"the checkpoint holds {have_n} tensors")


def expected_shapes(config):
    """Parameter name -> complete shape for `config` (a LlavaConfig), in model order."""
    return {name: shape for name, (shape, _) in weight_map.expected_params(config).items()}


def hf_names(tensors):
    """A Hugging Face folder's tensors (name -> TensorInfo) under the model's parameter names, without the
    buffers old checkpoints carry (position_ids, rotary inv_freq); and the names of those skipped buffers.
    Names that are not LLaVA weights are kept as they are (`check` reports them)."""
    named, skipped = {}, []
    for name, t in tensors.items():
        if weight_map.is_ignored_hf(name):
            skipped.append(name)
            continue
        try:
            named[weight_map.hf_to_ms(name)] = t
        except LlavaError:
            named[name] = t
    return named, skipped


def read_hf_config(path):
    """LlavaConfig from a llava-hf config.json (LlavaError naming the file when it is not one)."""
    import llava_config
    hf = load_json(path)
    try:
        return llava_config.LlavaConfig.from_hf_config(hf)
    except LlavaError as e:
        raise LlavaError(f"{path}: {e}") from e


def config_differences(hf_config, model_config):
    """'text_config.hidden_size is 96 in config.json, 64 in the yaml' for every field of CONFIG_FIELDS on
    which the two LlavaConfigs disagree."""
    out = []
    for section, keys in CONFIG_FIELDS.items():
        a = getattr(hf_config, section) if section else hf_config
        b = getattr(model_config, section) if section else model_config
        for key in keys:
            x, y = getattr(a, key), getattr(b, key)
            same = math.isclose(x, y, rel_tol=1e-9) if isinstance(x, float) and isinstance(y, float) else x == y
            if not same:
                out.append(f"{section + '.' if section else ''}{key} is {x!r} in config.json, {y!r} in the yaml")
    return out
