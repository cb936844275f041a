"""The result files: OUT/<name>.json (every figure) and OUT/<name>.md (the table, also printed)."""
import json
import os


def _fmt(x, digits=3):
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _cache_read(o):
    return f"{o['decode_positions']} of seq_length={o['seq_length']} positions: the row's positions in use"


def _ratio(a, b):
    return f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else ""


def render_preset(r):
    """Markdown for a tiny/mid result (compare.bench_preset): ours / HF / llama.cpp (f32)."""
    o, h = r["sides"]["ours"], r["sides"]["hf"]
    m = r["machine"]
    lc = r.get("llamacpp") or {"error": "not run"}
    c = lc.get("types", {}).get("f32")

    def row(name, a, b, digits=3, ratio=True, cpp=None):
        cells = [_fmt(a, digits), _fmt(b, digits), "" if cpp is None else _fmt(cpp, digits)]
        return (f"| {name} | " + " | ".join(cells) + f" | {_ratio(a, b) if ratio else ''} | "
                f"{_ratio(a, cpp) if ratio else ''} |")

    def cpp(key, scale=1.0):
        return None if c is None else c[key] * scale

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
        "| | ours (MindSpore 2.9, Graph mode) | HF transformers + torch | llama.cpp (f32 GGUF, llama-bench) "
        "| ours / HF | ours / llama.cpp |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        row("time to first token (s)", o["ttft_s"], h["ttft_s"], cpp=cpp("ttft_s")),
        row("decode tokens/s", o["decode_tok_s"], h["decode_tok_s"], 2, cpp=cpp("decode_tok_s")),
        row("decode step (ms, median)", o["decode_step_ms"], h["decode_step_ms"], 1,
            cpp=None if c is None else 1e3 / c["decode_tok_s"]),
        row("decode: % of bandwidth bound", 100 * o["of_bound"], 100 * h["of_bound"], 1, cpp=cpp("of_bound", 100)),
        row("warm-up request incl. compile (s)", o["warmup"]["total_s"], h["warmup"]["total_s"], 2),
        *([row("time to first token, 2nd request (s)", o["warmup_ttft_all_s"][1], h["warmup_ttft_all_s"][1])]
          if len(o.get("warmup_ttft_all_s", [])) > 1 else []),
        row("request after warm-up (s)", o["total_s"], h["total_s"], 2),
        row("model load (s)", o["load_s"], h["load_s"], 2),
        row("peak RSS (MB)", o["peak_rss_mb"], h["peak_rss_mb"], 0,
            cpp=None if c is None else c["decode"]["peak_rss_mb"]),
        row("RSS after imports (MB)", o["baseline_rss_mb"], h["baseline_rss_mb"], 0),
        row("breakdown: vision tower (s)", ob["vision_s"], hb["vision_s"]),
        row("breakdown: prefill incl. vision (s)", ob["prefill_incl_vision_s"], hb["prefill_incl_vision_s"],
            cpp=cpp("ttft_s")),
        row("breakdown: one decode call (ms)", ob["decode_call_ms"], hb["decode_call_ms"], 1),
        row("CPU time / wall time in decode", o["cpu_per_wall_decode"], h["cpu_per_wall_decode"], 2, False),
        row("other processes' CPU meanwhile (cores)", o["background_cores"], h["background_cores"], 2, False,
            cpp=None if c is None else max(c["prefill"]["background_cores"], c["decode"]["background_cores"])),
        "",
        f"Bandwidth bound: {r['decode_weight_bytes_fp32'] / 1e6:.0f} MB of float32 weights per decode step "
        f"(decoder layers + final norm + lm_head) / {r['bandwidth_gb_s']['best_gb_s']:.1f} GB/s copy bandwidth "
        f"(numpy, 1 GB, best of 5, before and after) = {r['decode_bound_tok_s']:.1f} tokens/s. Our decode graph alone: "
        f"{ob.get('decode_graph_only_ms', float('nan')):.1f} ms/step. KV cache read per step: ours "
        f"{r['kv_cache_bytes_read_per_step']['ours'] / 1e6:.0f} MB ({_cache_read(o)}), "
        f"HF {r['kv_cache_bytes_read_per_step']['hf'] / 1e6:.0f} MB. Same prompt ids: "
        f"{'yes' if r['same_prompt_ids'] else 'NO'}; same {r['new_tokens']} greedy tokens: "
        f"{'yes' if r['same_tokens'] else 'no'}.",
        "",
        _llamacpp_line(lc),
    ]
    return "\n".join(lines) + "\n"


def _llamacpp_line(lc):
    if not lc.get("types"):
        why = lc.get("error") or "; ".join(f"{k}: {v}" for k, v in lc.get("failed", {}).items())
        return f"llama.cpp: {why}."
    parts = []
    for name, t in lc["types"].items():
        parts.append(f"{name} ({t['gguf_mb']:.0f} MB): prefill {t['prefill_tok_s']:.1f} tokens/s "
                     f"({t['prefill_s']:.2f} s), decode {t['decode_tok_s']:.2f} tokens/s")
    first = next(iter(lc["types"].values()))
    failed = "".join(f"; {name}: {why}" for name, why in lc.get("failed", {}).items())
    return (f"llama.cpp ({lc['version']['sdist']}'s vendor/llama.cpp, {' '.join(lc['version']['build'])}; "
            f"llama-bench -t {lc['threads']}, OMP_WAIT_POLICY=passive, mean of {len(first['decode']['tok_s_all'])} repetitions): "
            f"LLaMA half of the same weights converted by its convert_hf_to_gguf.py; "
            f"prefill = {lc['prompt_tokens']} tokens from an empty context (-p), decode = {lc['new_tokens']} "
            f"tokens after a {lc['prompt_tokens']}-token context (-n -d); llama-bench feeds random ids of "
            f"that count. No vision tower: its time to first token = our vision tower (CLIP + projector) "
            f"time + its prefill. " + "; ".join(parts) + failed + "." + (f" {lc['note']}" if lc.get("note") else ""))


