#!/usr/bin/env python
"""Benchmark LlavaModel (MindSpore) against Hugging Face transformers + torch on the same CPU (not a test).

    python scripts/bench.py --preset tiny|mid [--threads 2] [--new-tokens 32] [--runs 5] [--out benchmarks/]
    python scripts/bench.py --preset 7b [--threads 2] [--new-tokens 8] [--workdir DIR] [--keep]

tiny / mid: both sides get the same random-weight checkpoint (the HF-layout fixture that
tests/fixtures/make_tiny_llava.py builds, cached in .cache/fixtures/ like the tests'), the same image
(tests/fixtures/images/chelsea.jpg), the same prompt, float32, the same number of CPU threads, and decode
greedily exactly --new-tokens tokens (EOS ignored: ours `generate(..., eos_token_id=[-1])`, HF
`min_new_tokens=max_new_tokens`). Each side runs in its own child process (so that peak RSS is its own) that
loads once and does --warmup requests (the first one is reported: ours includes Graph compilation), then
the parent asks the two children for requests alternately (ours, HF, HF, ours, ...) so that background load
on a shared machine hits both alike; figures are medians over --runs requests.

Warm-up: MindSpore's CPU kernels pick their thread split by timing their first few launches, and a prompt
kernel launches once per request, so ours is steady from about the 6th request (until then its
non-matmul kernels take about twice as long: ~0.05 s more time to first token on `mid`). The default
--warmup 5 measures both sides in their steady state; HF is steady after one.

  time to first token  generate() call -> first token's logits (image encode + prefill; pixels and ids are
                       computed beforehand, the same way on both sides)
  decode tokens/s      (new_tokens - 1) / (time from the first to the last token), inside generate()
  breakdown            vision tower alone, prefill (incl. vision), one decode step called directly
  bandwidth bound      weight bytes read per decode step (decoder layers + final norm + lm_head, float32)
                       / memory bandwidth (numpy copy of a 1 GB array, best of 5; 1 thread and --threads
                       threads, the faster counts); "of bound" = achieved tokens/s / bound

Threads: torch.set_num_threads(N) for HF; for MindSpore 2.9 `mindspore.device_context.cpu.op_tuning
.threads_num(N)` (the CPU kernel thread pool; `set_context(runtime_num_threads)` is its deprecated alias and
OMP_NUM_THREADS does not change MindSpore's kernels). Both children also get OMP_NUM_THREADS=N.

7b: the real LLaVA-1.5-7B shapes with random float16 weights: writes the HF-layout safetensors with numpy
(seeded, one tensor at a time, ~2 GB shards, llava-hf key names), converts them with convert_weight.py,
builds LlavaModel (float16) under mindspore.nn.utils.no_init_parameters(), loads with
weights.load_into (one tensor at a time) and generates --new-tokens tokens. It runs in
PyNative mode by default (README "Benchmark": in Graph mode every float16 MatMul on CPU keeps a float32 copy
of its weight and the prefill graph keeps its activations, ~59 GB above the weights for the 7B; `--probe-only
--mode 0` measures it on 1- and 2-layer models). Files go to --workdir (default .cache/bench7b) and are
deleted at the end unless --keep.

Results: OUT/<preset>.json and OUT/<preset>.md (the table is printed too).
"""
import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "research", "llava")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TESTS = os.path.join(ROOT, "tests")
for _p in (PLUGIN, FIXTURES, TESTS, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

IMAGE = os.path.join(FIXTURES, "images", "chelsea.jpg")
PROMPT = "Describe the image in English:"
TOKENIZER_MODEL = os.path.join(FIXTURES, "tokenizer.model")
KEYS_7B = os.path.join(FIXTURES, "llava_1_5_7b_keys.json")
PAD_TOKEN_ID = 32001
MB = 1024 * 1024


# ----------------------------------------------------------------------------------------------- helpers
def _status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb():
    return _status_mb("VmRSS")


def peak_rss_mb():
    """VmHWM of this process. (getrusage's ru_maxrss is not used: Linux carries the pre-exec high-water mark
    of the forked parent into it, so a child of a big parent would report the parent's peak.)"""
    return _status_mb("VmHWM")


def mem_available_gb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def machine_info():
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = line
                break
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) / 1024 / 1024
    return {"cpu": model, "cores": os.cpu_count(), "avx512f": " avx512f" in flags, "avx2": " avx2" in flags,
            "mem_total_gb": round(total, 1), "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg()}


def measure_bandwidth(threads, size_bytes=1 << 30, repeats=5):
    """Copy bandwidth (bytes read + bytes written per second) of a numpy copy of a 1 GB array, best of
    `repeats`, with 1 thread and with `threads` threads (each copying its own slice; numpy drops the GIL)."""
    import numpy as np
    src = np.ones(size_bytes // 8, dtype=np.float64)
    dst = np.zeros_like(src)
    out = {}
    for n in sorted({1, max(1, threads)}):
        parts = np.array_split(np.arange(src.size), n)
        bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
        best = float("inf")
        for _ in range(repeats):
            if n == 1:
                t0 = time.perf_counter()
                np.copyto(dst, src)
                dt = time.perf_counter() - t0
            else:
                ts = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
                t0 = time.perf_counter()
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                dt = time.perf_counter() - t0
            best = min(best, dt)
        out[f"{n}_thread"] = 2 * src.nbytes / best / 1e9
    out["best_gb_s"] = max(out.values())
    return out


def decode_weight_bytes(cfg_json, itemsize=4):
    """Bytes of the weights one decode step reads: every decoder layer, the final norm and lm_head (the
    embedding table is only gathered from). From the HF config.json."""
    t = cfg_json["text_config"]
    d, inter, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    heads = t["num_attention_heads"]
    kv = t.get("num_key_value_heads") or heads
    hd = d // heads
    vocab = t.get("vocab_size", cfg_json.get("vocab_size"))
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter + 2 * d
    return (layers * per_layer + d + vocab * d) * itemsize


def kv_cache_bytes(cfg_json, length, itemsize=4):
    t = cfg_json["text_config"]
    heads = t["num_attention_heads"]
    kv = t.get("num_key_value_heads") or heads
    return 2 * t["num_hidden_layers"] * kv * (t["hidden_size"] // heads) * length * itemsize


def ids_digest(ids):
    return hashlib.sha256(",".join(str(int(i)) for i in ids).encode()).hexdigest()[:16]


class Protocol:
    """Child side: JSON lines on a private copy of stdout; fd 1 goes to stderr so that MindSpore's C++
    prints cannot corrupt the protocol."""

    def __init__(self):
        sys.stdout.flush()
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, obj):
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()


# ----------------------------------------------------------------------------------------------- our side
class OursSide:
    name = "ours"

    def __init__(self, args):
        t0 = time.perf_counter()
        import numpy as np
        import mindspore as ms
        ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
        ms.device_context.cpu.op_tuning.threads_num(args.threads)
        from llava_config import LlavaConfig
        from llava_model import LlavaModel
        from llava_processor import LlavaProcessor
        from llava_tokenizer import LlavaTokenizer
        from parallel import TensorParallel
        import weights
        self.np, self.ms = np, ms
        self.import_s = time.perf_counter() - t0
        self.baseline_rss = rss_mb()
        t0 = time.perf_counter()
        with open(os.path.join(args.hf_dir, "config.json")) as f:
            hf_cfg = json.load(f)
        overrides = {"seq_length": args.seq_length} if args.seq_length else {}
        self.config = LlavaConfig.from_hf_config(hf_cfg, **overrides)
        with ms.nn.utils.no_init_parameters():
            self.model = LlavaModel(self.config)
        single = TensorParallel()                                          # the HF folder itself, lazily
        weights.load_into(self.model, weights.rank_checkpoint(args.hf_dir, single, self.config), single)
        self.load_s = time.perf_counter() - t0
        tokenizer = LlavaTokenizer(vocab_file=TOKENIZER_MODEL)
        processor = LlavaProcessor(self.config, tokenizer)
        inputs = processor.process([(IMAGE, PROMPT)], max_new_tokens=args.new_tokens)
        self.ids, self.mask, self.pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
        self.n = args.new_tokens
        self.threads = args.threads
        self.loaded_rss = rss_mb()

    def info(self):
        return {"import_s": self.import_s, "load_s": self.load_s, "baseline_rss_mb": self.baseline_rss,
                "loaded_rss_mb": self.loaded_rss, "prompt_tokens": int(self.ids.shape[1]),
                "ids_digest": ids_digest(self.ids[0]), "seq_length": self.config.seq_length,
                "threads_num": self.threads, "affinity": sorted(os.sched_getaffinity(0))}

    def run(self):
        stamps = []

        class Stamp:
            def put(self, tokens):
                stamps.append((time.perf_counter(), time.process_time()))

            def end(self):
                pass

        t0, c0 = time.perf_counter(), time.process_time()
        out = self.model.generate(self.ids, self.pixels, self.mask, streamer=Stamp(), max_new_tokens=self.n,
                                  eos_token_id=[-1])
        t1 = time.perf_counter()
        return _figures(t0, c0, t1, stamps, out[0])

    def profile(self, repeats):
        np, ms = self.np, self.ms
        m = self.model
        vision, prefill, decode, step_only = [], [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m.get_image_features(self.pixels).asnumpy()
            vision.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            logits, state = m.prefill(self.ids, self.pixels, self.mask, reserve=self.n)
            prefill.append(time.perf_counter() - t0)
            token = np.argmax(logits, -1)
            for _ in range(min(self.n - 1, 16)):
                t0 = time.perf_counter()
                logits = m.decode(state, token)
                decode.append(time.perf_counter() - t0)
                token = np.argmax(logits, -1)
            # the compiled decode graph alone (inputs prepared beforehand; includes the logits' asnumpy)
            step = m._step("decode")
            mask = ms.Tensor(state.kv_mask.reshape(1, 1, -1))
            args = (ms.Tensor(np.array([[5]], np.int32)), ms.Tensor(np.array([[state.next_slot]], np.int32)),
                    mask, ms.Tensor(np.array([state.next_slot], np.int32)))
            for _ in range(5):
                t0 = time.perf_counter()
                step(*args).asnumpy()
                step_only.append(time.perf_counter() - t0)
        return {"vision_s": median(vision), "prefill_incl_vision_s": median(prefill),
                "decode_call_ms": 1e3 * median(decode), "decode_graph_only_ms": 1e3 * median(step_only)}


# ----------------------------------------------------------------------------------------------- HF side
class HFSide:
    name = "hf"

    def __init__(self, args):
        t0 = time.perf_counter()
        import numpy as np
        import torch
        from PIL import Image
        from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LogitsProcessor
        import make_tiny_llava
        torch.set_num_threads(args.threads)
        self.np, self.torch, self.LogitsProcessor = np, torch, LogitsProcessor
        self.import_s = time.perf_counter() - t0
        self.baseline_rss = rss_mb()
        t0 = time.perf_counter()
        self.model = LlavaForConditionalGeneration.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
        self.load_s = time.perf_counter() - t0
        with open(os.path.join(args.hf_dir, "config.json")) as f:
            vision = json.load(f)["vision_config"]
        n_img = (vision["image_size"] // vision["patch_size"]) ** 2
        tok = make_tiny_llava.make_hf_tokenizer(TOKENIZER_MODEL)
        ids = []
        for t in tok(f"USER: <image>\n{PROMPT} ASSISTANT:")["input_ids"]:
            ids.extend([t] * n_img if t == make_tiny_llava.IMAGE_TOKEN_INDEX else [t])
        self.ids = torch.tensor([ids])
        self.mask = torch.ones_like(self.ids)
        self.pixels = CLIPImageProcessor.from_pretrained(args.hf_dir)(Image.open(IMAGE),
                                                                      return_tensors="pt")["pixel_values"]
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
                                      pad_token_id=PAD_TOKEN_ID, logits_processor=[Stamp()])
        t1 = time.perf_counter()
        return _figures(t0, c0, t1, stamps, out[0, self.ids.shape[1]:].tolist())

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


def _figures(t0, c0, t1, stamps, tokens):
    first, last = stamps[0], stamps[-1]
    steps = len(stamps) - 1
    decode_s = last[0] - first[0]
    gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    return {"ttft_s": first[0] - t0, "decode_s": decode_s, "decode_steps": steps,
            "decode_tok_s": steps / decode_s if decode_s > 0 else float("nan"),
            "decode_step_ms_median": 1e3 * median(gaps),
            "cpu_per_wall_prefill": (first[1] - c0) / max(first[0] - t0, 1e-9),
            "cpu_per_wall_decode": (last[1] - first[1]) / max(decode_s, 1e-9),
            "total_s": t1 - t0, "tokens": [int(t) for t in tokens], "rss_mb": rss_mb()}


def limit_cores(threads):
    """Pin this process to `threads` cores when that is fewer than the machine has (a hard cap both
    frameworks obey; their own thread settings alone still let runtime threads use other cores)."""
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        os.sched_setaffinity(0, set(cores[:threads]))
    return sorted(os.sched_getaffinity(0))


def child_main(args):
    proto = Protocol()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.affinity = limit_cores(args.threads)
    side = (OursSide if args.side == "ours" else HFSide)(args)
    proto.send({"event": "ready", **side.info()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "run":
            proto.send(side.run())
        elif cmd["cmd"] == "profile":
            proto.send(side.profile(cmd.get("repeats", 3)))
        elif cmd["cmd"] == "quit":
            proto.send({"peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb()})
            return 0
    return 0


# ----------------------------------------------------------------------------------------------- parent
class Child:
    def __init__(self, side, args, hf_dir):
        self.side = side
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench_{side}_", suffix=".log", delete=False)
        argv = [sys.executable, os.path.abspath(__file__), "--side", side, "--hf-dir", hf_dir,
                "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
        if args.seq_length:
            argv += ["--seq-length", str(args.seq_length)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), GLOG_v=os.environ.get("GLOG_v", "3"))
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=ROOT, env=env)

    def recv(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            with open(self.log.name, errors="replace") as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"{self.side} child exited ({self.proc.returncode}); log tail:\n{tail}")
        return json.loads(line)

    def ask(self, cmd, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def finish(self):
        last = self.ask("quit")
        self.proc.stdin.close()
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        os.unlink(self.log.name)
        last["peak_rss_mb_wait4"] = usage.ru_maxrss / 1024
        return last


def _busy_seconds():
    """CPU seconds all processes have used (user+nice+system+irq+softirq+steal), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def timed_request(children, side, cmd="run", **kw):
    """One request on `side`; also how many cores other processes (not the two children) kept busy."""
    other = [c for s, c in children.items() if s != side][0]
    me = children[side]
    b0, m0, o0, t0 = _busy_seconds(), me.cpu_seconds(), other.cpu_seconds(), time.monotonic()
    res = me.ask(cmd, **kw)
    b1, m1, o1, t1 = _busy_seconds(), me.cpu_seconds(), other.cpu_seconds(), time.monotonic()
    res["background_cores"] = max(0.0, (b1 - b0) - (m1 - m0) - (o1 - o0)) / (t1 - t0)
    res["idle_side_cpu_s"] = o1 - o0
    return res


def bench_preset(args):
    import conftest
    print("[bench] measuring memory bandwidth (numpy copy of 1 GB) ...", file=sys.stderr)
    bandwidth_start = measure_bandwidth(args.threads)
    hf_dir = conftest.hf_checkpoint(args.preset, shard_mb=200 if args.preset == "mid" else None)
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    sides = ("ours", "hf")
    children, info = {}, {}
    for side in sides:                      # loaded one after the other: load times are not contended
        print(f"[bench] starting {side} ...", file=sys.stderr)
        children[side] = Child(side, args, hf_dir)
        info[side] = children[side].recv()
    try:
        warm, runs, rejected = {}, {s: [] for s in sides}, {s: [] for s in sides}
        warm_ttft = {s: [] for s in sides}
        for side in sides:
            print(f"[bench] warm-up {side} ({args.warmup} requests) ...", file=sys.stderr)
            for _ in range(args.warmup):
                res = children[side].ask("run")
                warm.setdefault(side, res)
                warm_ttft[side].append(res["ttft_s"])
        attempt = 0
        while min(len(runs[s]) for s in sides) < args.runs and attempt < args.runs * args.max_attempts:
            order = sides if attempt % 2 == 0 else sides[::-1]
            attempt += 1
            for side in order:
                if len(runs[side]) >= args.runs:
                    continue
                res = timed_request(children, side)
                ok = res["background_cores"] <= args.max_background
                (runs if ok else rejected)[side].append(res)
                print(f"[bench] {side}: ttft {res['ttft_s']:.3f} s, decode {res['decode_tok_s']:.2f} tok/s, "
                      f"other processes used {res['background_cores']:.2f} cores"
                      + ("" if ok else " -> rejected, repeating"), file=sys.stderr)
        for side in sides:
            if len(runs[side]) < args.runs:                   # machine never quiet enough: keep the quietest
                extra = sorted(rejected[side], key=lambda r: r["background_cores"])[:args.runs - len(runs[side])]
                runs[side].extend(extra)
                for r in extra:
                    rejected[side].remove(r)
                    r["accepted_despite_background"] = True
        profile = {}
        for side in sides:
            print(f"[bench] breakdown {side} ...", file=sys.stderr)
            for attempt in range(args.max_attempts):
                res = timed_request(children, side, "profile", repeats=args.profile_repeats)
                if side not in profile or res["background_cores"] < profile[side]["background_cores"]:
                    profile[side] = res
                if res["background_cores"] <= args.max_background:
                    break
    finally:
        final = {}
        for side in sides:
            try:
                final[side] = children[side].finish()
            except Exception:                                                  # noqa: BLE001
                children[side].proc.kill()
                raise
    print("[bench] measuring memory bandwidth again ...", file=sys.stderr)
    bandwidth_end = measure_bandwidth(args.threads)
    bandwidth = {"start": bandwidth_start, "end": bandwidth_end,
                 "best_gb_s": max(bandwidth_start["best_gb_s"], bandwidth_end["best_gb_s"])}
    result = {"preset": args.preset, "hf_dir": os.path.relpath(hf_dir, ROOT), "image": os.path.relpath(IMAGE, ROOT),
              "prompt": PROMPT, "new_tokens": args.new_tokens, "runs": args.runs, "threads": args.threads,
              "machine": machine_info(), "bandwidth_gb_s": bandwidth,
              "decode_weight_bytes_fp32": decode_weight_bytes(hf_cfg),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": _versions(), "sides": {}}
    bound = bandwidth["best_gb_s"] * 1e9 / result["decode_weight_bytes_fp32"]
    result["decode_bound_tok_s"] = bound
    for side in sides:
        r = runs[side]
        result["sides"][side] = {
            **info[side], "warmup": {k: v for k, v in warm[side].items() if k != "tokens"},
            "warmup_requests": args.warmup, "warmup_ttft_all_s": warm_ttft[side],
            "ttft_s": median([x["ttft_s"] for x in r]), "decode_tok_s": median([x["decode_tok_s"] for x in r]),
            "decode_step_ms": median([x["decode_step_ms_median"] for x in r]),
            "total_s": median([x["total_s"] for x in r]),
            "cpu_per_wall_prefill": median([x["cpu_per_wall_prefill"] for x in r]),
            "cpu_per_wall_decode": median([x["cpu_per_wall_decode"] for x in r]),
            "ttft_all_s": [x["ttft_s"] for x in r], "decode_tok_s_all": [x["decode_tok_s"] for x in r],
            "background_cores": median([x["background_cores"] for x in r]),
            "background_cores_all": [x["background_cores"] for x in r], "rejected_runs": len(rejected[side]),
            "idle_side_cpu_s": [x["idle_side_cpu_s"] for x in r], "breakdown": profile[side],
            "peak_rss_mb": final[side]["peak_rss_mb"], "tokens": r[-1]["tokens"],
            "tokens_stable": all(x["tokens"] == r[0]["tokens"] for x in r)}
        result["sides"][side]["of_bound"] = result["sides"][side]["decode_tok_s"] / bound
    ours, hf = result["sides"]["ours"], result["sides"]["hf"]
    result["same_prompt_ids"] = ours["ids_digest"] == hf["ids_digest"]
    result["same_tokens"] = ours["tokens"] == hf["tokens"]
    result["kv_cache_bytes_read_per_step"] = {
        "ours": kv_cache_bytes(hf_cfg, ours["seq_length"]),
        "hf": kv_cache_bytes(hf_cfg, ours["prompt_tokens"] + args.new_tokens // 2)}
    return result


def _versions():
    out = {}
    for name in ("mindspore", "mindformers", "torch", "transformers", "numpy"):
        try:
            from importlib.metadata import version
            out[name] = version(name)
        except Exception:                                                      # noqa: BLE001
            out[name] = None
    return out


def _fmt(x, digits=3):
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def render_preset(r):
    o, h = r["sides"]["ours"], r["sides"]["hf"]
    m = r["machine"]

    def row(name, a, b, digits=3, ratio=True):
        rr = f"{a / b:.2f}" if ratio and isinstance(a, (int, float)) and b else ""
        return f"| {name} | {_fmt(a, digits)} | {_fmt(b, digits)} | {rr} |"

    ob, hb = o["breakdown"], h["breakdown"]
    lines = [
        f"### `{r['preset']}` ({r['time']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, AVX-512 {'yes' if m['avx512f'] else 'no'}, "
        f"{m['mem_total_gb']} GB; {r['threads']} threads per side; float32; "
        f"{o['prompt_tokens']}-token prompt (chelsea.jpg, \"{r['prompt']}\"), {r['new_tokens']} new tokens, "
        f"median of {r['runs']} requests per side (alternating, after {o.get('warmup_requests', 1)} warm-up "
        f"requests).",
        "",
        "| | ours (MindSpore 2.9, Graph mode) | HF transformers + torch | ours / HF |",
        "| --- | ---: | ---: | ---: |",
        row("time to first token (s)", o["ttft_s"], h["ttft_s"]),
        row("decode tokens/s", o["decode_tok_s"], h["decode_tok_s"], 2),
        row("decode step (ms, median)", o["decode_step_ms"], h["decode_step_ms"], 1),
        row("decode: % of bandwidth bound", 100 * o["of_bound"], 100 * h["of_bound"], 1),
        row("warm-up request incl. compile (s)", o["warmup"]["total_s"], h["warmup"]["total_s"], 2),
        *([row("time to first token, 2nd request (s)", o["warmup_ttft_all_s"][1], h["warmup_ttft_all_s"][1])]
          if len(o.get("warmup_ttft_all_s", [])) > 1 else []),
        row("request after warm-up (s)", o["total_s"], h["total_s"], 2),
        row("model load (s)", o["load_s"], h["load_s"], 2),
        row("peak RSS (MB)", o["peak_rss_mb"], h["peak_rss_mb"], 0),
        row("RSS after imports (MB)", o["baseline_rss_mb"], h["baseline_rss_mb"], 0),
        row("breakdown: vision tower (s)", ob["vision_s"], hb["vision_s"]),
        row("breakdown: prefill incl. vision (s)", ob["prefill_incl_vision_s"], hb["prefill_incl_vision_s"]),
        row("breakdown: one decode call (ms)", ob["decode_call_ms"], hb["decode_call_ms"], 1),
        row("CPU time / wall time in decode", o["cpu_per_wall_decode"], h["cpu_per_wall_decode"], 2, False),
        row("other processes' CPU meanwhile (cores)", o["background_cores"], h["background_cores"], 2, False),
        "",
        f"Bandwidth bound: {r['decode_weight_bytes_fp32'] / 1e6:.0f} MB of float32 weights per decode step "
        f"(decoder layers + final norm + lm_head) / {r['bandwidth_gb_s']['best_gb_s']:.1f} GB/s copy bandwidth "
        f"(numpy, 1 GB, best of 5, before and after) = {r['decode_bound_tok_s']:.1f} tokens/s. Our decode graph alone: "
        f"{ob.get('decode_graph_only_ms', float('nan')):.1f} ms/step. KV cache read per step: ours "
        f"{r['kv_cache_bytes_read_per_step']['ours'] / 1e6:.0f} MB (whole seq_length={o['seq_length']}, masked), "
        f"HF {r['kv_cache_bytes_read_per_step']['hf'] / 1e6:.0f} MB. Same prompt ids: "
        f"{'yes' if r['same_prompt_ids'] else 'NO'}; same {r['new_tokens']} greedy tokens: "
        f"{'yes' if r['same_tokens'] else 'no'}.",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- 7B
def _np_init(rng, name, shape):
    """make_tiny_llava.build_model's scheme, in numpy: norms ~1, biases ~0, matrices std 1/sqrt(fan_in),
    the patch-embedding conv 0.05, lm_head x4."""
    import numpy as np
    if len(shape) == 1:
        base = 1.0 if ("norm" in name or "layrnorm" in name) and name.endswith("weight") else 0.0
        a = base + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    else:
        std = shape[-1] ** -0.5 if len(shape) == 2 else 0.05
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= std
        if name == "language_model.lm_head.weight":
            a *= 4.0
    return a.astype(np.float16)


def write_7b(out_dir, seed=0, shard_bytes=2 * 10 ** 9):
    """HF-layout llava-1.5-7b folder with random float16 weights, written one tensor at a time (memory: one
    tensor) in ~2 GB shards plus model.safetensors.index.json, config.json and the tokenizer files."""
    import numpy as np
    import checkpoint_io
    with open(KEYS_7B) as f:
        listing = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(listing["config"], f, indent=1)
    shutil.copy(TOKENIZER_MODEL, os.path.join(out_dir, "tokenizer.model"))
    keys = sorted(listing["keys"].items())
    shards, cur, size = [], [], 0
    for name, shape in keys:
        nbytes = 2 * int(np.prod(shape))
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, nbytes))
        size += nbytes
    shards.append(cur)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header = checkpoint_io.safetensors_header([(n, "F16", s, b) for n, s, b in shard])
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(header)
            for name, shape, nbytes in shard:
                a = _np_init(rng, name, tuple(shape))
                assert a.nbytes == nbytes
                f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
                weight_map[name] = fname
                total += nbytes
                del a
        print(f"[7b] wrote {fname} ({sum(b for _, _, b in shard) / 1e9:.2f} GB)", file=sys.stderr, flush=True)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1, sort_keys=True)
    return total


def run_7b_child(args):
    """Child: build the 7B LlavaModel in float16 without initialising weights, load the converted ckpt,
    generate. Prints one JSON line with the figures."""
    proto = Protocol()
    t0 = time.perf_counter()
    import numpy as np
    import mindspore as ms
    mode = ms.GRAPH_MODE if args.mode == 0 else ms.PYNATIVE_MODE
    ms.set_context(mode=mode, device_target="CPU", pynative_synchronize=(mode == ms.PYNATIVE_MODE))
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    from llava_config import LlavaConfig
    from llava_model import LlavaModel
    from parallel import TensorParallel
    import weights
    from llava_processor import LlavaProcessor
    from llava_tokenizer import LlavaTokenizer
    res = {"import_s": time.perf_counter() - t0, "baseline_rss_mb": rss_mb(), "mode": args.mode}
    with open(os.path.join(args.hf_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    config = LlavaConfig.from_hf_config(hf_cfg, compute_dtype="float16", param_init_type="float16")
    t0 = time.perf_counter()
    with ms.nn.utils.no_init_parameters():
        model = LlavaModel(config)
    res["build_s"] = time.perf_counter() - t0
    res["built_rss_mb"] = rss_mb()
    t0 = time.perf_counter()
    weights.load_into(model, weights.rank_checkpoint(args.ckpt, TensorParallel(), config), TensorParallel())
    res["load_s"] = time.perf_counter() - t0
    res["loaded_rss_mb"] = rss_mb()
    proto.send({"event": "loaded", **res})
    processor = LlavaProcessor(config, LlavaTokenizer(vocab_file=TOKENIZER_MODEL))
    if args.text_only:
        ids = np.array([processor.encode_prompt(PROMPT, 0)], np.int32)
        mask, pixels = np.ones_like(ids), None
    else:
        inputs = processor.process([(IMAGE, PROMPT)], max_new_tokens=args.new_tokens)
        ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    res["prompt_tokens"] = int(ids.shape[1])
    res["text_only"] = bool(args.text_only)
    stamps = []

    class Stamp:
        def put(self, tokens):
            stamps.append((time.perf_counter(), rss_mb()))
            proto.send({"event": "token", "n": len(stamps), "t": stamps[-1][0] - t0, "rss_mb": stamps[-1][1]})

        def end(self):
            pass

    t0 = time.perf_counter()
    out = model.generate(ids, pixels, mask, streamer=Stamp(), max_new_tokens=args.new_tokens, eos_token_id=[-1])
    t1 = time.perf_counter()
    gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    res.update({"ttft_s": stamps[0][0] - t0, "decode_s_per_token": median(gaps), "decode_gaps_s": gaps,
                "total_s": t1 - t0, "tokens": out[0], "rss_after_prefill_mb": stamps[0][1],
                "rss_end_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()})
    proto.send({"event": "done", **res})
    return 0


def run_probe_7b_child(args):
    """Child: 7B-shaped model with --probe-layers text and vision layers (random float16 weights): time of the
    vision tower, a text-only and an image prefill and a decode step, and the RSS after each (one process per
    layer count: MindSpore does not give memory back when a model is deleted)."""
    proto = Protocol()
    import numpy as np
    import mindspore as ms
    mode = ms.GRAPH_MODE if args.mode == 0 else ms.PYNATIVE_MODE
    ms.set_context(mode=mode, device_target="CPU", pynative_synchronize=(mode == ms.PYNATIVE_MODE))
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    from llava_config import LlavaConfig
    from llava_model import LlavaModel
    from weights import load_weights
    from llava_processor import LlavaProcessor
    from llava_tokenizer import LlavaTokenizer
    with open(KEYS_7B) as f:
        hf_cfg = json.load(f)["config"]
    layers = args.probe_layers
    hf_cfg["text_config"]["num_hidden_layers"] = layers
    hf_cfg["vision_config"]["num_hidden_layers"] = layers
    config = LlavaConfig.from_hf_config(hf_cfg, compute_dtype="float16", param_init_type="float16")
    with ms.nn.utils.no_init_parameters():
        model = LlavaModel(config)
    rng = np.random.default_rng(0)
    load_weights(model, {n: _np_init(rng, n, tuple(p.shape)) for n, p in model.weight_parameters().items()})
    processor = LlavaProcessor(config, LlavaTokenizer(vocab_file=TOKENIZER_MODEL))
    inputs = processor.process([(IMAGE, PROMPT)], max_new_tokens=args.new_tokens)
    ids, mask, pix = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    text_ids = np.array([processor.encode_prompt(PROMPT, 0)], np.int32)
    t = {"vision": [], "prefill": [], "prefill_text": [], "decode": []}
    rss = {"loaded": rss_mb()}
    for _ in range(2):
        t0 = time.perf_counter()
        model.get_image_features(pix).asnumpy()
        t["vision"].append(time.perf_counter() - t0)
        rss["vision"] = rss_mb()
        t0 = time.perf_counter()
        model.prefill(text_ids, None, None)
        t["prefill_text"].append(time.perf_counter() - t0)
        rss["prefill_text"] = rss_mb()
        t0 = time.perf_counter()
        logits, state = model.prefill(ids, pix, mask, reserve=args.new_tokens)
        t["prefill"].append(time.perf_counter() - t0)
        rss["prefill_image"] = rss_mb()
        for _ in range(2):
            t0 = time.perf_counter()
            model.decode(state, np.argmax(logits, -1))
            t["decode"].append(time.perf_counter() - t0)
        rss["decode"] = rss_mb()
    out = {k: min(v) for k, v in t.items()}
    out["rss_mb"] = rss
    proto.send({"event": "probe", "layers": layers, "measured": out})
    return 0


def estimate_7b(one, two, text_layers=32, vision_layers=24):
    """Scale the 1- and 2-layer measurements to the real layer counts."""
    per = {k: two[k] - one[k] for k in ("vision", "prefill", "prefill_text", "decode")}
    text_with_image = per["prefill"] - per["vision"]                # prefill runs the vision tower too
    grow = lambda m: m["rss_mb"]["decode"] - m["rss_mb"]["loaded"]   # noqa: E731
    return {"vision_s": one["vision"] + (vision_layers - 1) * per["vision"],
            "prefill_image_s": one["prefill"] + (text_layers - 1) * text_with_image
            + (vision_layers - 1) * per["vision"],
            "prefill_text_s": one["prefill_text"] + (text_layers - 1) * per["prefill_text"],
            "decode_s": one["decode"] + (text_layers - 1) * per["decode"],
            "step_memory_mb_per_layer": grow(two) - grow(one),
            "step_memory_mb_7b": grow(one) + (text_layers - 1) * (grow(two) - grow(one))}


def _spawn_json(argv, log_path, on_event=None):
    """Run a child; return (its JSON events, wall seconds, peak RSS MB from wait4, exit code)."""
    events = []
    with open(log_path, "ab") as log:
        busy0 = _busy_seconds()
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, text=True,
                                env=dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3")))
        for line in proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                ev = json.loads(line)
                events.append(ev)
                if on_event:
                    on_event(ev)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    background = max(0.0, _busy_seconds() - busy0 - usage.ru_utime - usage.ru_stime) / wall
    events.append({"event": "background", "cores": background})
    return events, wall, usage.ru_maxrss / 1024, code


def _wait_for_memory(need_gb, max_wait_s):
    waited = 0
    while mem_available_gb() < need_gb:
        if waited >= max_wait_s:
            raise SystemExit(f"[7b] only {mem_available_gb():.1f} GB available, need {need_gb} GB; giving up")
        print(f"[7b] {mem_available_gb():.1f} GB available, need {need_gb} GB: waiting ...", file=sys.stderr,
              flush=True)
        time.sleep(60)
        waited += 60


def bench_7b(args):
    work = os.path.abspath(args.workdir or os.path.join(ROOT, ".cache", "bench7b"))
    os.makedirs(work, exist_ok=True)
    hf_dir, ckpt = os.path.join(work, "hf"), os.path.join(work, "llava1_5_7b_fp16.ckpt")
    log_path = os.path.join(work, "bench7b.log")
    py, me = sys.executable, os.path.abspath(__file__)
    result = {"preset": "7b", "threads": args.threads, "new_tokens": args.new_tokens, "machine": machine_info(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": _versions(), "steps": {},
              "mode": args.mode}
    free = shutil.disk_usage(work).free / 1e9
    print(f"[7b] workdir {work}: {free:.0f} GB free disk, {mem_available_gb():.1f} GB available memory",
          file=sys.stderr, flush=True)

    def say(msg):
        print(f"[7b] {msg}", file=sys.stderr, flush=True)

    def step(name, argv, on_event=None):
        say(f"{name} ...")
        events, wall, peak, code = _spawn_json(argv, log_path, on_event)
        background = events[-1]["cores"]
        result["steps"][name] = {"wall_s": wall, "peak_rss_mb": peak, "exit_code": code,
                                 "background_cores": background}
        say(f"{name}: {wall:.0f} s, peak RSS {peak:.0f} MB, exit {code}, other processes used "
            f"{background:.2f} cores meanwhile")
        if code != 0:
            raise SystemExit(f"[7b] {name} failed (exit {code}); see {log_path}")
        return events

    try:
        if args.probe:
            measured = {}
            for layers in (1, 2):
                ev = step(f"probe ({layers} layer{'s' if layers > 1 else ''})",
                          [py, me, "--side", "probe7b", "--threads", str(args.threads), "--new-tokens",
                           str(args.new_tokens), "--mode", str(args.mode), "--probe-layers", str(layers)])
                measured[layers] = [x for x in ev if x.get("event") == "probe"][-1]["measured"]
            e = estimate_7b(measured[1], measured[2])
            result["probe"] = {"measured": measured, "estimate_7b": e}
            total = e["prefill_image_s"] + args.new_tokens * e["decode_s"]
            say(f"estimate: {json.dumps(e)}; image request ~{total / 60:.0f} min")
            if not args.text_only and total > args.max_minutes * 60:
                say(f"more than {args.max_minutes} min: using a text-only prompt")
                args.text_only = True
                result["text_only_because"] = f"estimated {total / 60:.0f} min with the image"
        if args.probe_only:
            return result
        if not os.path.exists(ckpt):
            if free < 30 and not os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")):
                raise SystemExit(f"[7b] {free:.0f} GB free on {work}: need ~30 GB")
            if not os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")):
                step("write HF safetensors (numpy, fp16)", [py, me, "--side", "write7b", "--hf-dir", hf_dir])
            step("convert_weight.py -> ckpt", [py, os.path.join(ROOT, "convert_weight.py"), "--model", "llava",
                                               "--input_path", hf_dir, "--output_path", ckpt, "--quiet"])
            result["ckpt_bytes"] = os.path.getsize(ckpt)
        _wait_for_memory(args.need_gb, args.wait_s)
        result["mem_available_gb_before_run"] = mem_available_gb()

        def show(ev):
            if ev.get("event") == "token":
                say(f"token {ev['n']} at {ev['t']:.1f} s, RSS {ev['rss_mb']:.0f} MB")
            elif ev.get("event") == "loaded":
                say(f"loaded in {ev['load_s']:.0f} s, RSS {ev['loaded_rss_mb']:.0f} MB")

        argv = [py, me, "--side", "ours7b", "--hf-dir", hf_dir, "--ckpt", ckpt, "--threads", str(args.threads),
                "--new-tokens", str(args.new_tokens), "--mode", str(args.mode)]
        if args.text_only:
            argv.append("--text-only")
        ev = step("generate", argv, show)
        result["run"] = [e for e in ev if e.get("event") == "done"][-1]
    finally:
        if not args.keep:
            shutil.rmtree(hf_dir, ignore_errors=True)
            if os.path.exists(ckpt):
                os.unlink(ckpt)
    return result


def render_7b(r):
    m = r["machine"]
    mode = "Graph" if r["mode"] == 0 else "PyNative (pynative_synchronize)"
    lines = [
        f"### `7b` ({r['time']})",
        "",
        f"LLaVA-1.5-7B shapes, random float16 weights, MindSpore {r['versions'].get('mindspore')} on CPU, "
        f"{mode}, float16 compute, {r['threads']} threads; {m['cpu']}, {m['cores']} cores, AVX-512 "
        f"{'yes' if m['avx512f'] else 'no'}, {m['mem_total_gb']} GB.",
        "",
        "| step | wall (s) | peak RSS (MB) | other processes' CPU meanwhile (cores) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, s in r["steps"].items():
        lines.append(f"| {name} | {s['wall_s']:.0f} | {s['peak_rss_mb']:.0f} | "
                     f"{s.get('background_cores', float('nan')):.2f} |")
    run = r.get("run")
    if run:
        prompt = ("text-only prompt" if run["text_only"] else "chelsea.jpg + prompt") + \
            f", {run['prompt_tokens']} tokens"
        lines += [
            "",
            "| generate | value |",
            "| --- | ---: |",
            f"| prompt | {prompt} |",
            f"| load (weights.load_into, one tensor at a time), s | {run['load_s']:.1f} |",
            f"| RSS after imports / after load / peak (MB) | {run['baseline_rss_mb']:.0f} / "
            f"{run['loaded_rss_mb']:.0f} / {run['peak_rss_mb']:.0f} |",
            f"| time to first token (image encode + prefill), s | {run['ttft_s']:.1f} |",
            f"| decode, s/token (median of {len(run['decode_gaps_s'])}) | {run['decode_s_per_token']:.2f} |",
            f"| {len(run['tokens'])} tokens in total, s | {run['total_s']:.1f} |",
        ]
    if r.get("probe"):
        e = r["probe"]["estimate_7b"]
        lines += ["", f"Estimate from 1- and 2-layer models ({mode}): vision {e['vision_s']:.0f} s, image prefill "
                  f"{e['prefill_image_s']:.0f} s (incl. vision), text-only prefill {e['prefill_text_s']:.0f} s, "
                  f"decode {e['decode_s']:.1f} s/token; running the steps adds {e['step_memory_mb_per_layer']:.0f} MB "
                  f"per layer (text + vision) on top of the weights, {e['step_memory_mb_7b'] / 1024:.1f} GB "
                  f"for the 7B."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("tiny", "mid", "7b"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 32 (7b: 8)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5,
                    help="warm-up requests per side before the timed ones (see the docstring: kernel tuning)")
    ap.add_argument("--profile-repeats", type=int, default=3)
    ap.add_argument("--max-background", type=float, default=None,
                    help="repeat a request if other processes kept more than this many cores busy meanwhile "
                         "(default: the cores --threads leaves free + 0.25)")
    ap.add_argument("--max-attempts", type=int, default=6, help="at most runs x this many attempts per side")
    ap.add_argument("--seq-length", type=int, default=None, help="our KV-cache length (default: the config's)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks"))
    ap.add_argument("--workdir", default=None, help="7b: where the HF files and the ckpt go")
    ap.add_argument("--keep", action="store_true", help="7b: keep the HF files and the ckpt")
    ap.add_argument("--probe", action="store_true", help="7b: first time 1- and 2-layer models to estimate")
    ap.add_argument("--probe-only", action="store_true", help="7b: only the 1-/2-layer probe (implies --probe)")
    ap.add_argument("--text-only", action="store_true", help="7b: prompt without the image")
    ap.add_argument("--max-minutes", type=float, default=40.0,
                    help="7b with --probe: use a text-only prompt if the image request would take longer")
    ap.add_argument("--mode", type=int, default=1, choices=(0, 1), help="7b: 0 Graph, 1 PyNative (default)")
    ap.add_argument("--need-gb", type=float, default=17.0, help="7b: available memory to wait for")
    ap.add_argument("--wait-s", type=int, default=1800, help="7b: how long to wait for that memory")
    ap.add_argument("--side", choices=("ours", "hf", "write7b", "ours7b", "probe7b"), help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    ap.add_argument("--probe-layers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = 8 if args.preset == "7b" or args.side in ("ours7b", "probe7b") else 32
    if args.side in ("ours", "hf"):
        return child_main(args)
    if args.side == "write7b":
        write_7b(args.hf_dir)
        return 0
    if args.side == "ours7b":
        return run_7b_child(args)
    if args.side == "probe7b":
        return run_probe_7b_child(args)
    if not args.preset:
        ap.error("--preset is required")
    if args.probe_only:
        args.probe = True
    args.warmup = max(1, args.warmup)                   # the first request (with compilation) is always done
    if args.max_background is None:
        args.max_background = max(0, (os.cpu_count() or 1) - args.threads) + 0.25
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2")
    result = bench_7b(args) if args.preset == "7b" else bench_preset(args)
    table = render_7b(result) if args.preset == "7b" else render_preset(result)
    os.makedirs(args.out, exist_ok=True)
    name = f"7b_probe_mode{args.mode}" if args.probe_only else args.preset
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
