"""LlavaProcessor: CLIP pixels vs transformers' CLIPImageProcessor, prompt/ids vs transformers' LlavaProcessor,
and every bad image input (local files and a local http.server) ending in a LlavaError that names the input."""
import io
import time

import numpy as np
import pytest
from PIL import Image

from helpers import TOKENIZER_MODEL, ImageServer, free_port, png_bytes
from llava_config import LlavaConfig
from llava_errors import LlavaError
from llava_processor import (CLIP_MEAN, CLIP_STD, LlavaProcessor, build_prompt, clip_pixels, load_image)
from llava_tokenizer import LlavaTokenizer

TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   image_size=112, patch_size=14)
TINY_TEXT = dict(hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4, vocab_size=32064,
                 max_position_embedding=512)


def tiny_config(**kw):
    vision = dict(TINY_VISION, **kw.pop("vision", {}))
    kw.setdefault("max_new_tokens", 32)
    return LlavaConfig(vision_config=vision, text_config=dict(TINY_TEXT), seq_length=kw.pop("seq_length", 512),
                       **kw)


@pytest.fixture(scope="module")
def tok():
    return LlavaTokenizer(vocab_file=TOKENIZER_MODEL)


@pytest.fixture(scope="module")
def proc(tok):
    return LlavaProcessor(tiny_config(), tok)


@pytest.fixture(scope="module")
def hf_image_processors():
    from make_tiny_llava import make_hf_image_processor
    return {size: make_hf_image_processor(size) for size in (112, 336, 84)}


@pytest.fixture(scope="module")
def photos(image_paths):
    images = {name: load_image(path) for name, path in image_paths.items()}
    assert len(images) >= 4
    return images


def _hf_pixels(hf, images):
    return hf(images, return_tensors="np")["pixel_values"]


# ---------------------------------------------------------------------------------------------- pixels
def test_photos_differ_in_size(photos):
    assert len({im.size for im in photos.values()}) >= 3


@pytest.mark.parametrize("size", [112, 336])
def test_pixels_equal_hf_on_real_photos(photos, hf_image_processors, size):
    images = list(photos.values())
    ours = clip_pixels(images, size)
    theirs = _hf_pixels(hf_image_processors[size], images)
    assert ours.dtype == np.float32 and ours.shape == (len(images), 3, size, size)
    assert np.abs(ours - theirs).max() <= 1e-6


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("L", "JPEG"),
                                      ("CMYK", "JPEG"), ("I;16", "PNG"), ("1", "PNG"), ("RGB", "WEBP")])
def test_pixels_equal_hf_for_modes_read_from_files(photos, hf_image_processors, tmp_path, mode, fmt):
    """Each mode saved to a real file, read back by load_image, then both processors see the same image."""
    base = photos["chelsea"]
    if mode == "I;16":  # a real 16-bit grayscale PNG with values above 255
        img = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    elif mode == "RGBA":
        img = base.convert("RGBA")
        img.putalpha(Image.linear_gradient("L").resize(base.size))
    elif mode == "P":
        img = base.convert("P", palette=Image.ADAPTIVE, colors=64)
    else:
        img = base.convert(mode)
    path = tmp_path / f"image.{fmt.lower()}"
    img.save(path, fmt)
    loaded = load_image(str(path))
    assert loaded.mode == mode
    if mode == "I;16":
        assert np.asarray(loaded).max() > 255
    ours = clip_pixels([loaded], 112)
    assert np.abs(ours - _hf_pixels(hf_image_processors[112], [loaded])).max() <= 1e-6


@pytest.mark.parametrize("wh", [(1000, 20), (20, 1000), (337, 335), (113, 500), (7, 5), (112, 112), (111, 113)])
@pytest.mark.parametrize("size", [112, 84])
def test_pixels_equal_hf_for_odd_sizes_and_extreme_aspect_ratios(photos, hf_image_processors, wh, size):
    img = photos["astronaut"].resize(wh, Image.BILINEAR)
    ours = clip_pixels([img], size)
    theirs = _hf_pixels(hf_image_processors[size], [img])
    assert ours.shape == theirs.shape == (1, 3, size, size)
    assert np.abs(ours - theirs).max() <= 1e-6


