"""Our side: LlavaModel (MindSpore, Graph mode, float32 compute; the linear layers' storage is --weight-dtype)
loaded from the HF-layout folder, run through the engine's public API (`LlavaModel.engine()`).

EOS is ignored (`eos_token_id=[-1]`) so that a request decodes exactly `new_tokens` tokens, as HF's
`min_new_tokens` does on the other side.
"""
import json
import os
import time

from .harness import ids_digest, median, request_figures
from .system import rss_mb
from .workload import IMAGE, PROMPT, TOKENIZER_MODEL


class OursSide:
    name = "ours"

    def __init__(self, args):
        t0 = time.perf_counter()
        import numpy as np
        import mindspore as ms
        ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
        ms.device_context.cpu.op_tuning.threads_num(args.threads)
        from generation import GenerationSettings
        from llava_config import LlavaConfig
        from llava_model import LlavaModel
        from parallel import TensorParallel
        import weights
        from llava_processor import LlavaProcessor
        from llava_tokenizer import LlavaTokenizer
        self.np, self.ms = np, ms
        self.import_s = time.perf_counter() - t0
        self.baseline_rss = rss_mb()
        t0 = time.perf_counter()
        with open(os.path.join(args.hf_dir, "config.json")) as f:
            hf_cfg = json.load(f)
        overrides = {"seq_length": args.seq_length} if args.seq_length else {}
        if getattr(args, "weight_dtype", None):
            overrides["weight_dtype"] = args.weight_dtype
        self.config = LlavaConfig.from_hf_config(hf_cfg, **overrides)
        with ms.nn.utils.no_init_parameters():
            self.model = LlavaModel(self.config)
        single = TensorParallel()                                          # the HF folder itself, lazily
        weights.load_into(self.model, weights.rank_checkpoint(args.hf_dir, single, self.config), single)
        self.load_s = time.perf_counter() - t0
        tokenizer = LlavaTokenizer(vocab_file=TOKENIZER_MODEL)
        processor = LlavaProcessor(self.config, tokenizer)
        self.processor = processor
        inputs = processor.process([(IMAGE, PROMPT)])
        self.ids, self.mask, self.pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
        self.n = args.new_tokens
        self.engine = self.model.engine()
        # every request here is measured cold: the same prompt again must not come from the caches
        self.engine.configure_caches(prefix=False, image_bytes=0)
        # exactly n tokens: no eos id can stop a row
        self.settings = GenerationSettings.from_config(self.config, max_new_tokens=self.n, eos_token_id=[-1])
        self.threads = args.threads
        self.loaded_rss = rss_mb()

    def info(self):
        return {"import_s": self.import_s, "load_s": self.load_s, "baseline_rss_mb": self.baseline_rss,
                "loaded_rss_mb": self.loaded_rss, "prompt_tokens": int(self.ids.shape[1]),
                "ids_digest": ids_digest(self.ids[0]), "seq_length": self.config.seq_length,
                "threads_num": self.threads, "affinity": sorted(os.sched_getaffinity(0)),
                "weight_dtype": self.config.weight_dtype,
                # KV positions the middle decode step attends over
                "decode_positions": int(self.ids.shape[1]) + self.n // 2}

    def run(self):
        return self._request(self.ids, self.mask)

    def _request(self, ids, mask):
        """One generate over ids (the image's pixels) with a (wall, CPU) stamp per token -> its figures."""
        stamps = []

        class Stamp:
            def put(self, tokens):
                stamps.append((time.perf_counter(), time.process_time()))

            def end(self):
                pass

        t0, c0 = time.perf_counter(), time.process_time()
        out = self.engine.generate(ids, self.pixels, mask, settings=self.settings, streamer=Stamp())
        t1 = time.perf_counter()
        return request_figures(t0, c0, t1, stamps, out[0])

    def turns(self, follow_up="Why do you think so?"):
        """A chat's two turns with the caches on, as `--run_mode chat` runs them: the first turn (image +
        PROMPT, rendered by the chat template) and its follow-up (the first turn, its answer and a new
        question); each turn's figures and the prompt tokens the follow-up took from the prefix cache."""
        from engine import IMAGE_CACHE_BYTES
        engine = self.engine
        engine.configure_caches(prefix=True, image_bytes=IMAGE_CACHE_BYTES)
        try:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
            first = self._turn(messages)
            answer = self.processor.tokenizer.decode(first["tokens"], skip_special_tokens=True)
            messages += [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                         {"role": "user", "content": [{"type": "text", "text": follow_up}]}]
            before = engine.cache_stats()["prefix_cached_tokens"]
            second = self._turn(messages)
            second["cached_tokens"] = engine.cache_stats()["prefix_cached_tokens"] - before
            return {"first": first, "follow_up": second, "kv_bytes_per_token": self.kv_bytes_per_token()}
        finally:
            engine.configure_caches(prefix=False, image_bytes=0)

    def _turn(self, messages):
        ids = self.np.array([self.processor.encode_chat(messages)], self.np.int64)
        figures = self._request(ids, None)
        figures["prompt_tokens"] = int(ids.shape[1])
        return figures

    def kv_bytes_per_token(self):
        """Bytes of KV one cached token holds (every layer's keys and values in the pool's dtype)."""
        return self.engine.pool_bytes(1) // self.engine.block_size

    def vision(self, repeats):
        """Seconds of the vision tower (CLIP + projector) alone, best of `repeats`."""
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.engine.image_features(self.pixels).asnumpy()
            times.append(time.perf_counter() - t0)
        return min(times)

    def profile(self, repeats):
        np = self.np
        engine = self.engine
        vision, prefill, decode, step_only = [], [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.image_features(self.pixels).asnumpy()
            vision.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            logits = engine.prefill(self.ids, self.pixels, self.mask, reserve=self.n)
            prefill.append(time.perf_counter() - t0)
            token = np.argmax(logits, -1)
            for _ in range(min(self.n - 1, 16)):
                t0 = time.perf_counter()
                logits = engine.decode(token)
                decode.append(time.perf_counter() - t0)
                token = np.argmax(logits, -1)
            # the compiled step alone (inputs prepared beforehand; includes the logits' asnumpy); it writes the
            # same position again each time
            step = engine.step_cell("rows")
            rows = list(engine.rows)
            for row, t in zip(rows, token):
                row.ids.append(int(t))
            args, _, _ = engine.step_inputs([(r, 1) for r in rows])
            for _ in range(5):
                t0 = time.perf_counter()
                step(*args).asnumpy()
                step_only.append(time.perf_counter() - t0)
        return {"vision_s": median(vision), "prefill_incl_vision_s": median(prefill),
                "decode_call_ms": 1e3 * median(decode), "decode_graph_only_ms": 1e3 * median(step_only)}
