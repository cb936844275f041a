"""The Hugging Face side of end-to-end comparisons: llava-hf tokenizer + CLIPImageProcessor + generate.

Only transformers/torch code runs here, so an expected value never comes from our own implementation. The
tests and the benchmark's HF side (benchmarks/hf.py) both build the HF model, tokenizer, image processor and
prompt ids here (prompt_ids); HFChat does the same for OpenAI-style conversations through llava-hf's chat
template.
"""
import json
import os

from helpers import PLUGIN, text_part  # first: it puts tests/fixtures on sys.path
import make_tiny_llava

TEMPLATE = os.path.join(PLUGIN, "chat_template.jinja")


def prompt_ids(tokenizer, num_image_tokens, prompt, n_images=1):
    """The HF tokenizer's ids of `USER: <image>\n...{prompt} ASSISTANT:` (n_images `<image>` lines), each
    `<image>` expanded to num_image_tokens copies."""
    body = "\n".join(["<image>"] * n_images) + "\n" + prompt
    out = []
    for t in tokenizer(f"USER: {body} ASSISTANT:")["input_ids"]:
        out.extend([t] * num_image_tokens if t == make_tiny_llava.IMAGE_TOKEN_INDEX else [t])
    return out


def load_model(hf_dir, dtype="float32"):
    """LlavaForConditionalGeneration from an HF-layout folder, in eval mode: float32 (the oracle), or the
    torch dtype named (the 7B benchmark's HF side, whose float32 weights would not fit in memory)."""
    import torch
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()


class HFOracle:
    def __init__(self, hf_dir, model=None):
        """`model`: the folder's model if the caller loaded it already (load_model), else it is loaded here."""
        with open(os.path.join(hf_dir, "config.json")) as f:
            self.config = json.load(f)
        self.model = load_model(hf_dir) if model is None else model
        self.tokenizer = make_tiny_llava.make_hf_tokenizer(make_tiny_llava.TOKENIZER_MODEL)
        vision = self.config["vision_config"]
        self.image_processor = make_tiny_llava.make_hf_image_processor(vision["image_size"])
        self.num_image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2

    def ids(self, prompt, n_images=1):
        """prompt_ids with this folder's tokenizer and image-token count."""
        return prompt_ids(self.tokenizer, self.num_image_tokens, prompt, n_images)

    def pixels(self, image_path):
        """CLIP pixel values [1, 3, H, W] (a torch tensor) of one image file."""
        from PIL import Image
        return self.image_processor(Image.open(image_path), return_tensors="pt")["pixel_values"]

    def generate(self, image_path, prompt, max_new_tokens):
        """Greedy new ids for one (image, prompt), cut after the first EOS, and their decoded text."""
        import torch
        pixels = self.pixels(image_path)
        ids = torch.tensor([self.ids(prompt)])
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                      do_sample=False, max_new_tokens=max_new_tokens,
                                      pad_token_id=make_tiny_llava.PAD_TOKEN_ID)
        new = out[0, ids.shape[1]:].tolist()
        eos = self.config["text_config"].get("eos_token_id", 2)
        if eos in new:
            new = new[:new.index(eos) + 1]
        return new, self.tokenizer.decode(new, skip_special_tokens=True)


class HFChat:
    """HF processor (llava-hf's chat template) + HF model: ids and greedy answers for OpenAI-style messages."""

    def __init__(self, hf_dir):
        from transformers import LlavaProcessor
        with open(os.path.join(hf_dir, "config.json")) as f:
            config = json.load(f)
        with open(TEMPLATE) as f:
            template = f.read()
        vision = config["vision_config"]
        self.processor = LlavaProcessor(
            image_processor=make_tiny_llava.make_hf_image_processor(vision["image_size"]),
            tokenizer=make_tiny_llava.make_hf_tokenizer(make_tiny_llava.TOKENIZER_MODEL), chat_template=template,
            patch_size=vision["patch_size"], vision_feature_select_strategy="default",
            num_additional_image_tokens=1)
        self.model = load_model(hf_dir)

    @staticmethod
    def hf_messages(messages):
        """OpenAI messages -> HF's conversation format (image parts as {"type": "image"}) and the image paths."""
        out, images = [], []
        for m in messages:
            content = m["content"]
            if isinstance(content, str):
                content = [text_part(content)]
            parts = []
            for p in content:
                if p["type"] == "image_url":
                    parts.append({"type": "image"})
                    images.append(p["image_url"]["url"])
                else:
                    parts.append(p)
            out.append({"role": m["role"], "content": parts})
        return out, images

    def inputs(self, messages, paths):
        from PIL import Image
        conversation, _ = self.hf_messages(messages)
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        images = [Image.open(p) for p in paths] or None
        return self.processor(images=images, text=text, return_tensors="pt")

    def answer(self, messages, paths, max_new_tokens):
        """(greedy new ids cut after the first EOS, their text) for the conversation."""
        import torch
        inputs = self.inputs(messages, paths)
        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                      pad_token_id=make_tiny_llava.PAD_TOKEN_ID)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        if 2 in new:
            new = new[:new.index(2) + 1]
        return new, self.processor.tokenizer.decode(new, skip_special_tokens=True)
