"""The real LLaVA-1.5-7B shapes with random float16 weights, on CPU: ours (int8 and float16 weight storage)
beside llama.cpp (q8_0 and f16 GGUF of the LLaMA half of the same weights) and HF transformers + torch
(bfloat16 by default: float32 weights would need 28 GB), in one run (not a test).

`bench_7b` (parent) writes the HF-layout safetensors with numpy (seeded, one tensor at a time, ~2 GB shards,
llava-hf key names) into --workdir (kept for the next run; --clean removes it). Per --weight-dtypes it then
runs `run_7b_child` in its own process (peak RSS from wait4): LlavaModel in Graph mode, float32 compute,
built under mindspore.nn.utils.no_init_parameters() and loaded from the HF folder itself (one tensor at a
time, quantized or cast as it loads), as `predict_llava1_5_7b_cpu.yaml` does. It answers the benchmark's
image + prompt twice (the first request compiles the graphs) and times the vision tower alone. HF answers
the same request twice in its own process (`run_hf7b_child`, --hf-dtype). Then
llama.cpp's llama-bench measures the GGUF files (benchmarks/llamacpp.py): prefill of the same token count and
decode after that context. llama.cpp has no vision tower: its time to first token is our vision tower's time
+ its prefill.
"""
import json
import os
import shutil
import sys
import time

from . import llamacpp, system
from .harness import Protocol, spawn_json
from .system import mem_available_gb
from .workload import KEYS_7B, ROOT, TOKENIZER_MODEL, command

# llama.cpp GGUF type measured beside each of our weight dtypes
PAIRS = {"int8": "q8_0", "float16": "f16", "bfloat16": "bf16", "float32": "f32"}


def np_init(rng, name, shape):
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
                a = np_init(rng, name, tuple(shape))
                assert a.nbytes == nbytes
                f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
                weight_map[name] = fname
                total += nbytes
                del a
        print(f"[7b] wrote {fname} ({sum(b for _, _, b in shard) / 1e9:.2f} GB)", file=sys.stderr, flush=True)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1, sort_keys=True)
    return total


def _two_requests(proto, side):
    proto.send({"event": "loaded", **side.info()})
    proto.send({"event": "first", **side.run()})
    proto.send({"event": "second", **side.run()})


def run_7b_child(args):
    """Child: benchmarks.ours.OursSide on the 7B folder with --weight-dtype; one JSON line per event."""
    proto = Protocol()
    system.limit_cores(args.threads)
    from .ours import OursSide
    side = OursSide(args)
    _two_requests(proto, side)
    proto.send({"event": "turns", **side.turns()})
    proto.send({"event": "done", "vision_s": side.vision(2), "peak_rss_mb": system.peak_rss_mb()})
    return 0


def run_hf7b_child(args):
    """Child: benchmarks.hf.HFSide on the 7B folder in --hf-dtype (its time to first token includes its own
    vision tower); one JSON line per event."""
    proto = Protocol()
    system.limit_cores(args.threads)
    from .hf import HFSide
    _two_requests(proto, HFSide(args))
    proto.send({"event": "done", "peak_rss_mb": system.peak_rss_mb()})
    return 0


def say(msg):
    print(f"[7b] {msg}", file=sys.stderr, flush=True)


def wait_for_memory(need_gb, max_wait_s):
    waited = 0
    while mem_available_gb() < need_gb:
        if waited >= max_wait_s:
            raise SystemExit(f"[7b] only {mem_available_gb():.1f} GB available, need {need_gb} GB; giving up")
        say(f"{mem_available_gb():.1f} GB available, need {need_gb} GB: waiting ...")
        time.sleep(60)
        waited += 60


