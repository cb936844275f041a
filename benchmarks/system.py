"""The machine: CPU model and flags, memory bandwidth, RSS and available memory, CPU time, core pinning,
library versions."""
import os
import platform
import subprocess
import threading
import time


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


def busy_seconds():
    """CPU seconds all processes have used (user+nice+system+irq+softirq+steal), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid):
    """User + system CPU seconds of process `pid` so far, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def limit_cores(threads):
    """Pin this process to `threads` cores when that is fewer than the machine has (a hard cap both
    frameworks obey; their own thread settings alone still let runtime threads use other cores)."""
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        os.sched_setaffinity(0, set(cores[:threads]))
    return sorted(os.sched_getaffinity(0))


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


def versions():
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("mindspore", "mindformers", "torch", "transformers", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


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
