"""LlavaProcessor: (image(s), prompt) pairs -> model inputs. Image loading with limits, CLIP pixels, prompt template.

* `load_image(source)` (from image_loading.py, which needs no MindSpore/MindFormers): a local path or an http(s) URL
  (a wall-clock time-out for the whole download and a byte cap), decoded by Pillow in the accepted photo formats
  only, with its decompression-bomb guard plus an explicit pixel cap, fully loaded so truncation is caught. Every
  failure is a `LlavaError` naming the input.
* `clip_pixels(images, image_size)`: exactly transformers' `CLIPImageProcessor` with llava-hf's settings
  (convert to RGB, shortest edge -> image_size with PIL bicubic, center crop, x/255, OpenAI CLIP mean/std),
  float32 [N, 3, S, S], numpy + Pillow only. `aspect_ratio="pad"` first pads to a square with the mean colour,
  as the original LLaVA-1.5 repository's `expand2square` does. The size of every intermediate image (the padded
  square, the resized image, whose long side grows with the aspect ratio) is computed first and refused above
  `max_pixels`.
* Prompt template `USER: <image>\\n{prompt} ASSISTANT:`; a prompt that already has `<image>` tags is used as
  `USER: {prompt} ASSISTANT:`. Each `<image>` becomes `num_image_tokens` copies of `image_token_index`.
* `LlavaProcessor.process(pairs)` -> `{"input_ids": int32 [B, L] (left-padded with the pad id),
  "attention_mask": int32 [B, L], "pixel_values": float32 [N_images, 3, S, S]}` (images in prompt order). Whether
  a prompt and its answer fit `seq_length` is the engine's rule (`engine.check_budget`), not the processor's.

Image size, image-token count and token ids all come from the model's LlavaConfig (never hard-coded here).
"""
from collections.abc import Mapping
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from image_loading import (  # noqa: F401  (load_image and its limits are re-exported)
    DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_TIMEOUT, display_name, load_image)
from llava_errors import LimitError, LlavaError
from mindformers_hooks import PLUGIN_DIR  # noqa: F401  (importing it installs the MindFormers hooks)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TAG = "<image>"
PROMPT_TEMPLATE = "USER: {prompt} ASSISTANT:"
ASPECT_RATIOS = ("crop", "pad")


