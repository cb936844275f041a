"""[B] LlavaModel against the Hugging Face oracle (LlavaForConditionalGeneration, same weights, float32, CPU).

Every expected value comes from transformers + torch on the fixture checkpoints. Pixels come from
transformers' CLIPImageProcessor and ids from the llava-hf tokenizer with `<image>` expanded to
num_image_tokens copies, so only the model differs between the two sides.

MindSpore's execution mode is process-global: the `mode` fixture switches it per test (PyNative = 1,
Graph = 0) and restores it afterwards. Models are built once per module and shared by both modes.
"""
import json
import os

import numpy as np
import pytest

import mindspore as ms

from llama_text import QUERY_BLOCK, query_blocks
from llava_config import LlavaConfig
from llava_errors import LlavaError
from llava_model import LlavaModel, load_weights
from helpers import ROOT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import make_tiny_llava  # noqa: E402  (test fixture builder, needs transformers)

PRESETS = ("tiny", "tiny_gqa")
SEQ_LENGTH = 320
REL_TOL = 1e-4
PROMPTS = {
    "astronaut": "Describe the image in English:",
    "chelsea": "What animal is this?",
    "coffee": "What is on the table? Answer briefly.",
    "rocket": "Where is this?",
}


# ----------------------------------------------------------------------------------------------- helpers
def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1.0))


def trim_at_eos(tokens, eos=2, pad=make_tiny_llava.PAD_TOKEN_ID):
    out = []
    for t in tokens:
        t = int(t)
        if t == pad and not out:
            continue
        out.append(t)
        if t == eos:
            break
    return out


class Side:
    """Everything for one preset: HF oracle, our model, tokenizer, image processor."""

    def __init__(self, hf_dir, seq_length=SEQ_LENGTH):
        import glob
        from safetensors.numpy import load_file
        from oracle import HFOracle
        with open(os.path.join(hf_dir, "config.json")) as f:
            self.hf_config = json.load(f)
        self.config = LlavaConfig.from_hf_config(self.hf_config, seq_length=seq_length)
        self.reference = HFOracle(hf_dir)
        self.hf = self.reference.model
        self.ms = LlavaModel(self.config)
        weights = {}
        for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):    # one file or shards
            weights.update(load_file(path))
        load_weights(self.ms, weights)
        self.engine = self.ms.engine()
        self.tokenizer = self.reference.tokenizer
        self.processor = self.reference.image_processor
        self.num_image_tokens = self.config.num_image_tokens
        self._oracle = {}

    def pixels(self, paths):
        from PIL import Image
        images = [Image.open(p) for p in paths]
        return self.processor(images, return_tensors="np")["pixel_values"].astype(np.float32)

    def ids(self, prompt_text, n_images=1):
        return self.reference.ids(prompt_text, n_images)

    def hf_generate(self, ids, pixels, mask=None, max_new_tokens=32):
        ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
        mask_t = torch.ones_like(ids_t) if mask is None else torch.tensor(np.asarray(mask), dtype=torch.long)
        with torch.no_grad():
            out = self.hf.generate(input_ids=ids_t, attention_mask=mask_t,
                                   pixel_values=torch.tensor(pixels), do_sample=False,
                                   max_new_tokens=max_new_tokens, output_logits=True,
                                   return_dict_in_generate=True, pad_token_id=make_tiny_llava.PAD_TOKEN_ID)
        new = out.sequences[:, ids_t.shape[1]:].numpy()
        logits = np.stack([s.float().numpy() for s in out.logits], 1)             # B, steps, V
        return new, logits

    def oracle(self, name, image_paths):
        """HF features, prompt logits, greedy tokens and per-step logits for one image + prompt (cached)."""
        if name not in self._oracle:
            pixels = self.pixels([image_paths[name]])
            ids = np.array([self.ids(PROMPTS[name])])
            with torch.no_grad():
                feats = self.hf.get_image_features(
                    pixel_values=torch.tensor(pixels), vision_feature_layer=-2,
                    vision_feature_select_strategy="default")
                feats = feats[0] if isinstance(feats, (list, tuple)) else feats
                prompt_logits = self.hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits
            new, step_logits = self.hf_generate(ids, pixels)
            self._oracle[name] = dict(pixels=pixels, ids=ids, features=feats.reshape(
                1, self.num_image_tokens, -1).numpy(), prompt_logits=prompt_logits.numpy(), tokens=new[0],
                step_logits=step_logits[0])
        return self._oracle[name]


