"""[J][R] The plugin's CPU kernels (research/llava/lowbit_kernels): the low-precision weight matmul y = x @ W.T from
int8 (+ scales), int4 (packed, float16 scales per 32 inputs, partial last groups), float16, bfloat16 and float32
weights and the opt-in int8-activation prefill on AVX512-VNNI (against its definition), the prompt attention, the
paged attention over a block-table KV pool and the per-token steps (RMSNorm, SwiGLU, rotary), against numpy
float64, on every instruction-set path this machine has (read from /proc/cpuinfo here, not from the kernel),
through MindSpore's ops.Custom in PyNative and Graph mode, and the pure-MindSpore fallback; plus the kernel's
worker threads under concurrent callers and fork, the build cache and the errors.

Shapes are chosen to hit every edge of the kernel: rows of x below, at and above the decode/prefill switch
(1..4 rows stream W, more use the blocked GEMM) and the micro-kernel's row strips (12 AVX-512, 6 AVX2, 4
scalar), inputs that are not multiples of the vector width or span several 256-input panels, outputs that
are not multiples of the 2-register column block, and decode rows split over threads around the 8-row blocks.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

import lowbit_kernels as kernels
from lowbit_kernels import build
from llava_errors import LlavaError

SHAPES = [(1, 17, 33), (2, 40, 64), (3, 1, 7), (4, 100, 300), (5, 33, 16), (7, 17, 33), (12, 32, 256),
          (13, 70, 517), (65, 100, 33), (1, 130, 600), (30, 64, 1),
          (1, 515, 700)]        # (M rows of x, N outputs, K inputs); the last splits one row over threads
GRAPH_SHAPES = [(1, 17, 33), (65, 100, 300)]


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())


def machine_paths():
    """The kernel paths this CPU can run, from the flags the Linux kernel reports."""
    flags = cpu_flags()
    paths = ["scalar"]
    if {"avx2", "fma", "f16c"} <= flags:
        paths.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        paths.append("avx512")
    return paths


PATHS = machine_paths()
VNNI = "avx512" in PATHS and "avx512_vnni" in cpu_flags()


def bf16_round(a):
    """float32 -> bfloat16 bits, round to nearest even (NaN-free inputs), widened back to float32."""
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (bits.astype(np.uint32) << 16).view(np.float32)


def int4_reference(packed, scale, k):
    """float64 W [N, k] of packed int4 weights, from the layout's definition (weights/quantize.py): group g's
    byte j holds input 32 g + j in its low nibble and 32 g + 16 + j in its high nibble, each q + 8."""
    n, groups = scale.shape
    w = np.zeros((n, groups * 32))
    for g in range(groups):
        for j in range(16):
            byte = packed[:, g * 16 + j].astype(np.int64)
            w[:, g * 32 + j] = ((byte & 15) - 8) * scale[:, g].astype(np.float64)
            w[:, g * 32 + 16 + j] = ((byte >> 4) - 8) * scale[:, g].astype(np.float64)
    return w[:, :k]


def cases(rng, m, n, k):
    """(name, x, stored weights as MindSpore tensors, float64 reference y) for each weight kind."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    out = []
    for groups in sorted({1, k if k <= 64 and k > 1 else 1}):
        s = (rng.random((n, groups)) * 0.02 + 1e-3).astype(np.float32)
        deq = (q.astype(np.float64).reshape(n, groups, k // groups) * s[:, :, None]).reshape(n, k)
        out.append((f"int8/g{groups}", x, (Tensor(q), Tensor(s)), x.astype(np.float64) @ deq.T))
    groups4 = -(-k // 32)       # a last partial group whenever k is not a multiple of 32
    packed = rng.integers(0, 256, (n, groups4 * 16)).astype(np.uint8)
    s16 = (rng.random((n, groups4)) * 0.2 + 0.01).astype(np.float16)
    out.append(("int4", x, (Tensor(packed), Tensor(s16)), x.astype(np.float64) @ int4_reference(packed, s16, k).T))
    h = w.astype(np.float16)
    out.append(("float16", x, (Tensor(h),), x.astype(np.float64) @ h.astype(np.float64).T))
    b = bf16_round(w)
    out.append(("bfloat16", x, (Tensor(b).astype(ms.bfloat16),), x.astype(np.float64) @ b.astype(np.float64).T))
    out.append(("float32", x, (Tensor(w),), x.astype(np.float64) @ w.astype(np.float64).T))
    return out


def tolerance(x, stored, ref):
    """float32 accumulation over K terms: a few ulps of the sum of |products|."""
    return 1e-5 * max(1.0, float(np.abs(ref).max())) * (1 + x.shape[1] / 256)


class Net(nn.Cell):
    def __init__(self, int8, int4=False):
        super().__init__()
        self.int8 = int8
        self.mm = kernels.make_matmul(int8, int4=int4)

    def construct(self, x, w, scale):
        if self.int8:
            return self.mm(x, w, scale)
        return self.mm(x, w)


def run(x, stored):
    int8 = len(stored) == 2
    scale = stored[1] if int8 else Tensor(np.zeros((1, 1), np.float32))
    return Net(int8, int4=stored[0].dtype == ms.uint8)(Tensor(x), stored[0], scale).asnumpy()


@pytest.fixture
def env(monkeypatch):
    """Kernel environment variables, restored after the test."""
    for key in ("LLAVA_KERNEL", "LLAVA_KERNEL_ISA", "LLAVA_KERNEL_THREADS"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.fixture(params=["pynative", "graph"])
def mode(request):
    old = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE if request.param == "pynative" else ms.GRAPH_MODE)
    yield request.param
    ms.set_context(mode=old)


@pytest.mark.parametrize("path", PATHS + ["fallback"])
def test_every_path_matches_float64_on_odd_shapes(path, env, mode):
    if path == "fallback":
        env.setenv("LLAVA_KERNEL", "fallback")
    else:
        env.setenv("LLAVA_KERNEL", "native")
        env.setenv("LLAVA_KERNEL_ISA", path)
    rng = np.random.default_rng(7)
    for m, n, k in SHAPES if mode == "pynative" else GRAPH_SHAPES:
        for name, x, stored, ref in cases(rng, m, n, k):
            y = run(x, stored)
            assert y.shape == (m, n) and y.dtype == np.float32
            err = float(np.abs(y - ref).max())
            assert err <= tolerance(x, stored, ref), f"{path} {name} M={m} N={n} K={k}: {err}"


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 9])
def test_paths_and_thread_counts_agree(kind, rows, env):
    """Each output is one thread's dot product in a fixed order: 1 and 2 threads give identical bits; the
    vector paths differ from the scalar one only by summation order."""
    env.setenv("LLAVA_KERNEL", "native")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((rows, 700)).astype(np.float32)
    if kind == "int8":
        stored = (Tensor(rng.integers(-127, 128, (300, 700)).astype(np.int8)),
                  Tensor((rng.random((300, 1)) * 0.01).astype(np.float32)))
    else:
        stored = (Tensor(rng.integers(0, 256, (300, 22 * 16)).astype(np.uint8)),
                  Tensor((rng.random((300, 22)) * 0.01).astype(np.float16)))
    results = {}
    for path in PATHS:
        env.setenv("LLAVA_KERNEL_ISA", path)
        per_threads = []
        for threads in ("1", "2"):
            env.setenv("LLAVA_KERNEL_THREADS", threads)
            per_threads.append(run(x, stored))
        np.testing.assert_array_equal(per_threads[0], per_threads[1])
        results[path] = per_threads[0]
    for path in PATHS:
        np.testing.assert_allclose(results[path], results["scalar"], rtol=1e-5, atol=1e-4)


def rms_ref(x, w, eps):
    x64 = x.astype(np.float64)
    return w * (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps))