# ---------------------------------------------------------------------------------------------- pixels
def to_rgb(img: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: PIL's own conversion (alpha dropped, palette expanded, 16-bit clipped)."""
    return img if img.mode == "RGB" else img.convert("RGB")


def expand2square(img: Image.Image, background: Tuple[int, ...]) -> Image.Image:
    """The original LLaVA repository's pad-to-square (image centred; the odd pixel goes below/right)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return result


def resize_output_size(width: int, height: int, shortest_edge: int) -> Tuple[int, int]:
    """(new_width, new_height): transformers' get_resize_output_image_size(default_to_square=False)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def intermediate_sizes(width: int, height: int, image_size: int, aspect_ratio: str = "crop") -> list:
    """[(what, (width, height))] of every image clip_pixels makes from a width x height one, in order: the
    RGB copy, the square padded with the mean colour ("pad"), the image resized so its short side is image_size
    (its long side grows with the aspect ratio: 1 x 400000 becomes 336 x 134400000)."""
    sizes = [("as RGB", (width, height))]
    if aspect_ratio == "pad" and width != height:
        side = max(width, height)
        sizes.append(("padded to a square", (side, side)))
        width = height = side
    sizes.append((f"resized to the short side {image_size}", resize_output_size(width, height, image_size)))
    return sizes


def check_intermediate_sizes(images: Sequence[Image.Image], image_size: int, aspect_ratio: str,
                             max_pixels: int, names: Optional[Sequence[Optional[str]]] = None):
    """LimitError, before any pixel is touched, if an image clip_pixels would make (intermediate_sizes) has more
    than max_pixels pixels: the decompression-bomb cap bounds every image the pipeline holds, not only the
    decoded one."""
    for i, img in enumerate(images):
        name = names[i] if names and names[i] else f"{i + 1} of {len(images)}"
        w0, h0 = img.size
        for what, (w, h) in intermediate_sizes(w0, h0, image_size, aspect_ratio):
            if w * h > max_pixels:
                raise LimitError(f"image {name}: {w0}x{h0} {what} would be {w}x{h} = {w * h} pixels, more than the "
                                 f"limit of {max_pixels} (processor.max_pixels)")


def clip_pixels(images: Sequence[Image.Image], image_size: int, aspect_ratio: str = "crop",
                mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                max_pixels: int = DEFAULT_MAX_PIXELS,
                names: Optional[Sequence[Optional[str]]] = None) -> np.ndarray:
    """float32 [N, 3, image_size, image_size], bit-for-bit what CLIPImageProcessor (slow) gives. Every
    intermediate image is checked against max_pixels first (check_intermediate_sizes); `names` name the images
    in that error (default: their position)."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise LlavaError(f"image_aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}, got {aspect_ratio!r}")
    check_intermediate_sizes(images, image_size, aspect_ratio, max_pixels, names)
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    background = tuple(int(x * 255) for x in mean)
    out = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)
    for i, img in enumerate(images):
        img = to_rgb(img)
        if aspect_ratio == "pad":
            img = expand2square(img, background)
        new_w, new_h = resize_output_size(img.width, img.height, image_size)
        img = img.resize((new_w, new_h), resample=Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
        top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
        arr = arr[top:top + image_size, left:left + image_size]
        # transformers: rescale in float64 then cast to float32; normalise in float32.
        x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - mean32) / std32
        out[i] = x.transpose(2, 0, 1)
    return out


# ---------------------------------------------------------------------------------------------- prompts
def build_prompt(prompt: str, num_images: int, template: bool = True) -> str:
    """`USER: <image>\\n{prompt} ASSISTANT:` (one `<image>\\n` per image when the prompt has no tag)."""
    if not isinstance(prompt, str):
        raise LlavaError(f"prompt must be a string, got {type(prompt).__name__}")
    if IMAGE_TAG not in prompt:
        prompt = IMAGE_TAG + "\n" + prompt if num_images == 1 else (IMAGE_TAG + "\n") * num_images + prompt
    return PROMPT_TEMPLATE.format(prompt=prompt) if template else prompt


def _as_config(config):
    if config is None:
        raise LlavaError("LlavaProcessor needs the model's config: pass config=<LlavaConfig>, or in the yaml give "
                         "the processor section `model_config: *model_config` (a YAML alias of model.model_config)")
    if isinstance(config, Mapping):
        from llava_config import LlavaConfig
        return LlavaConfig(**dict(config))
    for attr in ("vision_config", "text_config", "image_token_index", "seq_length"):
        if not hasattr(config, attr):
            raise LlavaError(f"LlavaProcessor: config {type(config).__name__} has no '{attr}' (not a LlavaConfig)")
    return config


def _as_tokenizer(tokenizer):
    if tokenizer is None:
        raise LlavaError("LlavaProcessor needs a tokenizer (processor.tokenizer in the yaml)")
    if isinstance(tokenizer, Mapping):
        from llava_tokenizer import LlavaTokenizer
        kwargs = {k: v for k, v in dict(tokenizer).items() if k not in ("type", "auto_register")}
        return LlavaTokenizer(**kwargs)
    return tokenizer


def _image_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class LlavaProcessor:
    """Tokenizer + image loading/CLIP preprocessing + prompt template for LLaVA-1.5.

    LlavaProcessor(config, tokenizer, image_aspect_ratio="crop", timeout=10.0, max_bytes=64 MiB,
                   max_pixels=89478485, apply_template=True, model_config=None)

    `config` is the model's LlavaConfig (or its yaml mapping); `tokenizer` a LlavaTokenizer (or its yaml mapping).
    MindFormers builds a processor from the yaml's `processor` section alone: there, `model_config:
    *model_config` (a YAML alias of `model.model_config: &model_config`) gives it the model's shapes without a
    second copy of them; an explicit `config` wins.
    """
    output_columns = ["input_ids", "attention_mask", "pixel_values"]

    def __init__(self, config=None, tokenizer=None, image_aspect_ratio: str = "crop",
                 timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS, apply_template: bool = True, model_config=None, **kwargs):
        kwargs.pop("type", None)
        kwargs.pop("auto_register", None)
        if kwargs:
            raise LlavaError(f"processor: unknown key(s) {', '.join(sorted(kwargs))}")
        self.config = _as_config(config if config is not None else model_config)
        self.tokenizer = _as_tokenizer(tokenizer)
        if image_aspect_ratio not in ASPECT_RATIOS:
            raise LlavaError(f"processor.image_aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}, "
                             f"got {image_aspect_ratio!r}")
        for key, value in (("timeout", timeout), ("max_bytes", max_bytes), ("max_pixels", max_pixels)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise LlavaError(f"processor.{key} must be a positive number, got {value!r}")
        self.image_aspect_ratio = image_aspect_ratio
        self.timeout, self.max_bytes, self.max_pixels = float(timeout), int(max_bytes), int(max_pixels)
        self.apply_template = bool(apply_template)
        # Single source of truth: the model config.
        self.image_size = int(self.config.vision_config.image_size)
        self.num_image_tokens = int(self.config.num_image_tokens)
        self.image_token_index = int(self.config.image_token_index)
        self.pad_token_id = int(self.config.text_config.pad_token_id)
        tok_image = self.tokenizer.convert_tokens_to_ids(IMAGE_TAG)
        if tok_image != self.image_token_index:
            raise LlavaError(f"tokenizer maps {IMAGE_TAG} to {tok_image} but model_config.image_token_index is "
                             f"{self.image_token_index}")

    # ----------------------------------------------------------------------------------------- pieces
    def load_image(self, source) -> Image.Image:
        return load_image(source, timeout=self.timeout, max_bytes=self.max_bytes, max_pixels=self.max_pixels)

    def preprocess_images(self, images: Sequence) -> np.ndarray:
        """Sources (paths, URLs, PIL images) -> float32 [N, 3, S, S], every intermediate image within
        max_pixels."""
        names = [display_name(s) if isinstance(s, str) else None for s in images]
        return self.pixels([self.load_image(s) for s in images], names)

    def pixels(self, images: Sequence[Image.Image], names: Optional[Sequence[Optional[str]]] = None) -> np.ndarray:
        """Decoded images -> float32 [N, 3, S, S] (clip_pixels with this processor's image_size, aspect ratio and
        max_pixels, which bounds every intermediate image); `names` name the images in its errors."""
        return clip_pixels(images, self.image_size, self.image_aspect_ratio, max_pixels=self.max_pixels, names=names)

    def build_prompt(self, prompt: str, num_images: int) -> str:
        return build_prompt(prompt, num_images, template=self.apply_template)

    def encode_prompt(self, prompt: str, num_images: int, index: int = 0) -> List[int]:
        """Ids of the templated prompt with every `<image>` expanded to num_image_tokens image-token ids."""
        ids = self.tokenizer(self.build_prompt(prompt, num_images))["input_ids"]
        return self.expand_images(ids, num_images, lambda tags: f"prompt {index} has {tags} {IMAGE_TAG} tag(s) but "
                            f"{num_images} image(s) were given for it: {display_name(prompt)}")

    def encode_chat(self, messages) -> List[int]:
        """Ids of a conversation rendered with llava-hf's chat template (chat_template.py), ready for the
        assistant's next turn, every `<image>` expanded. Image parts count in message order."""
        from chat_template import ChatTemplate
        if not hasattr(self, "_chat_template"):
            self._chat_template = ChatTemplate()
        text, num_images = self._chat_template.render(messages, add_generation_prompt=True)
        ids = self.tokenizer(text)["input_ids"]
        return self.expand_images(ids, num_images, lambda tags: f"the conversation has {num_images} image(s) but its "
                            f"text holds {tags} {IMAGE_TAG} tag(s): write no {IMAGE_TAG} in message texts")

    def expand_images(self, ids, num_images, problem) -> List[int]:
        """Every image tag -> num_image_tokens image-token ids; LlavaError(problem(tags)) unless the ids hold
        exactly one tag per image."""
        tags = sum(1 for t in ids if t == self.image_token_index)
        if tags != num_images:
            raise LlavaError(problem(tags))
        out = []
        for t in ids:
            out.extend([self.image_token_index] * self.num_image_tokens if t == self.image_token_index else [t])
        return out

    # ----------------------------------------------------------------------------------------- batches
    def process(self, pairs: Sequence) -> dict:
        """[(image or [images] or None, prompt), ...] -> input_ids / attention_mask / pixel_values (numpy)."""
        if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[1], str):
            pairs = [pairs]
        if not isinstance(pairs, (list, tuple)) or not pairs:
            raise LlavaError("processor: expected a non-empty list of (image(s), prompt) pairs")
        rows, sources = [], []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise LlavaError(f"processor: request {i} must be an (image(s), prompt) pair, got {display_name(pair)}")
            images, prompt = _image_list(pair[0]), pair[1]
            rows.append(self.encode_prompt(prompt, len(images), index=i))
            sources.extend(images)
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = r
            attention_mask[i, width - len(r):] = 1
        pixel_values = self.preprocess_images(sources)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    def __call__(self, query_list=None, history_list=None):
        """MindFormers' MultiModalToTextPipeline calls `processor(query_list=...)` with one request
        `[{"image": path}, {"text": prompt}]` or a batch of them; a list of (image(s), prompt) pairs works too."""
        if history_list:
            raise LlavaError("processor: chat history is not supported")
        return self.process(self.pairs_from_query_list(query_list))

    @staticmethod
    def pairs_from_query_list(query_list) -> list:
        """MindFormers' query format -> [(images, prompt)]. A query is a list of `{"image": ...}` / `{"text": ...}`
        entries; each run of images followed by texts is one request (texts joined by newlines), so the query
        MindFormers' run_mindformer.py builds from `--predict_data A.jpg P --modal_type image text` is one
        request and from `A.jpg P B.jpg Q --modal_type image text image text` two, as on this plugin's CLI."""
        if not isinstance(query_list, (list, tuple)) or not query_list:
            raise LlavaError("processor: expected a non-empty query list")
        if all(isinstance(q, (list, tuple)) and len(q) == 2 and isinstance(q[1], str) for q in query_list):
            return list(query_list)  # already (image(s), prompt) pairs
        if isinstance(query_list[0], Mapping):
            query_list = [query_list]
        pairs = []
        for i, query in enumerate(query_list):
            if not isinstance(query, (list, tuple)) or not all(isinstance(e, Mapping) for e in query):
                raise LlavaError(f"processor: request {i} must be a list of {{'image': ...}} / {{'text': ...}} "
                                 f"entries, got {display_name(query)}")
            images, texts = [], []
            for element in query:
                keys = set(element)
                if keys == {"image"}:
                    if texts:  # an image after a text starts the next request
                        pairs.append((images, "\n".join(texts)))
                        images, texts = [], []
                    images.append(element["image"])
                elif keys == {"text"}:
                    if not isinstance(element["text"], str):
                        raise LlavaError(f"processor: request {i} text must be a string, got "
                                         f"{type(element['text']).__name__}")
                    texts.append(element["text"])
                else:
                    raise LlavaError(f"processor: request {i} has an unsupported entry {sorted(keys)} "
                                     f"(only 'image' and 'text')")
            if images and not texts:
                raise LlavaError(f"processor: request {i} ends with an image that has no text after it")
            pairs.append((images, "\n".join(texts)))
        return pairs

    def post_process(self, output_ids, **kwargs) -> List[str]:
        """Generated ids (one row per request, prompt excluded) -> text, special tokens skipped."""
        kwargs.pop("skip_special_tokens", None)
        if kwargs:
            raise LlavaError(f"processor.post_process: unsupported argument(s) {', '.join(sorted(kwargs))}")
        return [self.tokenizer.decode(np.asarray(row).reshape(-1).tolist(), skip_special_tokens=True)
                for row in output_ids]

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
