"""The Hugging Face side of end-to-end comparisons: llava-hf tokenizer + CLIPImageProcessor + generate.

Only transformers/torch code runs here, so an expected value never comes from our own implementation. The
tests and the benchmark's HF side (benchmarks/hf.py) both build the HF model, tokenizer, image processor and
prompt ids here.
"""
import json
import os

import make_tiny_llava


def load_model(hf_dir):
    """LlavaForConditionalGeneration from an HF-layout folder, float32, in eval mode."""
    import torch
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()


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

    def ids(self, prompt):
        """`USER: <image>\\n{prompt} ASSISTANT:` with `<image>` expanded to the image-token count."""
        out = []
        for t in self.tokenizer(f"USER: <image>\n{prompt} ASSISTANT:")["input_ids"]:
            out.extend([t] * self.num_image_tokens if t == make_tiny_llava.IMAGE_TOKEN_INDEX else [t])
        return out

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
