"""Hugging Face name <-> MindSpore parameter name, expected shape and tensor-parallel split rule of every weight.

This is the only module that knows the llava-hf checkpoint key names. Each row of `_TABLE` holds one weight
family: its Hugging Face name template, the MindSpore parameter name template (the model's cells mirror the
llava-hf legacy layout, so both are the same today), the tensor-parallel split rule, and the shape as a
function of `LlavaConfig`. The converter, the strict loader's error messages and checkpoint slicing read it.

Split rules (`SPLITS`):
  column      split the output dimension (dim 0) across ranks: q/k/v, gate/up projections
  row         split the input dimension (dim 1): o_proj, down_proj (followed by an all-reduce)
  vocab       split the vocabulary dimension (dim 0): embed_tokens, lm_head
  replicated  every rank holds the whole tensor: norms, the vision tower, the projector
"""
import math
import re

from llava_errors import LlavaError

SPLITS = {"column": 0, "row": 1, "vocab": 0, "replicated": None}

_V = "vision_tower.vision_model."
_T = "language_model.model."


def _vh(c):
    return c.vision_config.hidden_size


def _th(c):
    return c.text_config.hidden_size


def _kv(c):
    return c.text_config.n_kv_heads * c.text_config.head_dim


# (Hugging Face template, MindSpore template, split, shape(config)); "{i}" is a layer index.
_VISION_LAYER = "encoder.layers.{i}."
_TABLE = [
    (_V + "embeddings.class_embedding", "replicated", lambda c: (_vh(c),)),
    (_V + "embeddings.patch_embedding.weight", "replicated",
     lambda c: (_vh(c), c.vision_config.num_channels, c.vision_config.patch_size, c.vision_config.patch_size)),
    (_V + "embeddings.position_embedding.weight", "replicated",
     lambda c: (c.vision_config.num_patches + 1, _vh(c))),
    (_V + "pre_layrnorm.weight", "replicated", lambda c: (_vh(c),)),
    (_V + "pre_layrnorm.bias", "replicated", lambda c: (_vh(c),)),
] + [
    (_V + _VISION_LAYER + f"self_attn.{p}_proj.{w}", "replicated",
     (lambda c: (_vh(c), _vh(c))) if w == "weight" else (lambda c: (_vh(c),)))
    for p in ("q", "k", "v", "out") for w in ("weight", "bias")
] + [
    (_V + _VISION_LAYER + f"{n}.{w}", "replicated", lambda c: (_vh(c),))
    for n in ("layer_norm1", "layer_norm2") for w in ("weight", "bias")
] + [
    (_V + _VISION_LAYER + "mlp.fc1.weight", "replicated", lambda c: (c.vision_config.intermediate_size, _vh(c))),
    (_V + _VISION_LAYER + "mlp.fc1.bias", "replicated", lambda c: (c.vision_config.intermediate_size,)),
    (_V + _VISION_LAYER + "mlp.fc2.weight", "replicated", lambda c: (_vh(c), c.vision_config.intermediate_size)),
    (_V + _VISION_LAYER + "mlp.fc2.bias", "replicated", lambda c: (_vh(c),)),
    (_V + "post_layernorm.weight", "replicated", lambda c: (_vh(c),)),
    (_V + "post_layernorm.bias", "replicated", lambda c: (_vh(c),)),
    ("multi_modal_projector.linear_1.weight", "replicated", lambda c: (_th(c), _vh(c))),
    ("multi_modal_projector.linear_1.bias", "replicated", lambda c: (_th(c),)),
    ("multi_modal_projector.linear_2.weight", "replicated", lambda c: (_th(c), _th(c))),
    ("multi_modal_projector.linear_2.bias", "replicated", lambda c: (_th(c),)),
    (_T + "embed_tokens.weight", "vocab", lambda c: (c.text_config.vocab_size, _th(c))),
    (_T + "layers.{i}.self_attn.q_proj.weight", "column",
     lambda c: (c.text_config.num_heads * c.text_config.head_dim, _th(c))),
    (_T + "layers.{i}.self_attn.k_proj.weight", "column", lambda c: (_kv(c), _th(c))),
    (_T + "layers.{i}.self_attn.v_proj.weight", "column", lambda c: (_kv(c), _th(c))),
    (_T + "layers.{i}.self_attn.o_proj.weight", "row",
     lambda c: (_th(c), c.text_config.num_heads * c.text_config.head_dim)),
    (_T + "layers.{i}.mlp.gate_proj.weight", "column", lambda c: (c.text_config.intermediate_size, _th(c))),
    (_T + "layers.{i}.mlp.up_proj.weight", "column", lambda c: (c.text_config.intermediate_size, _th(c))),
    (_T + "layers.{i}.mlp.down_proj.weight", "row", lambda c: (_th(c), c.text_config.intermediate_size)),
    (_T + "layers.{i}.input_layernorm.weight", "replicated", lambda c: (_th(c),)),
    (_T + "layers.{i}.post_attention_layernorm.weight", "replicated", lambda c: (_th(c),)),
    (_T + "norm.weight", "replicated", lambda c: (_th(c),)),
    ("language_model.lm_head.weight", "vocab", lambda c: (c.text_config.vocab_size, _th(c))),
]
# The MindSpore parameter names mirror the llava-hf legacy names one to one (helper cells are named so).
# Should they ever diverge, change the second element here and nothing else.
_TABLE = [(hf, hf, split, shape) for hf, split, shape in _TABLE]

