"""The real LLaVA-1.5-7B shapes with random float16 weights, on CPU.

`bench_7b` (parent) writes the HF-layout safetensors with numpy (seeded, one tensor at a time, ~2 GB shards,
llava-hf key names), converts them with convert_weight.py, then runs `run_7b_child`: LlavaModel (float16)
built under mindspore.nn.utils.no_init_parameters(), loaded with weights.load_into (one tensor at a time), generating --new-tokens tokens. With --probe it first runs `run_probe_7b_child` on
1- and 2-layer models and scales them to the 7B (`estimate_7b`). Each step is its own child process (its peak
RSS from wait4); PyNative mode by default (docs/performance.md: in Graph mode the 7B needs ~59 GB above its
weights).
"""
import json
import os
import shutil
import sys
import time

from . import system
from .harness import Protocol, median, spawn_json
from .system import mem_available_gb, rss_mb
from .workload import IMAGE, KEYS_7B, PROMPT, ROOT, TOKENIZER_MODEL, command


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


def _set_mode(args):
    import mindspore as ms
    mode = ms.GRAPH_MODE if args.mode == 0 else ms.PYNATIVE_MODE
    ms.set_context(mode=mode, device_target="CPU", pynative_synchronize=(mode == ms.PYNATIVE_MODE))
    ms.device_context.cpu.op_tuning.threads_num(args.threads)


def run_7b_child(args):
    """Child: build the 7B LlavaModel in float16 without initialising weights, load the converted ckpt,
    generate. Prints one JSON line with the figures."""
    proto = Protocol()
    t0 = time.perf_counter()
    import numpy as np
    import mindspore as ms
    _set_mode(args)
    from parallel import TensorParallel
    import weights
    from generation import GenerationSettings
    from llava_config import LlavaConfig
    from llava_model import LlavaModel
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
    settings = GenerationSettings.from_config(config, max_new_tokens=args.new_tokens, eos_token_id=[-1])
    out = model.engine().generate(ids, pixels, mask, settings=settings, streamer=Stamp())
    t1 = time.perf_counter()
    gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    res.update({"ttft_s": stamps[0][0] - t0, "decode_s_per_token": median(gaps), "decode_gaps_s": gaps,
                "total_s": t1 - t0, "tokens": out[0], "rss_after_prefill_mb": stamps[0][1],
                "rss_end_mb": rss_mb(), "peak_rss_mb": system.peak_rss_mb()})
    proto.send({"event": "done", **res})
    return 0


def run_probe_7b_child(args):
    """Child: 7B-shaped model with --probe-layers text and vision layers (random float16 weights): time of the
    vision tower, a text-only and an image prefill and a decode step, and the RSS after each (one process per
    layer count: MindSpore does not give memory back when a model is deleted)."""
    proto = Protocol()
    import numpy as np
    import mindspore as ms
    _set_mode(args)
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
    load_weights(model, {n: np_init(rng, n, tuple(p.shape)) for n, p in model.weight_parameters().items()})
    processor = LlavaProcessor(config, LlavaTokenizer(vocab_file=TOKENIZER_MODEL))
    inputs = processor.process([(IMAGE, PROMPT)], max_new_tokens=args.new_tokens)
    ids, mask, pix = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    text_ids = np.array([processor.encode_prompt(PROMPT, 0)], np.int32)
    t = {"vision": [], "prefill": [], "prefill_text": [], "decode": []}
    rss = {"loaded": rss_mb()}
    engine = model.engine()
    for _ in range(2):
        t0 = time.perf_counter()
        engine.image_features(pix).asnumpy()
        t["vision"].append(time.perf_counter() - t0)
        rss["vision"] = rss_mb()
        t0 = time.perf_counter()
        engine.prefill(text_ids, None, None)
        t["prefill_text"].append(time.perf_counter() - t0)
        rss["prefill_text"] = rss_mb()
        t0 = time.perf_counter()
        logits = engine.prefill(ids, pix, mask, reserve=args.new_tokens)
        t["prefill"].append(time.perf_counter() - t0)
        rss["prefill_image"] = rss_mb()
        for _ in range(2):
            t0 = time.perf_counter()
            engine.decode(np.argmax(logits, -1))
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
    hf_dir, ckpt = os.path.join(work, "hf"), os.path.join(work, "llava1_5_7b_fp16.ckpt")
    log_path = os.path.join(work, "bench7b.log")
    result = {"preset": "7b", "threads": args.threads, "new_tokens": args.new_tokens,
              "machine": system.machine_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "versions": system.versions(), "steps": {}, "mode": args.mode}
    free = shutil.disk_usage(work).free / 1e9
    say(f"workdir {work}: {free:.0f} GB free disk, {mem_available_gb():.1f} GB available memory")

    def step(name, argv, on_event=None):
        say(f"{name} ...")
        events, wall, peak, code = spawn_json(argv, log_path, on_event)
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
                          command("--side", "probe7b", "--threads", args.threads, "--new-tokens", args.new_tokens,
                                  "--mode", args.mode, "--probe-layers", layers))
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
                step("write HF safetensors (numpy, fp16)", command("--side", "write7b", "--hf-dir", hf_dir))
            step("convert_weight.py -> ckpt", [sys.executable, os.path.join(ROOT, "convert_weight.py"), "--model",
                                               "llava", "--input_path", hf_dir, "--output_path", ckpt, "--quiet"])
            result["ckpt_bytes"] = os.path.getsize(ckpt)
        wait_for_memory(args.need_gb, args.wait_s)
        result["mem_available_gb_before_run"] = mem_available_gb()

        def show(ev):
            if ev.get("event") == "token":
                say(f"token {ev['n']} at {ev['t']:.1f} s, RSS {ev['rss_mb']:.0f} MB")
            elif ev.get("event") == "loaded":
                say(f"loaded in {ev['load_s']:.0f} s, RSS {ev['loaded_rss_mb']:.0f} MB")

        argv = command("--side", "ours7b", "--hf-dir", hf_dir, "--ckpt", ckpt, "--threads", args.threads,
                       "--new-tokens", args.new_tokens, "--mode", args.mode)
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
