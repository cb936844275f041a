"""Build lowbit_matmul.cc with the system C++ compiler on first use, into a per-user cache.

The library lands in `<cache>/kernels/<hash>/lowbit_matmul.so`, where the hash covers the source, the
compiler's identity and the flags, so an edited source or another compiler builds afresh and a stale build is
never picked up. `<cache>` is $LLAVA_KERNEL_CACHE, else $XDG_CACHE_HOME/llava-mindspore, else
~/.cache/llava-mindspore. Concurrent processes (tensor-parallel ranks) each compile into their own temporary
folder and rename it into place; the first rename wins and the others use its result.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

from llava_errors import LlavaError

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lowbit_matmul.cc")
LIBRARY = "lowbit_matmul.so"
ENTRY = "LlavaLowbitMatmul"
# -O3 without -march: each instruction set is enabled per function inside the source and picked at run time,
# so one build serves every machine that shares the cache folder.
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-Wall", "-Wno-maybe-uninitialized"]


def compiler():
    """The C++ compiler ($CXX, else g++, else c++) as an absolute path; LlavaError if there is none."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "c++")):
        path = shutil.which(name)
        if path:
            return path
    raise LlavaError("no C++ compiler found (set CXX or install g++) to build the low-precision matmul kernel")


def cache_root():
    root = os.environ.get("LLAVA_KERNEL_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "llava-mindspore")
    return os.path.join(root, "kernels")


def _identity(cxx):
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError as e:
        raise LlavaError(f"cannot run the C++ compiler {cxx}: {e.strerror or e}") from None
    return out.stdout


def library_path():
    """Path of the compiled kernel library, building it if needed. LlavaError when it cannot be built."""
    cxx = compiler()
    with open(SOURCE, "rb") as f:
        source = f.read()
    digest = hashlib.sha256(source + _identity(cxx).encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    final = os.path.join(cache_root(), digest)
    lib = os.path.join(final, LIBRARY)
    if os.path.isfile(lib):
        return lib
    os.makedirs(cache_root(), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"{digest}.tmp-{os.getpid()}-", dir=cache_root())
    try:
        out = subprocess.run([cxx, *FLAGS, "-o", os.path.join(work, LIBRARY), SOURCE],
                             capture_output=True, text=True, timeout=600, check=False)
        if out.returncode != 0:
            first = next((ln for ln in out.stderr.splitlines() if "error" in ln), out.stderr.strip()[:200])
            raise LlavaError(f"building the low-precision matmul kernel with {cxx} failed: {first}")
        ctypes.CDLL(os.path.join(work, LIBRARY))        # loads: symbols resolved, nothing half-built kept
        try:
            os.rename(work, final)
        except OSError:
            if not os.path.isfile(lib):                  # not another process winning the race
                raise
    except OSError as e:
        raise LlavaError(f"cannot build the low-precision matmul kernel in {cache_root()}: "
                         f"{e.strerror or e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def machine_isa(lib):
    """The instruction-set path the library takes here ("avx512", "avx2", "scalar"), honouring
    LLAVA_KERNEL_ISA; LlavaError when that variable names an unknown path or one this CPU lacks."""
    fn = ctypes.CDLL(lib).LlavaKernelIsa
    fn.restype = ctypes.c_char_p
    isa = fn().decode()
    if not isa:
        raise LlavaError(f"LLAVA_KERNEL_ISA={os.environ.get('LLAVA_KERNEL_ISA')!r} is not a kernel path this "
                         f"machine can run (auto, avx512, avx2, scalar)")
    return isa