# Buffers that some transformers versions saved next to the weights; the model recomputes them, so the
# converter skips them instead of calling them unknown.
_IGNORED_HF = [
    re.compile(re.escape(_V + "embeddings.position_ids") + r"$"),
    re.compile(re.escape(_T) + r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
]


def _pattern(template):
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_HF_RULES = [(_pattern(hf), ms, split) for hf, ms, split, _ in _TABLE]
_MS_RULES = [(_pattern(ms), hf, split) for hf, ms, split, _ in _TABLE]


def _layers(template, config):
    if "{i}" not in template:
        return [None]
    if template.startswith(_V):
        return range(config.vision_config.num_hidden_layers)
    return range(config.text_config.num_layers)


def expected_params(config):
    """MindSpore parameter name -> (shape tuple, split rule) for `config` (a LlavaConfig), in model order."""
    out = {}
    for _, ms, split, shape in _TABLE:
        for i in _layers(ms, config):
            name = ms if i is None else ms.replace("{i}", str(i))
            out[name] = (tuple(int(d) for d in shape(config)), split)
    return out


def param_totals(config):
    """(number of weight tensors, number of values) of the model of `config`, from the table without listing
    the layers: constant time however large the config's layer counts and sizes are."""
    count = values = 0
    for _, ms, _, shape in _TABLE:
        n = len(_layers(ms, config))
        count += n
        values += n * math.prod(int(d) for d in shape(config))
    return count, values


def _lookup(rules, name):
    for pattern, target, split in rules:
        m = pattern.match(name)
        if m:
            return (target.replace("{i}", m.group(1)) if m.groups() else target), split
    return None


def is_ignored_hf(name):
    """True for buffers (position_ids, rotary inv_freq) that old checkpoints carry and the model recomputes."""
    return any(p.match(name) for p in _IGNORED_HF)


def hf_to_ms(name):
    """MindSpore parameter name for a Hugging Face weight name; LlavaError if the name is not a LLaVA weight."""
    hit = _lookup(_HF_RULES, name)
    if hit is None:
        raise LlavaError(f"unknown Hugging Face weight name {name!r}")
    return hit[0]


def _ms_rule(name):
    hit = _lookup(_MS_RULES, name)
    if hit is None:
        raise LlavaError(f"unknown LLaVA parameter name {name!r}")
    return hit


def ms_to_hf(name):
    """Hugging Face weight name for a MindSpore parameter name; LlavaError if unknown."""
    return _ms_rule(name)[0]


def split_rule(name):
    """The tensor-parallel split rule ("column", "row", "vocab", "replicated") of a MindSpore parameter."""
    return _ms_rule(name)[1]


def split_axis(name):
    """The dimension split across ranks for a MindSpore parameter, or None when it is replicated."""
    return SPLITS[split_rule(name)]


def check_parallel(config, world):
    """Raise LlavaError unless `config` can be split over `world` tensor-parallel ranks."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise LlavaError(f"tensor-parallel size must be a positive integer, got {world!r}")
    t = config.text_config
    problems = []
    for key, value in (("num_heads", t.num_heads), ("n_kv_heads", t.n_kv_heads),
                       ("intermediate_size", t.intermediate_size), ("vocab_size", t.vocab_size)):
        if value % world:
            problems.append(f"text_config.{key}={value} is not divisible by {world}")
    if world > t.n_kv_heads:
        problems.append(f"{world} ranks exceed text_config.n_kv_heads={t.n_kv_heads}")
    if problems:
        raise LlavaError(f"cannot split the model over {world} tensor-parallel ranks: " + "; ".join(problems))


def shard_index(name, shape, rank, world):
    """The index (a tuple of slices) of rank `rank`'s share (of `world`) of parameter `name`, whose full shape
    is `shape`, following its split rule; None when the rank holds the whole tensor."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise LlavaError(f"tensor-parallel size must be a positive integer, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise LlavaError(f"rank must be in 0..{world - 1}, got {rank!r}")
    axis = split_axis(name)
    if axis is None or world == 1:
        return None
    shape = tuple(shape)
    if len(shape) <= axis:
        raise LlavaError(f"{name}: cannot split dim {axis} of a tensor with shape {list(shape)}")
    size = shape[axis]
    if size % world:
        raise LlavaError(f"{name}: dim {axis} of shape {list(shape)} ({size}) is not divisible by "
                         f"{world} tensor-parallel ranks")
    part = size // world
    index = [slice(None)] * len(shape)
    index[axis] = slice(rank * part, (rank + 1) * part)
    return tuple(index)


def shard(name, array, rank, world):
    """Rank `rank`'s slice (of `world`) of parameter `name`'s full array, following its split rule.

    Replicated parameters come back whole. The result is a view when the input supports slicing views.
    """
    index = shard_index(name, array.shape, rank, world)
    return array if index is None else array[index]


def local_shape(name, config, world):
    """This rank's shape of parameter `name` (a name, or a template with "{i}" for the layer index) when
    `config` is split over `world` ranks: the table's shape divided along the split rule's dimension. The
    cells size their layers with it, so the split rules live in this table only."""
    if world > 1:
        check_parallel(config, world)           # whole heads per rank, not only divisible row counts
    for _, ms, split, shape in _TABLE:
        if ms == name or _pattern(ms).match(name):
            shape, axis = [int(d) for d in shape(config)], SPLITS[split]
            if axis is not None and world > 1:
                shape[axis] //= world
            return tuple(shape)
    raise LlavaError(f"unknown LLaVA parameter name {name!r}")


def full_shape(name, shape, world):
    """The complete shape of parameter `name` whose share on each of `world` ranks has shape `shape`."""
    axis = split_axis(name)
    shape = list(shape)
    if axis is not None and world > 1:
        shape[axis] *= world
    return tuple(shape)
