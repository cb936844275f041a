"""The low-precision matmul kernel (research/llava/lowbit_kernels) next to MindSpore's own MatMul, same process, same
threads, calls interleaved so that other load on the machine hits every side alike.

    python -m benchmarks.kernel_matmul [--reps 7] [--rows 1 600] [--shapes 7b|mid]

Sides, for y = x @ W.T at 7B (or mid) shapes: MindSpore float32 MatMul on a float32 W; MindSpore with a
float16 W cast to float32 per call (what a float16 `Linear` costs without the kernel); the kernel on int8 W
(one scale per output channel, and per group of 32 inputs), int4 W (q4_0 layout, float16 scale per 32 inputs),
float16 W, bfloat16 W and float32 W. Prints a markdown table (median ms, GFLOP/s, W bytes read per second) and
the rounding error of the int8 scale layouts and of int4 with and without a per-group minimum (q4_0 / q4_1's
rules) on Gaussian weights.
"""
import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "research", "llava"))

SHAPES = {"7b": [(4096, 4096), (11008, 4096), (4096, 11008)],          # (N outputs, K inputs)
          "mid": [(1024, 1024), (2816, 1024), (1024, 2816), (32064, 1024)]}


def sides(rng, n, k):
    import mindspore as ms
    from mindspore import Tensor, ops
    from lowbit_kernels import make_matmul
    from weights.quantize import quantize_int4, quantize_int8
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    matmul = ops.MatMul(transpose_b=True)
    w32, w16 = Tensor(w), Tensor(w.astype(np.float16))
    q, s = quantize_int8(w)
    qg, sg = quantize_int8(w, group=32)
    q, s, qg, sg = Tensor(q), Tensor(s), Tensor(qg), Tensor(sg)
    q4, s4 = map(Tensor, quantize_int4(w))
    wb = w16.astype(ms.bfloat16)
    int8, int4, flt = make_matmul(True), make_matmul(True, int4=True), make_matmul(False)
    return [
        ("MindSpore MatMul, float32 W", 4 * n * k, lambda x: matmul(x, w32)),
        ("MindSpore cast float16 W + MatMul", 2 * n * k, lambda x: matmul(x, ops.cast(w16, ms.float32))),
        ("kernel int8 W, scale per channel", n * k + 4 * n, lambda x: int8(x, q, s)),
        ("kernel int8 W, scale per 32 inputs", n * k + 4 * n * k // 32, lambda x: int8(x, qg, sg)),
        ("kernel int4 W, float16 scale per 32 inputs", n * k // 2 + 2 * n * k // 32, lambda x: int4(x, q4, s4)),
        ("kernel int8 W, x int8 per row (VNNI)", n * k + 4 * n, int8_prefill(lambda x: int8(x, q, s))),
        ("kernel int4 W, x int8 per row (VNNI)", n * k // 2 + 2 * n * k // 32, int8_prefill(lambda x: int4(x, q4, s4))),
        ("kernel float16 W", 2 * n * k, lambda x: flt(x, w16)),
        ("kernel bfloat16 W", 2 * n * k, lambda x: flt(x, wb)),
        ("kernel float32 W", 4 * n * k, lambda x: flt(x, w32)),
    ]


def int8_prefill(fn):
    """fn run with LLAVA_KERNEL_PREFILL=int8 (read by the kernel at every call)."""
    def call(x):
        os.environ["LLAVA_KERNEL_PREFILL"] = "int8"
        try:
            return fn(x)
        finally:
            os.environ.pop("LLAVA_KERNEL_PREFILL")
    return call


def timed(fn, x):
    t = time.perf_counter()
    fn(x).asnumpy()
    return time.perf_counter() - t


def run(rows, reps, shapes):
    import mindspore as ms
    from mindspore import Tensor
    from lowbit_kernels import STREAM_ROWS
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU", pynative_synchronize=True)
    rng = np.random.default_rng(0)
    lines = ["| N x K | M | side | ms | GFLOP/s | W GB/s |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    for n, k in shapes:
        table = sides(rng, n, k)
        for m in rows:
            x = Tensor(rng.standard_normal((m, k)).astype(np.float32))
            sides_m = [side for side in table if m > STREAM_ROWS or "VNNI" not in side[0]]   # prefill-only path
            times = {name: [] for name, _, _ in sides_m}
            for name, _, fn in sides_m:
                timed(fn, x)                                     # warm-up (and compile)
            for _ in range(reps):
                for name, _, fn in sides_m:
                    times[name].append(timed(fn, x))
            for name, nbytes, _ in sides_m:
                t = float(np.median(times[name]))
                lines.append(f"| {n} x {k} | {m} | {name} | {t * 1e3:.2f} | {2 * m * n * k / t / 1e9:.1f} | "
                             f"{nbytes / t / 1e9:.2f} |")
                print(lines[-1], flush=True)
    return lines


def int4_with_minimum(w):
    """q4_1's rule, for the comparison only: per group of 32, 16 levels over [min, max], float16 d and min."""
    n, k = w.shape
    blocks = w.reshape(n, k // 32, 32)
    lo, hi = blocks.min(-1), blocks.max(-1)
    d = ((hi - lo) / 15).astype(np.float16).astype(np.float64)
    m = lo.astype(np.float16).astype(np.float64)
    q = np.clip(np.rint((blocks - m[..., None]) / np.where(d == 0, 1, d)[..., None]), 0, 15)
    return (q * d[..., None] + m[..., None]).reshape(n, k)


def dequantized_int4(w):
    from weights.quantize import quantize_int4
    packed, d = quantize_int4(w)
    n, k = w.shape
    b = packed.reshape(n, -1, 16).astype(np.int64)
    q = np.concatenate([(b & 15) - 8, (b >> 4) - 8], -1)
    return (q * d.astype(np.float64)[..., None]).reshape(n, -1)[:, :k]


def rounding_error(rng):
    from weights.quantize import quantize_int8
    lines = ["| N x K | scales | weight RMS error / RMS | max output error / max output (x Gaussian) |",
             "| --- | --- | ---: | ---: |"]
    for n, k in SHAPES["7b"][:2]:
        w = rng.standard_normal((n, k)).astype(np.float32)
        x = rng.standard_normal((8, k))
        ref = x @ w.T.astype(np.float64)
        for label, group in (("int8 per channel", None), ("int8 per 32 inputs", 32), ("int4 q4_0 (ours)", "q4_0"),
                             ("int4 with a minimum (q4_1)", "q4_1")):
            if group == "q4_0":
                deq = dequantized_int4(w)
            elif group == "q4_1":
                deq = int4_with_minimum(w)
            else:
                q, s = quantize_int8(w, group)
                deq = (q.reshape(n, s.shape[1], -1) * s[:, :, None].astype(np.float64)).reshape(n, k)
            err = np.sqrt(((deq - w) ** 2).mean()) / np.sqrt((w.astype(np.float64) ** 2).mean())
            out = np.abs(x @ deq.T - ref).max() / np.abs(ref).max()
            lines.append(f"| {n} x {k} | {label} | {err:.4f} | {out:.4f} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_matmul")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 600])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="7b")
    args = parser.parse_args(argv)
    from lowbit_kernels import build, native_library
    lib = native_library()
    isa = build.machine_isa(lib) if lib else "fallback"
    print(f"kernel path: {isa}; threads: {os.environ.get('LLAVA_KERNEL_THREADS') or len(os.sched_getaffinity(0))}; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    lines = run(args.rows, args.reps, SHAPES[args.shapes])
    print(f"load average after: {os.getloadavg()[0]:.1f}\n")
    print("\n".join(lines))
    print()
    print("\n".join(rounding_error(np.random.default_rng(1))))


if __name__ == "__main__":
    main()
