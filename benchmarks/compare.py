"""The tiny/mid comparison: ours and HF on the same random-weight fixture, each in its own child process,
measured by the harness, then llama.cpp's llama-bench on the LLaMA half of the same weights (llamacpp.py)
-> one result dict (what report.render_preset and the json file show)."""
import json
import os
import subprocess
import time

from . import harness, llamacpp, system
from .harness import median, say
from .workload import IMAGE, PROMPT, ROOT, command, fixture_dir

SIDES = ("ours", "hf")


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


def start(side, args, hf_dir):
    argv = command("--side", side, "--hf-dir", hf_dir, "--threads", args.threads, "--new-tokens", args.new_tokens)
    if args.seq_length:
        argv += ["--seq-length", str(args.seq_length)]
    if side == "ours" and args.weight_dtype:
        argv += ["--weight-dtype", args.weight_dtype]
    return harness.Child(side, argv, args.threads)


def llamacpp_side(args, hf_dir, prompt_tokens):
    """llama.cpp's llama-bench on the same weights after the other two sides are done (llamacpp.py), or
    {"error": why not}."""
    if args.llamacpp == "off":
        return {"error": "not run (--llamacpp off)"}
    try:
        if args.llamacpp == "build":
            try:
                llamacpp.bench_binary()
            except llamacpp.NotBuilt:
                say("building llama.cpp ...")
                llamacpp.build()
        say("llama.cpp: converting and measuring ...")
        return llamacpp.measure(hf_dir, args.threads, prompt_tokens, args.new_tokens,
                                args.llamacpp_types.split(","), reps=args.runs)
    except llamacpp.NotBuilt as e:
        say(f"llama.cpp: not built ({e})")
        return {"error": f"not built ({e})"}
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        say(f"llama.cpp: failed ({e})")
        return {"error": f"failed ({str(e).splitlines()[0]})"}


def bench_preset(args):
    say("measuring memory bandwidth (numpy copy of 1 GB) ...")
    bandwidth_start = system.measure_bandwidth(args.threads)
    hf_dir = fixture_dir(args.preset)
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    children, info = {}, {}
    try:
        for side in SIDES:                      # loaded one after the other: load times are not contended
            say(f"starting {side} ...")
            children[side] = start(side, args, hf_dir)
            info[side] = children[side].recv()
        warm, warm_ttft = harness.warm_up(children, SIDES, args.warmup)
        runs, rejected = harness.alternate(children, SIDES, args.runs, args.max_background, args.max_attempts)
        profile = {}
        for side in SIDES:
            say(f"breakdown {side} ...")
            profile[side] = harness.quietest_profile(children, side, args.profile_repeats, args.max_background,
                                                     args.max_attempts)
        final = {side: child.finish() for side, child in children.items()}
    except BaseException:
        for child in children.values():
            child.kill()
        raise
    result_llamacpp = llamacpp_side(args, hf_dir, info["ours"]["prompt_tokens"])
    say("measuring memory bandwidth again ...")
    bandwidth_end = system.measure_bandwidth(args.threads)
    bandwidth = {"start": bandwidth_start, "end": bandwidth_end,
                 "best_gb_s": max(bandwidth_start["best_gb_s"], bandwidth_end["best_gb_s"])}
    result = {"preset": args.preset, "hf_dir": os.path.relpath(hf_dir, ROOT), "image": os.path.relpath(IMAGE, ROOT),
              "prompt": PROMPT, "new_tokens": args.new_tokens, "runs": args.runs, "threads": args.threads,
              "machine": system.machine_info(), "bandwidth_gb_s": bandwidth,
              "decode_weight_bytes_fp32": decode_weight_bytes(hf_cfg),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": system.versions(), "sides": {}}
    bound = bandwidth["best_gb_s"] * 1e9 / result["decode_weight_bytes_fp32"]
    result["decode_bound_tok_s"] = bound
    for side in SIDES:
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
    result["llamacpp"] = result_llamacpp
    if "types" in result_llamacpp:
        for t in result_llamacpp["types"].values():
            # llama.cpp has no vision tower: its first token comes after our CLIP time and its prefill
            t["ttft_s"] = ours["breakdown"]["vision_s"] + t["prefill_s"]
            t["of_bound"] = t["decode_tok_s"] / bound
    result["kv_cache_bytes_read_per_step"] = {
        "ours": kv_cache_bytes(hf_cfg, ours.get("decode_positions", ours["seq_length"])),
        "hf": kv_cache_bytes(hf_cfg, ours["prompt_tokens"] + args.new_tokens // 2)}
    return result