def render_7b(r):
    """Markdown for a 7b result (seven_b.bench_7b): per weight storage, ours beside llama.cpp's GGUF type and
    HF transformers (one dtype for both tables)."""
    from .seven_b import PAIRS
    m = r["machine"]
    lc = r.get("llamacpp") or {}
    hf = r.get("hf")
    hf_name = f"HF {hf['dtype']}" if hf else "HF"
    hf_get = (lambda key: None) if hf is None else (lambda key: hf[key])
    lines = [
        f"### `7b` ({r['time']})",
        "",
        f"LLaVA-1.5-7B shapes, random float16 weights; {m['cpu']}, {m['cores']} cores, AVX-512 "
        f"{'yes' if m['avx512f'] else 'no'}, {m['mem_total_gb']} GB; {r['threads']} threads per side. Ours: "
        f"MindSpore {r['versions'].get('mindspore')}, Graph mode, float32 compute, linear layers stored as "
        f"shown, seq_length {r['seq_length']} (KV cache float32), loaded from the HF folder. One request = "
        f"chelsea.jpg + \"Describe the image in English:\", "
        f"{next(iter(r['ours'].values()))['prompt_tokens'] if r['ours'] else '?'} tokens, then {r['new_tokens']} "
        f"greedy tokens; ours: the second request (the first compiles).",
        "",
    ]
    for dtype, o in r["ours"].items():
        kind = PAIRS[dtype]
        t = lc.get("types", {}).get(kind)
        why = lc.get("failed", {}).get(kind) or lc.get("error") or "not run"
        cpp = (lambda key, scale=1.0: None) if t is None else (lambda key, scale=1.0: t[key] * scale)

        def row(name, a, b, digits, h=None, ratios=True):
            cells = [_fmt(a, digits)] + ["" if v is None else _fmt(v, digits) for v in (b, h)]
            if ratios:
                cells += [_ratio(a, b), _ratio(a, h)]
            else:
                cells += ["", ""]
            return f"| {name} | {' | '.join(cells)} |"

        lines += [
            f"| {dtype} weights | ours | llama.cpp {kind} | {hf_name} | ours / llama.cpp | ours / HF |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            row("time to first token (s)", o["ttft_s"], cpp("ttft_s"), 1, hf_get("ttft_s")),
            row("decode tokens/s", o["decode_tok_s"], cpp("decode_tok_s"), 2, hf_get("decode_tok_s")),
            row("prefill alone (s)", o["ttft_s"] - o["vision_s"], cpp("prefill_s"), 1),
            row("peak RSS (MB)", o["peak_rss_mb"], None if t is None else
                max(t["prefill"]["peak_rss_mb"], t["decode"]["peak_rss_mb"]), 0, hf_get("peak_rss_mb")),
            f"| vision tower (CLIP + projector, s) | {o['vision_s']:.2f} | (ours) | (its own, in its first token) "
            "| | |",
            row("first request incl. compile: first token (s)", o["first_request"]["ttft_s"], None, 1,
                None if hf is None else hf["first_request"]["ttft_s"]),
            row("model load (s)", o["load_s"], None, 0, hf_get("load_s")),
            row("other processes' CPU meanwhile (cores)", o["background_cores"], None if t is None else
                max(t["prefill"]["background_cores"], t["decode"]["background_cores"]), 2,
                hf_get("background_cores"), ratios=False),
            "",
        ]
        if t is None:
            lines += [f"llama.cpp {kind}: {why}.", ""]
        turns = o.get("turns")
        if turns:
            f, u = turns["first"], turns["follow_up"]
            per = turns["kv_bytes_per_token"]
            lines += [f"Chat turns with the caches on ({dtype}): first turn ({f['prompt_tokens']} tokens) first "
                      f"token after {f['ttft_s']:.1f} s; its follow-up ({u['prompt_tokens']} tokens, "
                      f"{u['cached_tokens']} from the prefix cache) after {u['ttft_s']:.2f} s "
                      f"({_ratio(u['ttft_s'], f['ttft_s'])} of the first). KV per cached token: "
                      f"{per / 2 ** 20:.2f} MiB, a 600-token conversation {600 * per / 2 ** 30:.2f} GiB.", ""]
    lines.append(_llamacpp_line(lc) if lc else "llama.cpp: not run.")
    if hf:
        same = all(hf["tokens"] == o["tokens"] for o in r["ours"].values())
        lines += ["", f"HF: transformers {r['versions'].get('transformers')} + torch {r['versions'].get('torch')}, "
                      f"weights and compute in {hf['dtype']} (float32 weights would need 28 GB), "
                      f"{hf.get('torch_threads')} torch threads, the second of two requests; greedy tokens "
                      f"{'equal to' if same else 'differ from'} ours (different precisions)."]
    else:
        lines += ["", "HF: not run."]
    lines += ["", "| step | wall (s) | peak RSS (MB) | other processes' CPU meanwhile (cores) |",
              "| --- | ---: | ---: | ---: |"]
    for name, s in r["steps"].items():
        lines.append(f"| {name} | {s['wall_s']:.0f} | {s['peak_rss_mb']:.0f} | {s['background_cores']:.2f} |")
    return "\n".join(lines) + "\n"


def write(out_dir, name, result, table):
    """OUT/<name>.json and OUT/<name>.md; the table is printed too."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(table)
    print(table)
