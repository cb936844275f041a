"""The Hugging Face side: LlavaForConditionalGeneration (transformers + torch, float32, or --hf-dtype for the
7B) with the model, the tokenizer, the image processor and the prompt ids of the tests' oracle
(tests/oracle.py).

EOS is ignored (`min_new_tokens=max_new_tokens`) so that a request decodes exactly `new_tokens` tokens.
"""
import os
import time

from .harness import ids_digest, median, request_figures
from .system import rss_mb
from .workload import IMAGE, PROMPT


class HFSide:
    name = "hf"

    def __init__(self, args):
        t0 = time.perf_counter()
        # everything the side uses is imported here, so that import_s and the RSS after imports cover it
        import torch
        from PIL import Image  # noqa: F401
        from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LogitsProcessor  # noqa: F401
        import make_tiny_llava
        import oracle
        torch.set_num_threads(args.threads)
        self.torch, self.LogitsProcessor, self.pad_token_id = torch, LogitsProcessor, make_tiny_llava.PAD_TOKEN_ID
        self.import_s = time.perf_counter() - t0
        self.baseline_rss = rss_mb()
        t0 = time.perf_counter()
        dtype = getattr(args, "hf_dtype", None) or "float32"
        model = oracle.load_model(args.hf_dir, dtype)
        self.load_s = time.perf_counter() - t0
        hf = oracle.HFOracle(args.hf_dir, model=model)
        self.model = hf.model
        self.ids = torch.tensor([hf.ids(PROMPT)])
        self.mask = torch.ones_like(self.ids)
        self.pixels = hf.pixels(IMAGE).to(getattr(torch, dtype))
        self.n = args.new_tokens
        self.loaded_rss = rss_mb()

    def info(self):
        return {"import_s": self.import_s, "load_s": self.load_s, "baseline_rss_mb": self.baseline_rss,
                "loaded_rss_mb": self.loaded_rss, "prompt_tokens": int(self.ids.shape[1]),
                "ids_digest": ids_digest(self.ids[0].tolist()), "torch_threads": self.torch.get_num_threads(),
                "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                "affinity": sorted(os.sched_getaffinity(0))}

    def run(self):
        torch = self.torch
        stamps = []

        class Stamp(self.LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append((time.perf_counter(), time.process_time()))
                return scores

        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = self.model.generate(input_ids=self.ids, attention_mask=self.mask, pixel_values=self.pixels,
                                      do_sample=False, max_new_tokens=self.n, min_new_tokens=self.n,
                                      pad_token_id=self.pad_token_id, logits_processor=[Stamp()])
        t1 = time.perf_counter()
        return request_figures(t0, c0, t1, stamps, out[0, self.ids.shape[1]:].tolist())

    def profile(self, repeats):
        torch = self.torch
        m = self.model
        vision, prefill, decode = [], [], []
        with torch.inference_mode():
            for _ in range(repeats):
                t0 = time.perf_counter()
                m.get_image_features(pixel_values=self.pixels, vision_feature_layer=-2,
                                     vision_feature_select_strategy="default")
                vision.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                out = m(input_ids=self.ids, attention_mask=self.mask, pixel_values=self.pixels, use_cache=True,
                        logits_to_keep=1)
                prefill.append(time.perf_counter() - t0)
                pkv, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                mask = self.mask
                for _ in range(min(self.n - 1, 16)):
                    mask = torch.cat([mask, torch.ones_like(token)], 1)
                    t0 = time.perf_counter()
                    out = m(input_ids=token, attention_mask=mask, past_key_values=pkv, use_cache=True)
                    decode.append(time.perf_counter() - t0)
                    pkv, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return {"vision_s": median(vision), "prefill_incl_vision_s": median(prefill),
                "decode_call_ms": 1e3 * median(decode)}
