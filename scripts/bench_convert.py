#!/usr/bin/env python
"""Benchmark convert_weight.py on the `mid` fixture: throughput and peak memory (not a test).

    python scripts/bench_convert.py [--preset mid] [--workdir DIR] [--keep]

Each step runs as its own child process and its peak RSS comes from os.wait4 (that child alone). The
baseline is a child that only imports what the converter imports (MindFormers via llava_config); the
converter's own memory is its peak minus that baseline, compared with the largest single tensor: a streaming
converter stays below it whatever the model size, while save_checkpoint-style conversion holds the model.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.workload import PLUGIN, ROOT, fixture_dir  # noqa: E402  (also puts the plugin on sys.path)
import checkpoint_io  # noqa: E402


def child(argv, cwd):
    """Run argv; return (exit code, wall seconds, peak RSS in MB, stdout)."""
    with tempfile.TemporaryFile() as out, open(os.devnull, "wb") as null:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=null, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        out.seek(0)
        text = out.read().decode()
    return proc.returncode, seconds, usage.ru_maxrss / 1024, text   # ru_maxrss is in KiB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--workdir", default=None, help="where outputs go (default: a temp folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    args = ap.parse_args()

    hf_dir = fixture_dir(args.preset)
    tensors = checkpoint_io.read_safetensors_folder(hf_dir)
    largest = max(tensors.values(), key=lambda t: t.nbytes)
    total = sum(t.nbytes for t in tensors.values())
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(work, exist_ok=True)
    py = sys.executable
    conv = [py, os.path.join(ROOT, "convert_weight.py"), "--model", "llava"]
    ckpt = os.path.join(work, "model.ckpt")
    steps = [
        ("baseline (imports only)", [py, "-c", "import sys; sys.path.insert(0, %r); import numpy, llava_config, "
                                     "weight_map" % PLUGIN]),
        ("hf -> ckpt (stored float32)", conv + ["--input_path", hf_dir, "--output_path", ckpt]),
        ("hf -> ckpt --dtype float16", conv + ["--input_path", hf_dir, "--output_path",
                                               os.path.join(work, "model_fp16.ckpt"), "--dtype", "float16"]),
        ("hf -> ckpt --dtype bfloat16", conv + ["--input_path", hf_dir, "--output_path",
                                                os.path.join(work, "model_bf16.ckpt"), "--dtype", "bfloat16"]),
        ("ckpt -> hf (--reversed)", conv + ["--reversed", "--input_path", ckpt, "--output_path",
                                            os.path.join(work, "back.safetensors"),
                                            "--config", os.path.join(hf_dir, "config.json")]),
        ("baseline (import mindspore)", [py, "-c", "import mindspore"]),
        ("mindspore.load_checkpoint(ckpt)", [py, "-c", "import mindspore as ms; ms.load_checkpoint(%r)" % ckpt]),
        ("checkpoint_io.load_ckpt_lean(ckpt)", [py, "-c", "import sys; sys.path.insert(0, %r); import mindspore; "
                                                "import checkpoint_io; checkpoint_io.load_ckpt_lean(%r)"
                                                % (os.path.join(ROOT, "research", "llava"), ckpt)]),
    ]
    print(f"{args.preset}: {hf_dir}")
    print(f"{len(tensors)} tensors, {total / 1e6:.1f} MB; largest {largest.name} {list(largest.shape)} "
          f"{largest.dtype} = {largest.nbytes / 1e6:.1f} MB; chunk {checkpoint_io.CHUNK_BYTES / 1e6:.1f} MB")
    print(f"{'step':36} {'wall s':>7} {'convert s':>9} {'in MB/s':>7} {'peak RSS MB':>11} {'- baseline':>10}")
    baseline = None
    try:
        for name, argv in steps:
            code, wall, rss, out = child(argv, work)
            if code != 0:
                print(f"{name}: failed with exit code {code}")
                return 1
            if name.startswith("baseline"):
                baseline = rss
            m = re.search(r"MB, ([\d.]+) s", out)
            conv_s = f"{float(m.group(1)):.2f}" if m else "-"
            rate = f"{total / 1e6 / max(float(m.group(1)), 1e-9):.0f}" if m else "-"
            print(f"{name:36} {wall:7.2f} {conv_s:>9} {rate:>7} {rss:11.0f} {rss - baseline:10.0f}")
        print(f"'- baseline': memory over the step's baseline; compare with the largest tensor "
              f"({largest.nbytes / 1e6:.0f} MB) and the model ({total / 1e6:.0f} MB)")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