@pytest.fixture(scope="module")
def sides(tiny_hf_dir, tiny_gqa_hf_dir):
    torch.set_num_threads(2)
    return {"tiny": Side(tiny_hf_dir), "tiny_gqa": Side(tiny_gqa_hf_dir)}


# ----------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("preset", PRESETS)
def test_parameter_names_and_shapes_are_the_hf_checkpoint_keys(preset, sides, tiny_hf_dir, tiny_gqa_hf_dir):
    from safetensors import safe_open
    hf_dir = tiny_hf_dir if preset == "tiny" else tiny_gqa_hf_dir
    with safe_open(os.path.join(hf_dir, "model.safetensors"), "np") as f:
        stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    model = sides[preset].ms
    ours = {n: list(p.shape) for n, p in model.weight_parameters().items()}
    assert ours == stored
    caches = sorted(p.name for p in model.get_parameters() if p.name not in ours)
    n_layers = model.config.text_config.num_layers
    assert caches == sorted(f"language_model.model.layers.{i}.self_attn.{c}" for i in range(n_layers)
                            for c in ("k_cache", "v_cache"))


def test_7b_config_builds_without_weights_and_matches_the_real_listing(real_7b_keys):
    from mindspore.nn.utils import no_init_parameters
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "llava_1_5_7b_keys.json")) as f:
        hf_config = json.load(f)["config"]
    config = LlavaConfig.from_hf_config(hf_config, seq_length=2048, compute_dtype="float16",
                                        param_init_type="float16")
    with no_init_parameters():
        model = LlavaModel(config)
    params = model.weight_parameters()
    assert {n: list(p.shape) for n, p in params.items()} == real_7b_keys
    assert all(p.has_init for p in model.get_parameters())          # nothing was allocated
    cache = model.language_model.model.layers[31].self_attn.k_cache
    assert cache.name == "language_model.model.layers.31.self_attn.k_cache"
    # a placeholder of one block of one position until the engine installs its KV pool
    assert list(cache.shape) == [1 * 32 * 1, 128] and cache.dtype == ms.float16       # [blocks*kv*size, head_dim]


def test_load_weights_is_strict(pynative_mode, sides):
    model = sides["tiny"].ms
    good = {n: p for n, p in model.weight_parameters().items()}
    missing = {n: p for n, p in good.items() if "layers.1." not in n}
    with pytest.raises(LlavaError, match=r"missing: .*language_model\.model\.layers\.1\.") as info:
        load_weights(model, missing)
    assert "more)" in str(info.value)                              # long lists are truncated
    with pytest.raises(LlavaError, match=r"1 unknown: language_model\.model\.extra\.weight"):
        load_weights(model, dict(good, **{"language_model.model.extra.weight": np.zeros(3, np.float32)}))
    wrong = dict(good)
    wrong["multi_modal_projector.linear_1.bias"] = np.zeros(5, np.float32)
    with pytest.raises(LlavaError, match=r"multi_modal_projector\.linear_1\.bias \[5\] \(expected \[64\]\)"):
        load_weights(model, wrong)
    # cache entries (e.g. from mindspore.save_checkpoint of a live model) are ignored, weights reload intact
    before = model.language_model.lm_head.weight.asnumpy().copy()
    tensors = {n: ms.Tensor(p.asnumpy()) for n, p in good.items()}
    tensors["language_model.model.layers.0.self_attn.k_cache"] = np.zeros(1, np.float32)
    load_weights(model, tensors)
    np.testing.assert_array_equal(model.language_model.lm_head.weight.asnumpy(), before)


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("preset", PRESETS)
def test_image_features_prompt_logits_and_32_decode_steps_match_hf(preset, mode, sides, image_paths):
    side = sides[preset]
    ref = side.oracle("chelsea", image_paths)
    model, engine = side.ms, side.engine

    feats = model.get_image_features(ref["pixels"]).asnumpy()
    assert rel_err(feats, ref["features"]) <= REL_TOL

    logits = engine.prefill(ref["ids"], ref["pixels"], return_all_logits=True)
    assert rel_err(logits, ref["prompt_logits"]) <= REL_TOL
    assert rel_err(logits[:, -1], ref["step_logits"][None, 0]) <= REL_TOL
    tokens = ref["tokens"]
    assert len(tokens) == 32 and 2 not in tokens[:31].tolist()      # the oracle really decodes 32 steps
    for i in range(1, 32):                                          # teacher-forced with HF's greedy tokens
        step = engine.decode(tokens[i - 1:i])
        assert rel_err(step, ref["step_logits"][None, i]) <= REL_TOL, f"decode step {i}"


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_32_tokens_equal_hf_generate_on_three_images(preset, graph_mode, sides, image_paths):
    side = sides[preset]
    for name in ("astronaut", "coffee", "rocket"):
        ref = side.oracle(name, image_paths)
        out = side.ms.generate(ref["ids"], ref["pixels"], max_new_tokens=32)
        assert out == [trim_at_eos(ref["tokens"])], name