def test_pad_mode_is_llava_expand2square(photos, hf_image_processors):
    """Hand computation of the original LLaVA rule: pad to a square with int(mean*255), image centred."""
    bg = np.array([int(x * 255) for x in CLIP_MEAN], dtype=np.uint8)
    assert bg.tolist() == [122, 116, 104]
    for img in (photos["rocket"], photos["astronaut"].resize((300, 121)), photos["coffee"].resize((90, 211))):
        arr = np.asarray(img.convert("RGB"))
        h, w = arr.shape[:2]
        side = max(h, w)
        square = np.empty((side, side, 3), dtype=np.uint8)
        square[:] = bg
        top, left = (side - h) // 2, (side - w) // 2
        square[top:top + h, left:left + w] = arr
        expected = _hf_pixels(hf_image_processors[112], [Image.fromarray(square)])
        ours = clip_pixels([img], 112, aspect_ratio="pad")
        assert np.abs(ours - expected).max() <= 1e-6
        if h != w:  # the padded band is exactly the normalised background colour
            corner = ours[0, :, 0, 0]  # top rows (wide image) or left columns (tall image) are padding
            want = (bg / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
            assert np.abs(corner - want).max() <= 1e-5
    square_img = photos["astronaut"]
    if square_img.width == square_img.height:
        assert np.array_equal(clip_pixels([square_img], 112, "pad"), clip_pixels([square_img], 112))


def test_processor_pad_option_and_bad_option(tok, photos):
    p = LlavaProcessor(tiny_config(), tok, image_aspect_ratio="pad")
    out = p.process([(photos["rocket"], "hi")])
    assert np.array_equal(out["pixel_values"], clip_pixels([photos["rocket"]], 112, aspect_ratio="pad"))
    with pytest.raises(LlavaError, match="image_aspect_ratio"):
        LlavaProcessor(tiny_config(), tok, image_aspect_ratio="square")


# ---------------------------------------------------------------------------------------------- prompts / ids
def test_prompt_template():
    assert build_prompt("Describe the image.", 1) == "USER: <image>\nDescribe the image. ASSISTANT:"
    assert build_prompt("<image>\nWhat is this?", 1) == "USER: <image>\nWhat is this? ASSISTANT:"
    assert build_prompt("Compare <image> and <image>.", 2) == "USER: Compare <image> and <image>. ASSISTANT:"
    assert build_prompt("Compare.", 2) == "USER: <image>\n<image>\nCompare. ASSISTANT:"
    assert build_prompt("Just text.", 0) == "USER: Just text. ASSISTANT:"


def test_sizes_come_from_the_config(tok, photos):
    for vision, tokens in ((dict(image_size=84, patch_size=12), 49), (dict(image_size=112, patch_size=14), 64)):
        cfg = tiny_config(vision=vision)
        p = LlavaProcessor(cfg, tok)
        assert (p.image_size, p.num_image_tokens) == (cfg.vision_config.image_size, cfg.num_image_tokens)
        out = p.process([(photos["chelsea"], "hi")])
        assert out["pixel_values"].shape == (1, 3, vision["image_size"], vision["image_size"])
        assert int((out["input_ids"] == cfg.image_token_index).sum()) == tokens


def test_batch_equals_hf_llava_processor(proc, tok, photos, hf_image_processors):
    """input_ids / attention_mask / pixel_values vs transformers' LlavaProcessor (llava-hf settings)."""
    from transformers import LlavaProcessor as HFLlavaProcessor
    from make_tiny_llava import make_hf_tokenizer
    hf = HFLlavaProcessor(image_processor=hf_image_processors[112], tokenizer=make_hf_tokenizer(TOKENIZER_MODEL),
                          patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    pairs = [(photos["astronaut"], "What is shown in this image?"),
             ([photos["chelsea"], photos["coffee"]], "Compare <image> with <image>, briefly."),
             (photos["rocket"], "<image>\n请用中文描述。")]
    texts = ["USER: <image>\nWhat is shown in this image? ASSISTANT:",
             "USER: Compare <image> with <image>, briefly. ASSISTANT:",
             "USER: <image>\n请用中文描述。 ASSISTANT:"]
    ours = proc.process(pairs)
    theirs = hf(images=[photos["astronaut"], photos["chelsea"], photos["coffee"], photos["rocket"]], text=texts,
                padding=True, return_tensors="np")
    assert ours["input_ids"].dtype == np.int32 and ours["attention_mask"].dtype == np.int32
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    assert ours["pixel_values"].dtype == np.float32
    assert np.abs(ours["pixel_values"] - theirs["pixel_values"]).max() <= 1e-6
    # left padding with the pad id; 64 image tokens per image
    assert ours["input_ids"][0, 0] == 32001 and ours["attention_mask"][0, 0] == 0
    assert [int((row == 32000).sum()) for row in ours["input_ids"]] == [64, 128, 64]


def test_image_count_must_match_tags(proc, photos):
    with pytest.raises(LlavaError, match=r"prompt 1 has 2 <image> tag\(s\) but 1 image\(s\)") as err:
        proc.process([(photos["rocket"], "hi"), (photos["rocket"], "<image> vs <image>")])
    assert "<image> vs <image>" in str(err.value)
    with pytest.raises(LlavaError, match=r"prompt 0 has 1 <image> tag\(s\) but 0 image\(s\)"):
        proc.process([(None, "<image> what?")])
    with pytest.raises(LlavaError, match=r"has 1 <image> tag\(s\) but 2 image\(s\)"):
        proc.process([([photos["rocket"], photos["coffee"]], "one <image> only")])


def test_text_only_prompt_has_no_image_tokens(proc):
    out = proc.process([(None, "Tell me a joke.")])
    assert out["pixel_values"].shape == (0, 3, 112, 112)
    assert 32000 not in out["input_ids"]


def test_budget_check_names_the_lengths(tok, photos):
    """The engine's budget rule on the processor's output: 64 image tokens + 13 text tokens = 77 (counted by
    hand from the template), + max_new_tokens against seq_length=120."""
    from engine import check_budget
    cfg = tiny_config(seq_length=120)
    p = LlavaProcessor(cfg, tok)
    ok = p.process([(photos["rocket"], "hi")])
    assert ok["input_ids"].shape[1] == 77
    check_budget(cfg, ok["input_ids"], ok["attention_mask"], 43)           # 77 + 43 = 120 fits exactly
    with pytest.raises(LlavaError, match=r"the prompt is 77 tokens .* = 167 > seq_length=120"):
        check_budget(cfg, ok["input_ids"], ok["attention_mask"], 90)
    long_prompt = "describe every detail " * 8
    batch = p.process([(photos["rocket"], "hi"), (photos["rocket"], long_prompt)])
    with pytest.raises(LlavaError) as err:
        check_budget(cfg, batch["input_ids"], batch["attention_mask"], 30)
    msg = str(err.value)
    assert "prompt 1 is" in msg and "64 of them image tokens" in msg and "max_new_tokens=30" in msg
    assert "seq_length=120" in msg
    check_budget(cfg, batch["input_ids"], batch["attention_mask"], 120 - batch["input_ids"].shape[1])


def test_mindformers_pipeline_query_list(proc, image_paths):
    one = [{"image": image_paths["chelsea"]}, {"text": "Describe the image in English:"}]
    out = proc(query_list=one)
    assert set(out) == set(proc.output_columns) == {"input_ids", "attention_mask", "pixel_values"}
    ref = proc.process([(image_paths["chelsea"], "Describe the image in English:")])
    for key in out:
        assert np.array_equal(out[key], ref[key])
    batch = proc(query_list=[one, [{"image": image_paths["rocket"]}, {"text": "What is it?"}]])
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
    with pytest.raises(LlavaError, match="unsupported entry"):
        proc(query_list=[{"video": "a.mp4"}, {"text": "x"}])
    texts = proc.post_process(np.array([[450, 6635, 338, 2], [319, 2, 32001, 32001]]))
    assert texts == ["The cat is", "A"]


def test_runs_inside_mindformers_multimodal_pipeline(proc, image_paths):
    """MultiModalToTextPipeline: preprocess = processor(query_list=item), forward = network.generate(**inputs),
    postprocess = processor.post_process(output_ids); run_mindformer's predict_data is [[{image}, {text}]]."""
    from mindspore import Model, nn
    from mindformers.pipeline.multi_modal_to_text_generation_pipeline import MultiModalToTextPipeline

    class StubNetwork(nn.Cell):
        def __init__(self):
            super().__init__()
            self.calls = []

        def construct(self, x):
            return x

        def generate(self, input_ids, attention_mask=None, pixel_values=None):
            self.calls.append((input_ids.shape, attention_mask.shape, pixel_values.shape))
            return [[450, 6635, 338, 2] for _ in range(input_ids.shape[0])]

    net = StubNetwork()
    pipe = MultiModalToTextPipeline(model=Model(net), processor=proc)
    query = [{"image": image_paths["chelsea"]}, {"text": "Describe the image in English:"}]
    assert pipe([query], top_k=1) == ["The cat is"]
    assert pipe([query, query], batch_size=2) == ["The cat is", "The cat is"]
    assert net.calls[0][2] == (1, 3, 112, 112) and net.calls[1][0][0] == 2 and net.calls[1][2][0] == 2


def test_built_by_mindformers_registry_from_yaml_mappings():
    """processor: {type: LlavaProcessor, config: <model.model_config>, tokenizer: {type: LlavaTokenizer, ...}}"""
    from mindformers.models.build_processor import build_processor
    model_config = {"type": "LlavaConfig", "seq_length": 512, "max_decode_length": 64,
                    "vision_config": {"type": "LlavaCLIPConfig", "arch": {"type": "LlavaVisionEncoder"},
                                      "model_config": dict(TINY_VISION, type="LlavaCLIPConfig")},
                    "text_config": {"type": "LlamaConfig", "model_config": dict(TINY_TEXT)}}
    p = build_processor({"type": "LlavaProcessor", "config": model_config, "image_aspect_ratio": "crop",
                         "tokenizer": {"type": "LlavaTokenizer", "vocab_file": TOKENIZER_MODEL,
                                       "add_bos_token": True, "add_eos_token": False}})
    assert isinstance(p, LlavaProcessor) and isinstance(p.tokenizer, LlavaTokenizer)
    assert (p.image_size, p.num_image_tokens) == (112, 64)
    with pytest.raises(LlavaError, match="unknown key"):
        LlavaProcessor(tiny_config(), p.tokenizer, max_length=2048)


# ---------------------------------------------------------------------------------------------- bad inputs
def _assert_names(err, name):
    msg = str(err.value)
    assert name in msg, msg
    assert "\n" not in msg


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, image_paths):
    d = tmp_path_factory.mktemp("bad")
    with open(image_paths["chelsea"], "rb") as f:
        jpeg = f.read()
    buf = io.BytesIO()
    Image.open(image_paths["coffee"]).save(buf, "PNG")
    png = buf.getvalue()
    files = {
        "empty": b"",
        "text": b"hello, I am not an image\n" * 20,
        "html": b"<!doctype html><html><body>404</body></html>",
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "truncated_png": png[: len(png) // 3],
        "bomb": png_bytes(100_000, 100_000),            # > 2x Pillow's limit: DecompressionBombError
        "bomb_warning": png_bytes(10_000, 10_000),      # between 1x and 2x: Pillow only warns
        "good": jpeg,
    }
    paths = {}
    for name, data in files.items():
        path = d / (name + (".png" if "png" in name or "bomb" in name else ".jpg"))
        path.write_bytes(data)
        paths[name] = str(path)
    (d / "a_directory.jpg").mkdir()
    paths["directory"] = str(d / "a_directory.jpg")
    paths["missing"] = str(d / "missing.jpg")
    return paths


@pytest.mark.parametrize("kind,problem", [
    ("missing", "no such file"), ("directory", "directory"), ("empty", "empty file"),
    ("text", "not an image"), ("html", "not an image"), ("truncated_jpeg", "truncated"),
    ("truncated_png", "truncated"), ("bomb", "pixels"), ("bomb_warning", "pixels"),
])
def test_bad_local_files(bad_files, kind, problem):
    with pytest.raises(LlavaError, match=problem) as err:
        load_image(bad_files[kind])
    _assert_names(err, bad_files[kind])


def test_explicit_pixel_cap_holds_when_pillows_guard_is_off(bad_files, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(LlavaError, match="decompression-bomb guard") as err:
        load_image(bad_files["bomb"])
    _assert_names(err, bad_files["bomb"])


def test_pixel_and_byte_caps(bad_files):
    with pytest.raises(LlavaError, match="more than the limit of 10000") as err:
        load_image(bad_files["good"], max_pixels=10_000)
    _assert_names(err, bad_files["good"])
    with pytest.raises(LlavaError, match="more than the limit of 1000 bytes") as err:
        load_image(bad_files["good"], max_bytes=1000)
    _assert_names(err, bad_files["good"])


@pytest.mark.parametrize("source", ["file:///etc/passwd", "ftp://example.com/a.jpg", "s3://bucket/a.jpg",
                                    "FILE:///x.jpg"])
def test_unsupported_schemes(source):
    with pytest.raises(LlavaError, match="unsupported scheme") as err:
        load_image(source)
    _assert_names(err, source)


def test_data_urls(bad_files):
    """RFC 2397 base64 data URLs decode to the same pixels as the file; other forms are refused by name."""
    import base64
    from PIL import Image
    with open(bad_files["good"], "rb") as f:
        raw = f.read()
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    assert np.array_equal(np.asarray(load_image(url)), np.asarray(Image.open(bad_files["good"])))
    assert np.array_equal(np.asarray(load_image(url, allow_paths=False)), np.asarray(load_image(url)))
    cases = [("data:image/png,abc", "base64"), ("data:text/html;base64,PGI+", "not an image type"),
             ("data:image/png;base64,@@@@", "not valid base64"),
             ("data:image/png;base64," + base64.b64encode(b"x" * 2000).decode(), "limit of 1000 bytes"),
             ("data:image/png;base64," + base64.b64encode(b"<html>").decode(), "not an image")]
    for source, needle in cases:
        with pytest.raises(LlavaError, match=needle):
            load_image(source, max_bytes=1000)
    with pytest.raises(LlavaError, match="not a URL"):
        load_image(bad_files["good"], allow_paths=False)


def test_bad_types_and_processor_errors(proc):
    with pytest.raises(LlavaError, match="expected a file path"):
        load_image(12345)
    with pytest.raises(LlavaError, match="no such file") as err:
        proc.process([("/no/such/dir/cat.jpg", "hi")])
    _assert_names(err, "/no/such/dir/cat.jpg")


# a local HTTP server (127.0.0.1, ephemeral port) serving the URL cases
@pytest.fixture(scope="module")
def server(image_paths):
    images = ImageServer(image_paths["chelsea"])
    yield images.url("")
    images.close()


def test_url_loads_the_same_pixels(server, image_paths):
    img = load_image(f"{server}/cat.jpg", timeout=5)
    assert np.array_equal(np.asarray(img), np.asarray(load_image(image_paths["chelsea"])))


@pytest.mark.parametrize("route,problem,kwargs", [
    ("/missing.jpg", "HTTP 404", {}),
    ("/error.jpg", "HTTP 500", {}),
    ("/page.jpg", "not an image", {}),
    ("/huge.jpg", "more than the limit", {"max_bytes": 1_000_000}),
    ("/endless.jpg", "more than the limit", {"max_bytes": 1_000_000}),
    ("/cat.jpg", "more than the limit of 1000 bytes", {"max_bytes": 1000}),
    ("/stall.jpg", "timed out", {"timeout": 0.5}),
    ("/trickle.jpg", "timed out", {"timeout": 0.5}),
    ("/to_file.jpg", "download failed", {}),
    ("/loop.jpg", "too many redirects", {}),
])
def test_bad_urls(server, route, problem, kwargs):
    url = server + route
    kwargs.setdefault("timeout", 5)
    start = time.monotonic()
    with pytest.raises(LlavaError, match=problem) as err:
        load_image(url, **kwargs)
    assert time.monotonic() - start < 2.5
    _assert_names(err, url)


def test_unreachable_url_is_a_llava_error():
    port = free_port()
    url = f"http://127.0.0.1:{port}/a.jpg"
    with pytest.raises(LlavaError, match="download failed") as err:
        load_image(url, timeout=2)
    _assert_names(err, url)
