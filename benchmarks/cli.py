"""Benchmark LlavaModel (MindSpore) against Hugging Face transformers + torch on the same CPU (not a test).

    python -m benchmarks --preset tiny|mid [--threads 2] [--new-tokens 32] [--runs 5] [--out benchmarks/]
    python -m benchmarks --preset 7b [--weight-dtypes int8,float16] [--new-tokens 16] [--workdir DIR]
    (python scripts/bench.py ... is the same command)

tiny / mid: ours and HF, each in its own child process, load the same random-weight HF-layout fixture (built
and cached like the tests'), answer the same image + prompt in float32 on --threads threads and decode
greedily exactly --new-tokens tokens (EOS ignored). After --warmup requests per side (MindSpore's CPU kernels
tune their thread split over the first few launches) the parent asks them alternately and reports medians of
--runs requests; a request disturbed by other processes (--max-background) is repeated. Then llama.cpp's
llama-bench measures the LLaMA half of the same weights (GGUF f32 / f16 / q8_0) on as many threads: prefill
of the prompt's token count and decode after that context (benchmarks/llamacpp.py; skipped with a line
saying so when llama.cpp is not built).

7b: the real LLaVA-1.5-7B shapes with random float16 weights (written once into --workdir, default
.cache/bench7b, ~14 GB; --clean removes it at the end): ours with each of --weight-dtypes (Graph mode, loaded
from the HF folder, two requests: the first compiles), then llama.cpp with the matching GGUF types (int8 ->
q8_0, float16 -> f16) on the same weights (benchmarks/seven_b.py).

Results: OUT/<preset>.json and OUT/<preset>.md (the table is printed too). The method, the definitions of
each figure and the results: docs/performance.md.
"""
import argparse
import os
import sys

from . import harness, report
from .workload import RESULTS


def parser():
    run_as_module = os.path.basename(sys.argv[0]) == "__main__.py"
    ap = argparse.ArgumentParser(prog="python -m benchmarks" if run_as_module else None, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("tiny", "mid", "7b"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 32 (7b: 16)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5,
                    help="warm-up requests per side before the timed ones (at least 1: the first one compiles)")
    ap.add_argument("--profile-repeats", type=int, default=3)
    ap.add_argument("--max-background", type=float, default=None,
                    help="repeat a request if other processes kept more than this many cores busy meanwhile "
                         "(default: the cores --threads leaves free + 0.25)")
    ap.add_argument("--max-attempts", type=int, default=6, help="at most runs x this many attempts per side")
    ap.add_argument("--seq-length", type=int, default=None, help="our KV-cache length (default: the config's)")
    ap.add_argument("--llamacpp", choices=("auto", "build", "off"), default="auto",
                    help="tiny/mid: llama.cpp as a third side: auto = if built (python -m benchmarks.llamacpp "
                         "--build), build = build it first if missing, off")
    ap.add_argument("--llamacpp-types", default="f32,f16,q8_0", help="GGUF types to measure (the table shows f32)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--weight-dtype", default=None, choices=("float32", "float16", "bfloat16", "int8"),
                    help="tiny/mid: our linear layers' storage (default float32)")
    ap.add_argument("--workdir", default=None, help="7b: where the HF files go (kept for the next run)")
    ap.add_argument("--clean", action="store_true", help="7b: remove the workdir at the end")
    ap.add_argument("--weight-dtypes", default="int8,float16", help="7b: our weight storages to measure")
    ap.add_argument("--llamacpp-reps", type=int, default=2, help="7b: llama-bench repetitions per test")
    ap.add_argument("--need-gb", type=float, default=17.0, help="7b: available memory to wait for")
    ap.add_argument("--wait-s", type=int, default=1800, help="7b: how long to wait for that memory")
    ap.add_argument("--hf-dtype", default=None,
                    help="7b: HF's weights and compute, default bfloat16 (float32 needs 28 GB); 'none' skips it")
    # the child processes' entry points (the parent starts them)
    ap.add_argument("--side", choices=("ours", "hf", "write7b", "ours7b", "hf7b"), help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    return ap


def child(args):
    """Run one child process's job (--side)."""
    if args.side == "ours":
        from .ours import OursSide
        return harness.serve(lambda: OursSide(args), args.threads)
    if args.side == "hf":
        from .hf import HFSide
        return harness.serve(lambda: HFSide(args), args.threads)
    from . import seven_b
    if args.side == "write7b":
        seven_b.write_7b(args.hf_dir)
        return 0
    if args.side == "hf7b":
        return seven_b.run_hf7b_child(args)
    return seven_b.run_7b_child(args)


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = 16 if args.preset == "7b" or args.side in ("ours7b", "hf7b") else 32
    if args.side:
        return child(args)
    if not args.preset:
        ap.error("--preset is required")
    args.warmup = max(1, args.warmup)                   # the first request (with compilation) is always done
    if args.max_background is None:
        args.max_background = max(0, (os.cpu_count() or 1) - args.threads) + 0.25
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2")
    if args.preset == "7b":
        from . import seven_b
        if args.seq_length is None:
            args.seq_length = 1024              # predict_llava1_5_7b_cpu.yaml's
        result = seven_b.bench_7b(args)
        table = report.render_7b(result)
    else:
        from . import compare
        result = compare.bench_preset(args)
        table = report.render_preset(result)
    report.write(args.out, args.preset, result, table)
    return 0