def test_jit_steps_in_pynative_give_the_same_logits(pynative_mode, sides, image_paths):
    side = sides["tiny"]
    ref = side.oracle("coffee", image_paths)
    engine = side.engine
    engine.jit_steps = True
    try:
        logits = engine.prefill(ref["ids"], ref["pixels"])
        steps = [logits]
        for i in range(1, 8):
            steps.append(engine.decode(ref["tokens"][i - 1:i]))
    finally:
        engine.jit_steps = False
    assert rel_err(np.concatenate(steps), ref["step_logits"][:8]) <= REL_TOL


def test_kv_cache_decoding_equals_recomputing_the_full_sequence(mode, sides, image_paths):
    side = sides["tiny_gqa"]
    ref = side.oracle("rocket", image_paths)
    engine = side.engine
    ids = ref["ids"]
    logits = engine.prefill(ids, ref["pixels"])
    cached, generated = [logits], []
    for _ in range(16):
        token = cached[-1].argmax(-1)
        generated.append(int(token[0]))
        cached.append(engine.decode(token))
    full = np.concatenate([ids, np.array([generated])], 1)
    recomputed = engine.forward(full, ref["pixels"])                 # no cache at all
    length = ids.shape[1]
    assert rel_err(np.concatenate(cached), recomputed[0, length - 1:]) <= REL_TOL


def test_use_past_false_recomputes_and_gives_the_same_tokens(pynative_mode, sides, image_paths):
    side = sides["tiny"]
    ref = side.oracle("astronaut", image_paths)
    side.ms.config.use_past = False
    try:
        out = side.ms.generate(ref["ids"], ref["pixels"], max_new_tokens=6)
    finally:
        side.ms.config.use_past = True
    assert out == [trim_at_eos(ref["tokens"])[:6]]