def bench_7b(args):
    work = os.path.abspath(args.workdir or os.path.join(ROOT, ".cache", "bench7b"))
    os.makedirs(work, exist_ok=True)
    hf_dir = os.path.join(work, "llava-1.5-7b-random")
    log_path = os.path.join(work, "bench7b.log")
    dtypes = [d for d in args.weight_dtypes.split(",") if d]
    result = {"preset": "7b", "threads": args.threads, "new_tokens": args.new_tokens,
              "machine": system.machine_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "versions": system.versions(), "steps": {}, "ours": {}, "seq_length": args.seq_length}
    say(f"workdir {work}: {shutil.disk_usage(work).free / 1e9:.0f} GB free disk, "
        f"{mem_available_gb():.1f} GB available memory")

    def step(name, argv, on_event=None):
        say(f"{name} ...")
        events, wall, peak, code = spawn_json(argv, log_path, on_event)
        result["steps"][name] = {"wall_s": wall, "peak_rss_mb": peak, "exit_code": code,
                                 "background_cores": events[-1]["cores"]}
        say(f"{name}: {wall:.0f} s, peak RSS {peak:.0f} MB, exit {code}, other processes used "
            f"{events[-1]['cores']:.2f} cores meanwhile")
        if code != 0:
            raise SystemExit(f"[7b] {name} failed (exit {code}); see {log_path}")
        return events

    def show(ev):
        if ev.get("event") == "loaded":
            say(f"loaded in {ev['load_s']:.0f} s, RSS {ev['loaded_rss_mb']:.0f} MB")
        elif ev.get("event") == "turns":
            say(f"chat turns: first {ev['first']['ttft_s']:.1f} s, follow-up {ev['follow_up']['ttft_s']:.1f} s "
                f"({ev['follow_up']['cached_tokens']} of {ev['follow_up']['prompt_tokens']} prompt tokens cached)")
        elif ev.get("event") in ("first", "second"):
            say(f"{ev['event']} request: first token after {ev['ttft_s']:.1f} s, decode "
                f"{ev['decode_tok_s']:.2f} tokens/s, RSS {ev['rss_mb']:.0f} MB")

    if not os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")):
        step("write HF safetensors (numpy, float16)", command("--side", "write7b", "--hf-dir", hf_dir))
    for dtype in dtypes:
        wait_for_memory(args.need_gb, args.wait_s)
        argv = command("--side", "ours7b", "--hf-dir", hf_dir, "--threads", args.threads, "--new-tokens",
                       args.new_tokens, "--seq-length", args.seq_length, "--weight-dtype", dtype)
        events = step(f"ours, {dtype} weights", argv, show)
        got = {e["event"]: e for e in events}
        s = result["steps"][f"ours, {dtype} weights"]
        result["ours"][dtype] = {**got["loaded"], "first_request": got["first"], **got["second"],
                                 "vision_s": got["done"]["vision_s"], "peak_rss_mb": s["peak_rss_mb"],
                                 "turns": {k: v for k, v in got["turns"].items() if k != "event"},
                                 "background_cores": s["background_cores"]}
    hf_dtype = args.hf_dtype or "bfloat16"
    if hf_dtype != "none":
        wait_for_memory(args.need_gb, args.wait_s)
        argv = command("--side", "hf7b", "--hf-dir", hf_dir, "--threads", args.threads, "--new-tokens",
                       args.new_tokens, "--hf-dtype", hf_dtype)
        name = f"HF transformers, {hf_dtype}"
        events = step(name, argv, show)
        got = {e["event"]: e for e in events}
        result["hf"] = {"dtype": hf_dtype, **got["loaded"], "first_request": got["first"], **got["second"],
                        "peak_rss_mb": result["steps"][name]["peak_rss_mb"],
                        "background_cores": result["steps"][name]["background_cores"]}
    prompt_tokens = next(iter(result["ours"].values()))["prompt_tokens"] if result["ours"] else 595
    types = [PAIRS[d] for d in dtypes]
    try:
        lc = llamacpp.measure(hf_dir, args.threads, prompt_tokens, args.new_tokens, types, reps=args.llamacpp_reps,
                              log=log_path)
    except llamacpp.NotBuilt as e:
        lc = {"error": f"not built ({e})"}
    finally:
        llamacpp.drop_llama_folder(hf_dir)
    result["llamacpp"] = lc
    for dtype, o in result["ours"].items():
        t = lc.get("types", {}).get(PAIRS[dtype])
        if t:
            t["ttft_s"] = o["vision_s"] + t["prefill_s"]      # no vision tower in llama.cpp
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)
    return result