def swiglu_ref(g, u):
    g64 = g.astype(np.float64)
    return g64 / (1 + np.exp(-g64)) * u


def rotary_ref(x, cos, sin):
    """transformers' apply_rotary_pos_emb for one tensor: x * cos + rotate_half(x) * sin, with the tables
    given the kernel's way (sin's first half negated, so rotate_half becomes a swap of the halves)."""
    half = x.shape[-1] // 2
    x64 = x.astype(np.float64)
    rotated = np.concatenate([-x64[..., half:], x64[..., :half]], -1)
    true_sin = np.concatenate([-sin[:, :half], sin[:, half:]], -1).astype(np.float64)
    return x64 * cos[:, None, :] + rotated * true_sin[:, None, :]


def per_token_cases(rng):
    """(maker, inputs, float64 reference): rows / widths below, at and off the vector width, SwiGLU inputs
    far out in both tails, rotary halves that are and are not a multiple of the vector width."""
    out = []
    for n, c in ((1, 5), (3, 64), (7, 1037)):
        x = (rng.standard_normal((n, c)) * 3).astype(np.float32)
        w = rng.standard_normal(c).astype(np.float32)
        eps = np.array([1e-5], np.float32)
        out.append((kernels.make_rms_norm, (x, w, eps), rms_ref(x, w, 1e-5)))
    for n, c in ((1, 3), (4, 130)):
        g = (rng.standard_normal((n, c)) * 30).astype(np.float32)
        g.flat[:2] = (-120.0, 95.0)
        u = rng.standard_normal((n, c)).astype(np.float32)
        out.append((kernels.make_swiglu, (g, u), swiglu_ref(g, u)))
    for n, h, d in ((3, 5, 6), (4, 2, 128), (2, 3, 64)):
        x = rng.standard_normal((n, h, d)).astype(np.float32)
        angles = rng.random((n, d // 2)) * 50
        cos = np.cos(np.concatenate([angles, angles], -1)).astype(np.float32)
        sin = np.sin(np.concatenate([angles, angles], -1)) * np.concatenate([-np.ones(d // 2), np.ones(d // 2)])
        out.append((kernels.make_rotary, (x, cos, sin.astype(np.float32)), rotary_ref(x, cos, sin)))
    return out


@pytest.mark.parametrize("path", PATHS)
def test_per_token_steps_match_float64(path, env, mode):
    """RMSNorm, SwiGLU and rotary embedding kernels against numpy float64 (transformers' formulas)."""
    env.setenv("LLAVA_KERNEL", "native")
    env.setenv("LLAVA_KERNEL_ISA", path)
    for maker, inputs, ref in per_token_cases(np.random.default_rng(17)):
        y = maker()(*map(Tensor, inputs)).asnumpy()
        assert y.shape == ref.shape and y.dtype == np.float32
        err = np.abs(y - ref).max()
        assert err <= 1e-5 * max(1.0, np.abs(ref).max()), (path, maker.__name__, inputs[0].shape, err)


# Calls straight into the built library through ctypes (which releases the GIL), so Python threads and a
# forked child call the kernel at the same time as each other: the worker pool must serve one caller at a
# time, let the others start their own threads, and be rebuilt in a child (it has none of the parent's
# threads). Each output is one thread's fixed-order dot product, so every call gives the same bits.
POOL_SCRIPT = r"""
import ctypes, os, sys, threading
import numpy as np
lib = ctypes.CDLL(sys.argv[1])

def matmul(x, w):
    y = np.zeros((x.shape[0], w.shape[0]), np.float32)
    arrs = [x, w, y]
    params = (ctypes.c_void_p * 3)(*[a.ctypes.data for a in arrs])
    ndims = (ctypes.c_int * 3)(2, 2, 2)
    dims = [(ctypes.c_int64 * 2)(*a.shape) for a in arrs]
    shapes = (ctypes.POINTER(ctypes.c_int64) * 3)(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims])
    kinds = (ctypes.c_char_p * 3)(b"float32", b"float16", b"float32")
    assert lib.LlavaLowbitMatmul(3, params, ndims, shapes, kinds, None, None) == 0
    return y

rng = np.random.default_rng(1)
x = rng.standard_normal((1, 1500)).astype(np.float32)
w = rng.standard_normal((1001, 1500)).astype(np.float16)
ref = x.astype(np.float64) @ w.astype(np.float64).T
first = matmul(x, w)
assert np.abs(first - ref).max() < 1e-3, np.abs(first - ref).max()
bad = []

def hammer():
    for _ in range(200):
        if not np.array_equal(matmul(x, w), first):
            bad.append(1)

threads = [threading.Thread(target=hammer) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not bad, len(bad)
pid = os.fork()
if pid == 0:
    os._exit(0 if all(np.array_equal(matmul(x, w), first) for _ in range(50)) else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
print("ok")
"""


def test_concurrent_callers_and_a_forked_child_get_the_same_answer(env):
    env.setenv("LLAVA_KERNEL", "native")
    env.setenv("LLAVA_KERNEL_THREADS", "2")
    proc = subprocess.run([sys.executable, "-c", POOL_SCRIPT, kernels.native_library()], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_without_the_native_library_the_attention_and_per_token_makers_are_none(env):
    env.setenv("LLAVA_KERNEL", "fallback")
    assert kernels.make_prompt_attention() is None
    assert kernels.make_paged_attention() is None
    assert kernels.make_rms_norm() is None and kernels.make_swiglu() is None and kernels.make_rotary() is None


# (B rows, Lq queries, Lk keys, H query heads, kv heads, D head_dim, left padding of the last row): causal
# prompts with grouped and plain heads, head_dim below / not a multiple of the vector width, a query count
# that is not a multiple of the 4-query block, left-padded rows (pad queries attend to nothing), and the
# last query alone (Lq = 1, the prompt's last layer)
PROMPT_SHAPES = [(1, 5, 5, 4, 4, 16, 0), (2, 33, 33, 6, 2, 24, 7), (1, 1, 20, 8, 1, 7, 0),
                 (2, 1, 37, 4, 2, 64, 5), (1, 70, 70, 32, 32, 128, 0)]


def prompt_case(rng, b, lq, lk, h, kv, d, pad):
    q = rng.standard_normal((b * lq, h, d)).astype(np.float32)
    k = rng.standard_normal((b * lk, kv, d)).astype(np.float32)
    v = rng.standard_normal((b * lk, kv, d)).astype(np.float32)
    causal = np.tril(np.ones((lk, lk), np.int32))[lk - lq:]              # the queries are the last lq tokens
    mask = np.repeat(causal[None], b, 0)
    mask[-1, :, :pad] = 0                                                # the last row's left padding
    mask[-1, :max(0, pad - (lk - lq))] = 0                               # its pad queries attend to nothing
    ref = np.zeros((b * lq, h, d))
    for bi in range(b):
        for hi in range(h):
            g = hi // (h // kv)
            scores = q[bi * lq:(bi + 1) * lq, hi].astype(np.float64) @ k[bi * lk:(bi + 1) * lk, g].astype(np.float64).T
            scores = np.where(mask[bi] == 1, scores, -np.inf)
            scores[~mask[bi].any(1)] = 0.0                               # all masked: equal weights
            p = np.exp(scores - scores.max(1, keepdims=True))
            ref[bi * lq:(bi + 1) * lq, hi] = (p / p.sum(1, keepdims=True)) @ v[bi * lk:(bi + 1) * lk, g]
    return (q, k, v, mask), ref


# (H query heads, kv heads, D head_dim, BS positions per block, tokens in call order as (table row, L0, n)
# groups: n tokens of the row attending L0, L0 + 1, ... positions (a prompt chunk; L0 > 1 has cached positions
# before it; n = 1 a decode token); L0 = 0: n padding tokens): grouped and plain heads, head_dim below / not a
# multiple of the vector width, blocks of 1, 4, 16 positions, chunks not a multiple of the query block, chunks
# ending on and crossing block edges, and a decode token of a row next to (not continuing) a chunk of it
PAGED_SHAPES = [(4, 4, 16, 4, ((0, 1, 6), (1, 9, 1), (2, 0, 1), (2, 5, 4))),
                (6, 2, 24, 16, ((0, 1, 33), (1, 40, 1), (3, 0, 2), (2, 10, 7), (4, 17, 1))),
                (8, 1, 7, 1, ((0, 3, 5), (1, 1, 1), (0, 0, 2), (2, 4, 1), (2, 9, 3), (3, 2, 2))),
                (32, 32, 128, 16, ((0, 1, 20), (1, 70, 1), (2, 30, 9), (3, 0, 1), (4, 45, 1), (5, 1, 1)))]


def paged_tokens(groups):
    return np.array([(r, l0 + j if l0 else 0) for r, l0, n in groups for j in range(n)], np.int32)


def paged_rows(tokens, tables, kv, bs):
    """Per token, its attended cache rows [kv, L] (row (block * kv + g) * bs + offset of positions 0..L-1)."""
    out = []
    for r, length in tokens:
        p = np.arange(length)
        out.append((tables[r, p // bs][None] * kv + np.arange(kv)[:, None]) * bs + p % bs)
    return out


def paged_case(rng, h, kv, d, bs, groups):
    """Each table row's blocks a random scattering of a shuffled permutation of blocks 1..NB-1 (block 0 and a
    few others belong to nobody), one spare table entry per row; float64 reference per token and head."""
    tokens = paged_tokens(groups)
    rows = int(tokens[:, 0].max()) + 1
    mb = -(-int(tokens[:, 1].max()) // bs) + 1
    nb = 1 + rows * mb + 3
    tables = rng.permutation(np.arange(1, nb))[:rows * mb].reshape(rows, mb).astype(np.int32)
    q = rng.standard_normal((len(tokens), h, d)).astype(np.float32)
    k = rng.standard_normal((nb * kv * bs, d)).astype(np.float32)
    v = rng.standard_normal((nb * kv * bs, d)).astype(np.float32)
    ref = np.zeros((len(tokens), h, d))
    for i, at in enumerate(paged_rows(tokens, tables, kv, bs)):
        for hi in range(h):
            if at.shape[1]:
                g = at[hi // (h // kv)]
                scores = k[g].astype(np.float64) @ q[i, hi].astype(np.float64)
                p = np.exp(scores - scores.max())
                ref[i, hi] = (p / p.sum()) @ v[g].astype(np.float64)
    return (q, k, v, tokens, tables, np.array([kv, bs], np.int32)), ref


# per kind: (maker, case builder, shapes, the shape's tolerance against float64)
ATTENTION_KERNELS = {
    "prompt": (kernels.make_prompt_attention, prompt_case, PROMPT_SHAPES, lambda s: 2e-5 * (1 + s[2] / 64)),
    "paged": (kernels.make_paged_attention, paged_case, PAGED_SHAPES,
              lambda s: 2e-5 * (1 + paged_tokens(s[4])[:, 1].max() / 64)),
}


@pytest.mark.parametrize("kind", sorted(ATTENTION_KERNELS))
@pytest.mark.parametrize("path", PATHS)
def test_attention_kernels_match_float64(kind, path, env, mode):
    """prompt: causal masks, padded rows, grouped heads, the last query alone; paged: prompt chunks, decode
    tokens and padding of several rows in one call through scattered blocks. All against numpy float64."""
    env.setenv("LLAVA_KERNEL", "native")
    env.setenv("LLAVA_KERNEL_ISA", path)
    maker, case, shapes, tolerance_of = ATTENTION_KERNELS[kind]
    rng = np.random.default_rng(11)
    op = maker()
    for shape in shapes if mode == "pynative" else shapes[1:2]:
        args, ref = case(rng, *shape)
        y = op(*map(Tensor, args)).asnumpy()
        assert y.shape == ref.shape and y.dtype == np.float32
        assert np.abs(y - ref).max() <= tolerance_of(shape), (path, kind, shape, np.abs(y - ref).max())


@pytest.mark.parametrize("path", PATHS)
def test_paged_attention_reads_only_each_tokens_positions(path, env):
    """Per token: every cache row outside its own attended positions (other rows' blocks, unused blocks, its
    row's positions >= L, which later tokens of its chunk attend) rewritten with large values leaves its output
    bit for bit the same; and 1 or 2 threads give the same bits (each output is one thread's fixed-order sum)."""
    env.setenv("LLAVA_KERNEL", "native")
    env.setenv("LLAVA_KERNEL_ISA", path)
    rng = np.random.default_rng(23)
    op = kernels.make_paged_attention()
    for shape in (PAGED_SHAPES[1], PAGED_SHAPES[3]):
        (q, k, v, tokens, tables, layout), _ = paged_case(rng, *shape)
        base = op(*map(Tensor, (q, k, v, tokens, tables, layout))).asnumpy()
        for i, at in enumerate(paged_rows(tokens, tables, *layout)):
            other = np.ones(len(k), bool)
            other[at.ravel()] = False
            k2, v2 = k.copy(), v.copy()
            k2[other] = rng.standard_normal((other.sum(), k.shape[1])) * 1e4
            v2[other] = rng.standard_normal((other.sum(), k.shape[1])) * 1e4
            y = op(*map(Tensor, (q, k2, v2, tokens, tables, layout))).asnumpy()
            np.testing.assert_array_equal(y[i], base[i], err_msg=f"{path} {shape[:4]} token {i}")
        for threads in ("1", "2"):
            env.setenv("LLAVA_KERNEL_THREADS", threads)
            np.testing.assert_array_equal(op(*map(Tensor, (q, k, v, tokens, tables, layout))).asnumpy(), base)
        env.delenv("LLAVA_KERNEL_THREADS")


def call_entry(name, arrays, out):
    """The library's ops.Custom entry `name` called through ctypes on numpy arrays (inputs, then out) -> its
    return code."""
    import ctypes
    arrs = [*arrays, out]
    params = (ctypes.c_void_p * len(arrs))(*[a.ctypes.data for a in arrs])
    ndims = (ctypes.c_int * len(arrs))(*[a.ndim for a in arrs])
    dims = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrs]
    shapes = (ctypes.POINTER(ctypes.c_int64) * len(arrs))(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64))
                                                           for d in dims])
    kinds = (ctypes.c_char_p * len(arrs))(*[str(a.dtype).encode() for a in arrs])
    return getattr(ctypes.CDLL(kernels.native_library()), name)(len(arrs), params, ndims, shapes, kinds, None, None)


def test_paged_attention_rejects_bad_tokens_tables_and_shapes(env):
    """Non-zero (MindSpore raises) for a table row outside tables, L < 0 or past the table's MB * BS
    positions, a block id of an attended position outside the pool, and mismatched shapes or dtypes."""
    env.setenv("LLAVA_KERNEL", "native")
    (q, k, v, tokens, tables, layout), ref = paged_case(np.random.default_rng(3), *PAGED_SHAPES[0])
    out = np.zeros_like(q)
    assert call_entry("LlavaPagedAttention", (q, k, v, tokens, tables, layout), out) == 0
    assert np.abs(out - ref).max() < 1e-4
    bs, mb = int(layout[1]), tables.shape[1]
    for change in ((0, 0, len(tables)), (0, 0, -1), (0, 1, mb * bs + 1), (0, 1, -1)):
        bad = tokens.copy()
        bad[change[0], change[1]] = change[2]
        assert call_entry("LlavaPagedAttention", (q, k, v, bad, tables, layout), out) != 0, change
    for block in (-1, len(k) // (int(layout[0]) * bs)):
        bad = tables.copy()
        bad[tokens[0, 0], 0] = block
        assert call_entry("LlavaPagedAttention", (q, k, v, tokens, bad, layout), out) != 0, block
    assert call_entry("LlavaPagedAttention", (q, k[:-1], v[:-1], tokens, tables, layout), out) != 0
    assert call_entry("LlavaPagedAttention", (q, k, v, tokens[:-1], tables, layout), out) != 0
    assert call_entry("LlavaPagedAttention", (q, k, v, tokens.astype(np.int64), tables, layout), out) != 0
    assert call_entry("LlavaPagedAttention", (q, k, v, tokens, tables, np.array([3, bs], np.int32)), out) != 0


def quantized_weights(rng, kind, n, k):
    """(stored tensors, float64 W) of random int8 (one scale per row) or int4 weights."""
    if kind == "int8":
        q = rng.integers(-127, 128, (n, k)).astype(np.int8)
        s = (rng.random((n, 1)) * 0.02 + 1e-3).astype(np.float32)
        return (Tensor(q), Tensor(s)), q.astype(np.float64) * s
    groups = -(-k // 32)
    packed = rng.integers(0, 256, (n, groups * 16)).astype(np.uint8)
    s16 = (rng.random((n, groups)) * 0.2 + 0.01).astype(np.float16)
    return (Tensor(packed), Tensor(s16)), int4_reference(packed, s16, k)


@pytest.mark.skipif(not VNNI, reason="needs AVX512-VNNI")
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_int8_prefill_equals_its_definition_on_odd_shapes(kind, env):
    """LLAVA_KERNEL_PREFILL=int8: rows of x past the decode rows are quantized per row, d = max|x| / 127 and
    xq = rint(x * (127 / max|x|)), and y = d * (xq @ W.T): equal to that definition in float64 (allowing two
    inputs per row to round the other way), and measurably not the float path's x @ W.T."""
    env.setenv("LLAVA_KERNEL", "native")
    env.setenv("LLAVA_KERNEL_PREFILL", "int8")
    rng = np.random.default_rng(11)
    for m, n, k in [(5, 33, 16), (7, 17, 33), (13, 70, 517), (65, 100, 33), (30, 64, 1), (12, 32, 256),
                    (40, 65, 1030), (600, 40, 4100)]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[0] = 0.0                                                  # an all-zero row: d = 0
        stored, w = quantized_weights(rng, kind, n, k)
        amax = np.abs(x).max(1, keepdims=True)
        inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
        xq = np.rint(x * inv).astype(np.float64)
        d = (amax / np.float32(127)).astype(np.float64)
        ref = d * (xq @ w.T)
        y = run(x, stored)
        slack = 1e-5 * max(1.0, np.abs(ref).max()) * (1 + k / 256) + 2 * d * np.abs(w).max()
        assert (np.abs(y - ref) <= slack).all(), f"{kind} M={m} N={n} K={k}: {np.abs(y - ref).max()}"
        if k >= 256:
            assert np.abs(y - x.astype(np.float64) @ w.T).max() > 1e-3 * np.abs(ref).max(), "not quantized"


def test_int4_matmul_rejects_shapes_and_dtypes_that_do_not_fit(env):
    """Non-zero for packed columns or scale groups other than ceil(K / 32) (* 16), a float32 scale, and a
    missing scale; 0 on the fitting call."""
    env.setenv("LLAVA_KERNEL", "native")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 70)).astype(np.float32)
    w = rng.integers(0, 256, (5, 48)).astype(np.uint8)
    s = np.ones((5, 3), np.float16)
    y = np.zeros((3, 5), np.float32)
    assert call_entry("LlavaLowbitMatmul", (x, w, s), y) == 0
    assert np.abs(y - x.astype(np.float64) @ int4_reference(w, s, 70).T).max() < 1e-3
    assert call_entry("LlavaLowbitMatmul", (x, w[:, :32], s), y) != 0
    assert call_entry("LlavaLowbitMatmul", (x, w, s[:, :2]), y) != 0
    assert call_entry("LlavaLowbitMatmul", (x, w, s.astype(np.float32)), y) != 0
    assert call_entry("LlavaLowbitMatmul", (x, w), y) != 0


def test_unknown_or_unavailable_isa_is_a_clear_error(env):
    env.setenv("LLAVA_KERNEL", "native")
    env.setenv("LLAVA_KERNEL_ISA", "sse9")
    with pytest.raises(LlavaError, match=r"LLAVA_KERNEL_ISA='sse9' is not a kernel path this machine can run"):
        kernels.make_matmul(True)
    env.setenv("LLAVA_KERNEL", "fast")
    with pytest.raises(LlavaError, match=r"LLAVA_KERNEL='fast' must be one of auto, native, fallback"):
        kernels.make_matmul(True)
    env.setenv("LLAVA_KERNEL", "native")
    env.delenv("LLAVA_KERNEL_ISA")
    env.setenv("LLAVA_KERNEL_PREFILL", "int7")
    with pytest.raises(LlavaError, match=r"^LLAVA_KERNEL_PREFILL='int7' must be one of float, int8$"):
        kernels.make_matmul(True)


def test_library_is_built_once_into_the_cache(env, tmp_path):
    """Two processes building into an empty cache at once: both load a library, one folder remains, no
    temporary left; a later call reuses the file without compiling."""
    env.setenv("LLAVA_KERNEL_CACHE", str(tmp_path))
    code = ("import sys; sys.path.insert(0, %r); from lowbit_kernels import build; print(build.library_path())"
            % os.path.dirname(build.SOURCE).rsplit(os.sep, 1)[0])
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ)) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    lib = paths.pop()
    assert os.path.isfile(lib) and lib.startswith(str(tmp_path / "kernels"))
    assert os.listdir(tmp_path / "kernels") == [os.path.basename(os.path.dirname(lib))]
    before = os.stat(lib).st_mtime_ns
    assert build.library_path() == lib and os.stat(lib).st_mtime_ns == before


def test_without_a_compiler_native_is_an_error_and_auto_falls_back_once(env, tmp_path, capsys):
    env.setenv("LLAVA_KERNEL_CACHE", str(tmp_path))            # nothing built there yet
    env.setenv("PATH", str(tmp_path))                          # no g++ / c++ to be found
    env.delenv("CXX", raising=False)
    env.setenv("LLAVA_KERNEL", "auto")
    rng = np.random.default_rng(5)
    (name, x, stored, ref), *_ = cases(rng, 5, 17, 33)
    first = kernels.make_matmul(True)
    second = kernels.make_matmul(False)
    assert not first.native and not second.native
    err = capsys.readouterr().err
    assert err.count("using the slow MindSpore fallback") == 1 and "no C++ compiler found" in err
    assert np.abs(run(x, stored) - ref).max() <= tolerance(x, stored, ref)
    env.setenv("LLAVA_KERNEL", "native")
    with pytest.raises(LlavaError, match=r"^no C\+\+ compiler found \(set CXX or install g\+\+\)"):
        kernels.make_matmul(True)