def test_sampling_is_seeded(graph_mode, sides, image_paths):
    side = sides["tiny"]
    ref = side.oracle("rocket", image_paths)
    runs = [side.ms.generate(ref["ids"], ref["pixels"], max_new_tokens=12, do_sample=True, top_k=20,
                             temperature=1.5, seed=seed) for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert len(runs[0][0]) == 12 or runs[0][0][-1] == 2


def _left_pad(rows, pad=make_tiny_llava.PAD_TOKEN_ID):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("preset", PRESETS)
def test_left_padded_batch_equals_each_prompt_alone_and_hf(preset, graph_mode, sides, image_paths):
    side = sides[preset]
    names = ("astronaut", "chelsea")
    prompts = [side.ids(PROMPTS["astronaut"]), side.ids("Is there a cat in this picture? Answer yes or no.")]
    assert len(prompts[0]) != len(prompts[1])
    pixels = side.pixels([image_paths[n] for n in names])
    ids, mask = _left_pad(prompts)
    batched = side.ms.generate(ids, pixels, attention_mask=mask, max_new_tokens=32)
    alone = [side.ms.generate(np.array([p]), pixels[i:i + 1], max_new_tokens=32)[0]
             for i, p in enumerate(prompts)]
    assert batched == alone
    hf_new, hf_logits = side.hf_generate(ids, pixels, mask)
    assert batched == [trim_at_eos(row) for row in hf_new]
    # mask derived from the pad id when none is given
    assert side.ms.generate(ids, pixels, max_new_tokens=4) == [row[:4] for row in batched]
    # prompt logits of the real positions match HF's batched forward
    logits = side.engine.prefill(ids, pixels, attention_mask=mask)
    assert rel_err(logits, hf_logits[:, 0]) <= REL_TOL


def test_query_blocks_split_prompts_causally():
    """Hand-computed: a prompt step of l queries is cut into ceil(l / QUERY_BLOCK) nearly equal blocks,
    block [s, e) attending to keys [0, e); decode steps and short prompts are one block."""
    assert QUERY_BLOCK == 128
    assert query_blocks(1, 2048) == ((0, 1, 2048),)
    assert query_blocks(128, 128) == ((0, 128, 128),)
    assert query_blocks(129, 129) == ((0, 64, 64), (64, 129, 129))
    assert query_blocks(300, 300) == ((0, 100, 100), (100, 200, 200), (200, 300, 300))
    assert query_blocks(595, 595) == ((0, 119, 119), (119, 238, 238), (238, 357, 357), (357, 476, 476),
                                      (476, 595, 595))


@pytest.mark.parametrize("preset", PRESETS)
def test_long_left_padded_prompts_in_query_blocks_match_hf(preset, mode, sides, image_paths):
    """Prompts longer than QUERY_BLOCK attend block by block; a left-padded batch of two such prompts
    gives HF's logits at every real position (and at the last one when only that is computed in the last
    layer), then HF's greedy tokens."""
    side = sides[preset]
    story = " ".join(["The cat sat on the warm mat and watched the birds in the garden."] * 14)
    prompts = [side.ids(story + " What happened?"), side.ids(story + " Why did the cat stay inside all day?")]
    ids, mask = _left_pad(prompts)
    pixels = side.pixels([image_paths["chelsea"], image_paths["coffee"]])
    assert len(query_blocks(ids.shape[1], ids.shape[1])) == 3 and len(prompts[0]) != len(prompts[1])
    with torch.no_grad():
        hf_logits = side.hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            pixel_values=torch.tensor(pixels)).logits.numpy()
    logits = side.engine.prefill(ids, pixels, attention_mask=mask, return_all_logits=True, reserve=8)
    real = mask.astype(bool)
    assert rel_err(logits[real], hf_logits[real]) <= REL_TOL
    # the usual prefill: the last layer computes the last position of each row only
    last = side.engine.prefill(ids, pixels, attention_mask=mask, reserve=8)
    assert last.shape == (2, hf_logits.shape[-1]) and rel_err(last, hf_logits[:, -1]) <= REL_TOL
    hf_new, _ = side.hf_generate(ids, pixels, mask, max_new_tokens=8)
    assert side.ms.generate(ids, pixels, attention_mask=mask, max_new_tokens=8) == \
        [trim_at_eos(row) for row in hf_new]


def test_two_images_in_one_prompt_match_hf(graph_mode, sides, image_paths):
    side = sides["tiny"]
    pixels = side.pixels([image_paths["chelsea"], image_paths["coffee"]])
    ids = np.array([side.ids("What differs between these two images?", n_images=2)])
    assert (ids == 32000).sum() == 2 * side.num_image_tokens
    with torch.no_grad():
        hf_logits = side.hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    logits = side.engine.prefill(ids, pixels, return_all_logits=True)
    assert rel_err(logits, hf_logits) <= REL_TOL
    hf_new, _ = side.hf_generate(ids, pixels)
    assert side.ms.generate(ids, pixels, max_new_tokens=32) == [trim_at_eos(hf_new[0])]


def test_text_only_prompt_matches_hf(graph_mode, sides):
    side = sides["tiny"]
    ids = np.array([side.tokenizer("USER: Tell me a story. ASSISTANT:")["input_ids"]])
    with torch.no_grad():
        out = side.hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                               do_sample=False, max_new_tokens=16, pad_token_id=make_tiny_llava.PAD_TOKEN_ID)
    assert side.ms.generate(ids, max_new_tokens=16) == [trim_at_eos(out[0, ids.shape[1]:].numpy())]


# ----------------------------------------------------------------------------------------------- generate API
class RecordingStreamer:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, tokens):
        self.puts.append(np.asarray(tokens).tolist())

    def end(self):
        self.ended += 1


def test_streamer_gets_every_step_and_eos_finishes_a_row(graph_mode, sides, image_paths):
    side = sides["tiny"]
    ref = side.oracle("chelsea", image_paths)
    # make the 3rd greedy token an EOS by declaring it the end-of-sequence id
    eos = int(ref["tokens"][2])
    streamer = RecordingStreamer()
    out = side.ms.generate(ref["ids"], ref["pixels"], streamer=streamer, max_new_tokens=32, eos_token_id=eos)
    first = ref["tokens"].tolist().index(eos)
    assert out == [ref["tokens"][:first + 1].tolist()]
    assert streamer.puts == [[t] for t in out[0]] and streamer.ended == 1


def test_finished_rows_are_padded_while_others_continue(graph_mode, sides, image_paths):
    side = sides["tiny"]
    prompts = [side.ids(PROMPTS["astronaut"]), side.ids(PROMPTS["rocket"])]
    pixels = side.pixels([image_paths["astronaut"], image_paths["rocket"]])
    ids, mask = _left_pad(prompts)
    free = side.ms.generate(ids, pixels, attention_mask=mask, max_new_tokens=12)
    eos = next(t for t in free[0][1:] if t not in free[1])       # row 0 stops early, row 1 never does
    streamer = RecordingStreamer()
    out = side.ms.generate(ids, pixels, attention_mask=mask, streamer=streamer, max_new_tokens=12, eos_token_id=eos)
    assert out[0] == free[0][:free[0].index(eos) + 1] and out[1] == free[1]
    assert len(streamer.puts) == 12
    assert all(step[0] == make_tiny_llava.PAD_TOKEN_ID for step in streamer.puts[len(out[0]):])


def test_bad_inputs_raise_llava_error(pynative_mode, sides, image_paths):
    side = sides["tiny"]
    model = side.ms
    ref = side.oracle("chelsea", image_paths)
    ids, pixels = ref["ids"], ref["pixels"]
    one_short = np.delete(ids, int(np.argmax(ids[0] == make_tiny_llava.IMAGE_TOKEN_INDEX)), axis=1)
    with pytest.raises(LlavaError, match="63 image tokens"):
        model.generate(one_short, pixels, max_new_tokens=2)
    with pytest.raises(LlavaError, match="image tokens"):
        model.generate(ids, np.concatenate([pixels, pixels]), max_new_tokens=2)
    with pytest.raises(LlavaError, match="image tokens"):
        model.generate(ids, None, max_new_tokens=2)
    with pytest.raises(LlavaError, match="seq_length"):
        model.generate(ids, pixels, max_new_tokens=SEQ_LENGTH)
    too_long = np.concatenate([ids, np.ones((1, SEQ_LENGTH), np.int64)], 1)
    with pytest.raises(LlavaError, match="seq_length"):
        model.generate(too_long, pixels, max_new_tokens=1)
    right_padded = np.concatenate([ids, [[make_tiny_llava.PAD_TOKEN_ID]]], 1)
    with pytest.raises(LlavaError, match="left-padded"):
        model.generate(right_padded, pixels, max_new_tokens=2)
    with pytest.raises(LlavaError, match="pixel_values"):
        model.generate(ids, pixels[:, :, :50], max_new_tokens=2)
    with pytest.raises(LlavaError, match="vocabulary"):
        model.generate(np.array([[1, 40000]]), max_new_tokens=2)


def test_float16_compute_runs_close_to_float32(pynative_mode, sides, tiny_hf_dir, image_paths):
    """Dtype plumbing (fp16 params, compute and KV cache); float32 is what parity is proven with."""
    from safetensors.numpy import load_file
    side = sides["tiny"]
    config = LlavaConfig.from_hf_config(side.hf_config, seq_length=SEQ_LENGTH, compute_dtype="float16",
                                        param_init_type="float16")
    model = LlavaModel(config)
    load_weights(model, load_file(os.path.join(tiny_hf_dir, "model.safetensors")))
    assert model.language_model.lm_head.weight.dtype == ms.float16
    assert model.language_model.model.layers[0].self_attn.k_cache.dtype == ms.float16
    ref = side.oracle("chelsea", image_paths)
    engine = model.engine()
    logits = engine.prefill(ref["ids"], ref["pixels"])
    assert logits.dtype == np.float32
    assert rel_err(logits, ref["step_logits"][:1]) <= 1e-2
    assert rel_err(engine.decode(ref["tokens"][:1]), ref["step_logits"][1:2]) <= 1e-2


@pytest.mark.slow
def test_mid_preset_336px_576_image_tokens_matches_hf(graph_mode, mid_hf_dir, image_paths):
    """The real image geometry (336 px, 576 image tokens) and an 8-layer, 1024-wide decoder."""
    side = Side(mid_hf_dir, seq_length=1024)
    assert side.num_image_tokens == 576
    ref = side.oracle("chelsea", image_paths)
    assert rel_err(side.ms.get_image_features(ref["pixels"]).asnumpy(), ref["features"]) <= REL_TOL
    engine = side.engine
    logits = engine.prefill(ref["ids"], ref["pixels"], return_all_logits=True)
    assert rel_err(logits, ref["prompt_logits"]) <= REL_TOL
    for i in range(1, 32):
        assert rel_err(engine.decode(ref["tokens"][i - 1:i]), ref["step_logits"][None, i]) <= REL_TOL
    assert side.ms.generate(ref["ids"], ref["pixels"], max_new_tokens=32) == [trim_at_eos(ref["tokens"])]


@pytest.mark.parametrize("name", ["predict_llava1_5_7b.yaml", "predict_llava1_5_7b_cpu.yaml"])
def test_7b_yamls_describe_llava_hf_s_model(name, real_7b_keys):
    """Both 7B yamls (Ascend float16; CPU with int8 linear layers) build, without weights, the model whose weight
    names and shapes are llava-1.5-7b-hf's own listing."""
    import file_checks
    from mindspore.nn.utils import no_init_parameters
    data = file_checks.load_yaml(os.path.join(ROOT, "research", "llava", "llava1_5_7B", name))
    config = LlavaConfig(**data["model"]["model_config"])
    with no_init_parameters():
        model = LlavaModel(config)
    weights = model.weight_parameters()
    assert {n: list(p.shape) for n, p in weights.items()} == real_7b_keys
    if name.endswith("_cpu.yaml"):
        assert data["context"]["device_target"] == "CPU" and config.weight_dtype == "int8"
        assert weights["language_model.model.layers.0.mlp.down_proj.weight"].dtype == ms.int8
        assert weights["language_model.model.embed_tokens.weight"].dtype == ms.float32


def test_the_7b_cpu_yaml_serves_with_the_default_max_batch_on_a_24_gib_machine():
    """One KV pool for --max_batch 8 (the default): 8 rows x seq_length 1024 x 32 layers x (keys, values) x 4096
    float32 = 8 GiB; with the int8 weights the run fits what a 24 GiB machine has free (the old cache per batch
    size, 1 + 2 + 4 + 8 rows, asked ~26 GiB)."""
    import file_checks
    import memory_budget
    data = file_checks.load_yaml(os.path.join(ROOT, "research", "llava", "llava1_5_7B", "predict_llava1_5_7b_cpu.yaml"))
    config = LlavaConfig(**data["model"]["model_config"])
    est = memory_budget.estimate(config, batch=8)
    assert config.seq_length == 1024
    assert est.kv_cache == 8 * 1024 * 32 * 2 * 4096 * 4 == 8 * 2 ** 30
    assert est.total < 20 * 2 ** 30
    memory_budget.check(config, batch=8, available=(22 * 2 ** 30, "a 24 GiB machine (test)"))
