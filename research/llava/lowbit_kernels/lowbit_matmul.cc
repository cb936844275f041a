// y[M, N] = x[M, K] @ W[N, K].T for weights stored in low precision, read in their stored form:
//   int8  (symmetric, float32 scales [N, groups]: groups = 1 is one scale per output channel),
//   int4  (uint8 [N, ceil(K / 32) * 16]: groups of 32 inputs, llama.cpp's q4_0 block layout, float16 scales
//          [N, ceil(K / 32)]; the layout is defined in weights/quantize.py),
//   float16, bfloat16; and float32 (MindSpore's CPU MatMul reads a float32 weight at well under memory speed
//   for a single row of x, so decode steps of float32 models use the streaming path below too).
// No float32 copy of W is ever made: decode (few rows of x) converts each weight vector in registers as it
// streams from memory; prefill (many rows) converts a KC x NR panel of W into a small float32 scratch that
// stays in L1/L2 and runs a register-blocked MR x NR micro-kernel over all rows of x against it, so every
// converted weight is used M times.
//
// The instruction set is chosen at run time (__builtin_cpu_supports): AVX-512F, AVX2+FMA+F16C, or plain C++.
// One generic body (the part after `#else` at the end) is compiled three times, once per target, by
// including this file into itself (so it must keep its name) inside `#pragma GCC target` regions: the
// compiler needs each ISA's intrinsics to be defined in functions compiled for that ISA.
// LLAVA_KERNEL_ISA=avx512|avx2|scalar forces a path (tests use it; an unsupported choice is an error),
// LLAVA_KERNEL_THREADS caps the threads, LLAVA_KERNEL_PREFILL=int8 multiplies prefill rows of int8 / int4
// weights on AVX512-VNNI int8 dot products (isa_vnni below; default float).
//
// Entry points for MindSpore's ops.Custom(func_type="aot") on CPU: LlavaLowbitMatmul, LlavaPromptAttention,
// LlavaPagedAttention (prompt chunks and decode tokens over a paged KV pool, read in place through the block
// tables) and the per-token steps (LlavaRmsNorm, LlavaSwiGlu, LlavaRotary).
#ifndef LLAVA_KERNEL_GENERIC_BODY
#if defined(__x86_64__) || defined(__i386__)
#define LLAVA_X86 1
#include <immintrin.h>
#else
#define LLAVA_X86 0  // other CPUs build the portable path only
#endif
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

struct Q8 { using T = int8_t; };    // int8 weight, scaled
struct Q4 { using T = uint8_t; };   // int4 weight: two per byte, a float16 scale per group of Q4_GROUP inputs
constexpr int64_t Q4_GROUP = 32;    // inputs per int4 group (weights/quantize.py's INT4_GROUP)
constexpr int64_t Q4_BYTES = Q4_GROUP / 2;
struct H16 { using T = uint16_t; }; // IEEE half
struct B16 { using T = uint16_t; }; // bfloat16
struct F32 { using T = float; };    // float32: decode (few rows of x) streams it like the others

float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half -> normal float
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float bf16_to_float(uint16_t b) {
  uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Problem {
  int64_t M, N, K;
  const float* x;      // [M, K]
  const void* w;       // [N, K]
  const float* scale;  // [N, groups] for int8, else null
  int64_t groups;      // scales per output row (int8 and int4), 1 otherwise
  const uint16_t* scale16;  // [N, groups] float16 for int4, else null
  float* y;            // [M, N]
};

struct Prompt {
  int64_t B, Lq, Lk;    // batch rows, queries and keys per row (the queries are the last Lq of the Lk tokens)
  int64_t H, kv, D;     // query heads, KV heads, head_dim
  const float* q;       // [B * Lq, H, D], already scaled by 1/sqrt(D)
  const float* k;       // [B * Lk, kv, D]
  const float* v;       // same layout
  const int32_t* mask;  // [B, Lq, Lk]: 1 = the query attends to the key
  float* out;           // [B * Lq, H, D]
  const int64_t* last;  // [B * Lq]: 1 + the last key each query attends to, 0 for none (set by the kernel)
};

// Rows t = 0, 1, ... of one head's keys or values in a cache array: row t starts at float
// seg[t / len] + (t % len) * stride. A prompt's token-major k / v are one segment, the paged pool a segment per
// block.
struct Rows {
  const int64_t* seg;
  int64_t len, stride;
};

struct Run {            // tokens [first, first + n) of table row r, token j attending positions [0, L0 + j)
  int64_t first, n, r, L0;
};

struct Paged {
  int64_t H, D, kv, BS, MB;  // query heads, head_dim, KV heads, positions per block, blocks per table row
  const float* q;       // [N, H, D], already scaled by 1/sqrt(D)
  const float* k;       // [NB * kv * BS, D]: position o of KV head g in block b is row (b * kv + g) * BS + o
  const float* v;       // same layout
  const int32_t* tables;  // [R, MB]: position p of row r is in block tables[r, p / BS]
  const Run* runs;      // the tokens with L > 0, in order (a single token is a run of 1)
  int64_t nruns;
  float* out;           // [N, H, D]
};

// Threads: LLAVA_KERNEL_THREADS, else the CPUs this process may run on, and only when the work is large
// enough to pay for them. Our own pool rather than OpenMP: on a loaded 2-core machine (other processes,
// MindSpore's own pool) libgomp's spinning barriers cost 20-34 ms per call in our measurement (1024x1024
// int8, M=1), and a second OpenMP runtime in MindSpore's process is avoided.
int thread_count(double work) {
  int n = 0;
  if (const char* env = std::getenv("LLAVA_KERNEL_THREADS")) n = std::atoi(env);
  if (n <= 0) {
    cpu_set_t set;
    n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  }
  if (work < 256.0 * 1024.0) return 1;
  return std::max(1, std::min(n, 64));
}

// Worker threads kept between calls. A decode step makes hundreds of kernel calls of 0.1-3 ms each;
// starting and joining a thread per call cost 5-10 % of a `mid` decode step. After a job a worker spins for
// SPIN_US (the next call usually comes within that: the ops between two matmuls are small), then sleeps on
// a condition variable. One caller at a time: a concurrent caller (MindSpore may run independent ops side
// by side) gets false and starts its own threads. Never destroyed (threads blocked at exit must not see
// their condition variable go), and rebuilt in a forked child, which has none of the parent's threads.
class Pool {
 public:
  static constexpr int SPIN_US = 100;

  static Pool& get() {
    static Pool* pool = nullptr;
    static pid_t owner = 0;
    static std::mutex made;
    std::lock_guard<std::mutex> lock(made);
    if (pool == nullptr || owner != getpid()) {
      pool = new Pool();  // a forked child's copy of the old pool has no threads: leave it
      owner = getpid();
    }
    return *pool;
  }

  // Runs job(t) for t in [1, n) on the workers and job(0) on the caller; false (nothing run) when busy.
  bool run(int n, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> mine(calling_, std::try_to_lock);
    if (!mine.owns_lock()) return false;
    while (int(workers_) < n - 1) {
      // started with the current generation: the job published below is its first
      std::thread(&Pool::work, this, int(workers_) + 1, gen_.load(std::memory_order_acquire)).detach();
      ++workers_;
    }
    job_ = &job;
    active_ = n;
    pending_.store(n - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job(0);
    while (pending_.load(std::memory_order_acquire) != 0) pause();
    return true;
  }

 private:
  static void pause() {
#if LLAVA_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  void work(int index, uint64_t seen) {
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; gen_.load(std::memory_order_acquire) == seen; ++i) {
        if ((i & 255) == 255 &&
            std::chrono::steady_clock::now() - start > std::chrono::microseconds(SPIN_US)) {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return gen_.load(std::memory_order_acquire) != seen; });
          break;
        }
        pause();
      }
      seen = gen_.load(std::memory_order_acquire);
      if (index < active_) {
        (*job_)(index);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex calling_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int)>* job_ = nullptr;
  int active_ = 0;
  size_t workers_ = 0;
};

// Splits [0, units) into `threads` contiguous ranges and runs f(begin, end) on each (the caller's thread
// takes the first).
template <class F>
void parallel_ranges(int64_t units, int threads, F f) {
  threads = int(std::min<int64_t>(threads, units));
  if (threads <= 1) {
    if (units > 0) f(int64_t(0), units);
    return;
  }
  const std::function<void(int)> part = [&](int t) { f(units * t / threads, units * (t + 1) / threads); };
  if (Pool::get().run(threads, part)) return;
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(part, t);
  part(0);
  for (auto& th : pool) th.join();
}

// parallel_ranges over units [0, cost.size() - 1) split by cost instead of count: cost is the prefix sum of the
// units' costs (cost[0] = 0); each thread gets one contiguous range of about equal cost.
template <class F>
void parallel_costed(const std::vector<double>& cost, int threads, F f) {
  const int64_t units = int64_t(cost.size()) - 1;
  threads = int(std::min<int64_t>(threads, units));
  if (threads <= 1) {
    if (units > 0) f(int64_t(0), units);
    return;
  }
  std::vector<int64_t> cut(size_t(threads) + 1, units);
  cut[0] = 0;
  for (int t = 1; t < threads; ++t)
    cut[t] = std::lower_bound(cost.begin(), cost.end(), cost.back() * t / threads) - cost.begin();
  parallel_ranges(threads, threads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      if (cut[t] < cut[t + 1]) f(cut[t], cut[t + 1]);
  });
}

}  // namespace

// exp(x) = 2^n * exp(r), r = x - n ln 2 (ln 2 in two parts), exp(r) by Cephes' expf polynomial; the body
// of each vector path's exp_poly, written with that path's own fma / mul / bcast.
#define LLAVA_EXP_POLY(x, n)                                   \
  reg r = fma(n, bcast(-0.693359375f), x);                     \
  r = fma(n, bcast(2.12194440e-4f), r);                        \
  reg p = bcast(1.9875691500e-4f);                             \
  p = fma(p, r, bcast(1.3981999507e-3f));                      \
  p = fma(p, r, bcast(8.3334519073e-3f));                      \
  p = fma(p, r, bcast(4.1665795894e-2f));                      \
  p = fma(p, r, bcast(1.6666665459e-1f));                      \
  p = fma(p, r, bcast(5.0000001201e-1f));                      \
  return fma(p, mul(r, r), r) + bcast(1.0f);

#define LLAVA_KERNEL_GENERIC_BODY 1

#if LLAVA_X86
// ------------------------------------------------------------------ AVX-512F (16 floats per register)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace isa_avx512 {
struct V {
  using reg = __m512;
  static constexpr int W = 16;
  // 12 x 2 accumulators of 32 registers: measured 6 / 8 / 10 / 12 / 14 rows within noise of each other
  // (~105-120 GFLOP/s per core at M=600); 12 leaves the most reuse per loaded weight register.
  static constexpr int MR = 12;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg bcast(float v) { return _mm512_set1_ps(v); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static float sum(reg v) { return _mm512_reduce_add_ps(v); }
  static reg exp_poly(reg x, reg n) {
    LLAVA_EXP_POLY(x, n)
  }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  // s where m != 0, else fill
  static reg keep(const int32_t* m, reg s, reg fill) {
    const __m512i mv = _mm512_loadu_si512(m);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(mv, mv), fill, s);
  }
  static float hmax(reg v) { return _mm512_reduce_max_ps(v); }
  // exp (Cephes' polynomial, ~1 ulp); exactly 0 below -87.3 so that masked scores give nothing
  static reg exp(reg x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
    x = _mm512_min_ps(x, _mm512_set1_ps(88.3f));
    const reg n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(exp_poly(x, n), n));
  }
  static reg lw(Q8, const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static reg lw(H16, const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static reg lw(B16, const uint16_t* p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
  static float sw(Q8, int8_t v) { return float(v); }
  static float sw(H16, uint16_t v) { return _cvtsh_ss(v); }
  // one whole int4 group (16 bytes) -> its 32 values q = nibble - 8 in input order, in 32 / W registers
  static void q4(const uint8_t* p, reg* out) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i eight = _mm512_set1_epi32(8);
    out[0] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(15)), eight));
    out[1] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
  }
  // the same group's stored nibbles u = q + 8 (decode takes the 8 off once per row: see gemv_q4_rows)
  static void q4u(const uint8_t* p, reg* out) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    out[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  }
  static reg lw(F32, const float* p) { return _mm512_loadu_ps(p); }
  static float sw(B16, uint16_t v) { return bf16_to_float(v); }
  static float sw(F32, float v) { return v; }
};
#include "lowbit_matmul.cc"  // this very file (found next to itself), as the generic body
}  // namespace isa_avx512
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX-512 VNNI: prefill on int8 dot products
// Opt-in (LLAVA_KERNEL_PREFILL=int8): rows of x past GEMV_ROWS are quantized per row to int8 (symmetric,
// d = max|x[m]| / 127, x ~= d * xq) and multiplied with the int8 / int4 weights by vpdpbusd (64 byte products
// per instruction, against 16 float FMAs per vfmadd): y[m, n] = d[m] * sum_g s[n, g] * (xq[m, g] . q[n, g])
// for the weight's scale groups g (int8: one per row; int4: 32 inputs). vpdpbusd multiplies unsigned by
// signed bytes, so x goes in as xq + 128 (1..255) and the extra 128 * sum_k q[n, k] of each group is taken
// off once per column and K panel (`corr`, made while packing). The decode rows (M <= GEMV_ROWS) keep the
// float paths: exact against the dequantized weights, and memory-bound anyway.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace isa_vnni {
constexpr int MR = 6;        // x rows per micro-kernel: 6 x 2 int32 and 6 x 2 float accumulators of 32 registers
constexpr int NR = 32;       // columns per micro-kernel: two registers of 16
constexpr int64_t KC = 512;  // inputs per K panel: a multiple of Q4_GROUP; 512 x 32 weight bytes = 16 KiB in L1

// Rows [m0, m1) of x -> xu [m][Kp] = rint(x / d[m]) + 128 (inputs K..Kp-1 are 128, i.e. 0), d[m].
void quantize_rows(const Problem& p, int64_t Kp, uint8_t* xu, float* dx, int64_t m0, int64_t m1) {
  const int64_t K = p.K;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = p.x + m * K;
    uint8_t* u = xu + m * Kp;
    __m512 mx = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
    float amax = _mm512_reduce_max_ps(mx);
    for (; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    dx[m] = amax / 127.0f;
    const __m512 iv = _mm512_set1_ps(inv);
    const __m512i bias = _mm512_set1_epi32(128);
    for (k = 0; k + 16 <= K; k += 16) {  // cvtps rounds to nearest even (the default MXCSR), as rint
      const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), iv)), bias);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(u + k), _mm512_cvtepi32_epi8(q));
    }
    for (; k < K; ++k) u[k] = uint8_t(int(std::nearbyint(xr[k] * inv)) + 128);
    for (; k < Kp; ++k) u[k] = 128;
  }
}

// Weight columns [n0, n0 + NR) x inputs [k0, k0 + kc) (kc a multiple of 4) -> wpack [kc / 4][NR] of 4 signed
// bytes (inputs k..k+3 of column j), spack [groups][NR] float scales per group (int4: 32 inputs; int8: the
// panel), corr [NR] = 128 * sum_g s[j, g] * sum(q[j, g]). Columns past N and inputs past K are zeros (int4's
// groups are unpacked whole, a partial last group's padding set to 0).
template <bool INT4>
void pack_weights(const Problem& p, int64_t n0, int64_t k0, int64_t kc, int8_t* wpack, float* spack, float* corr) {
  const int64_t K = p.K;
  const int64_t ng = INT4 ? (kc + Q4_GROUP - 1) / Q4_GROUP : 1;
  int32_t* w32 = reinterpret_cast<int32_t*>(wpack);
  for (int j = 0; j < NR; ++j) {
    const int64_t n = n0 + j;
    corr[j] = 0.0f;
    if (n >= p.N) {
      for (int64_t k4 = 0; k4 < ng * (INT4 ? Q4_GROUP / 4 : kc / 4); ++k4) w32[k4 * NR + j] = 0;
      for (int64_t g = 0; g < ng; ++g) spack[g * NR + j] = 0.0f;
      continue;
    }
    if (INT4) {
      const uint8_t* wr = static_cast<const uint8_t*>(p.w) + n * p.groups * Q4_BYTES;
      const __m128i low = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t gi = k0 / Q4_GROUP + g;            // k0 is a multiple of KC, so of Q4_GROUP
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + gi * Q4_BYTES));
        const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        const __m128i sad = _mm_add_epi64(_mm_sad_epu8(lo, _mm_setzero_si128()), _mm_sad_epu8(hi, _mm_setzero_si128()));
        int sum = int(_mm_cvtsi128_si64(sad) + _mm_extract_epi64(sad, 1)) - 8 * int(Q4_GROUP);
        alignas(16) int32_t q[8];
        _mm_store_si128(reinterpret_cast<__m128i*>(q), _mm_sub_epi8(lo, eight));
        _mm_store_si128(reinterpret_cast<__m128i*>(q + 4), _mm_sub_epi8(hi, eight));
        const int64_t valid = K - gi * Q4_GROUP;
        if (valid < Q4_GROUP) {  // the last, partial group: whatever its padding nibbles hold counts as 0
          int8_t* qb = reinterpret_cast<int8_t*>(q);
          for (int64_t t = valid; t < Q4_GROUP; ++t) {
            sum -= qb[t];
            qb[t] = 0;
          }
        }
        for (int t = 0; t < 8; ++t) w32[(g * 8 + t) * NR + j] = q[t];
        const float s = _cvtsh_ss(p.scale16[n * p.groups + gi]);
        spack[g * NR + j] = s;
        corr[j] += 128.0f * s * float(sum);
      }
    } else {
      const int8_t* wr = static_cast<const int8_t*>(p.w) + n * K + k0;
      int64_t sum = 0;
      if (k0 + kc <= K) {
        __m512i acc = _mm512_setzero_si512();
        const __m512i ones = _mm512_set1_epi8(1);
        int64_t k = 0;
        for (; k + 64 <= kc; k += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(wr + k));
        sum = _mm512_reduce_add_epi32(acc);
        for (; k < kc; ++k) sum += wr[k];
        for (int64_t k4 = 0; k4 < kc / 4; ++k4) std::memcpy(&w32[k4 * NR + j], wr + 4 * k4, 4);
      } else {  // the last panel of a K that is not a multiple of 4
        for (int64_t k = 0; k < kc; ++k) {
          const int q = k0 + k < K ? wr[k] : 0;
          wpack[(k / 4 * NR + j) * 4 + k % 4] = int8_t(q);
          sum += q;
        }
      }
      spack[j] = p.scale[n];
      corr[j] = 128.0f * p.scale[n] * float(sum);
    }
  }
}

// C[mr, NR] (+)= dx[i] * (sum over groups of gk4 x 4 inputs: spack[g] * (apack . wpack) - corr), apack [k4][MR]
// (4 unsigned bytes of row i's inputs), only the first mr rows and nn columns written.
void micro(int64_t k4n, int64_t gk4, const int32_t* apack, const int8_t* wpack, const float* spack,
           const float* corr, const float* dx, float* C, int64_t ldc, int mr, int nn, bool accumulate) {
  __m512 f0[MR], f1[MR];
  const __m512 c0 = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(corr));
  const __m512 c1 = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(corr + 16));
  for (int i = 0; i < MR; ++i) { f0[i] = c0; f1[i] = c1; }
  for (int64_t g0 = 0, g = 0; g0 < k4n; g0 += gk4, ++g) {
    __m512i a0[MR], a1[MR];
    for (int i = 0; i < MR; ++i) { a0[i] = _mm512_setzero_si512(); a1[i] = _mm512_setzero_si512(); }
    const int64_t g1 = std::min(k4n, g0 + gk4);
    for (int64_t k4 = g0; k4 < g1; ++k4) {
      const __m512i b0 = _mm512_loadu_si512(wpack + k4 * NR * 4);
      const __m512i b1 = _mm512_loadu_si512(wpack + k4 * NR * 4 + 64);
      const int32_t* a = apack + k4 * MR;
      for (int i = 0; i < MR; ++i) {
        const __m512i ai = _mm512_set1_epi32(a[i]);
        a0[i] = _mm512_dpbusd_epi32(a0[i], ai, b0);
        a1[i] = _mm512_dpbusd_epi32(a1[i], ai, b1);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(spack + g * NR), s1 = _mm512_loadu_ps(spack + g * NR + 16);
    for (int i = 0; i < MR; ++i) {
      f0[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0[i]), s0, f0[i]);
      f1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1[i]), s1, f1[i]);
    }
  }
  alignas(64) float tmp[NR];
  for (int i = 0; i < mr; ++i) {
    float* c = C + i * ldc;
    const __m512 d = _mm512_set1_ps(dx[i]);
    if (nn == NR) {
      if (accumulate) {
        _mm512_storeu_ps(c, _mm512_fmadd_ps(f0[i], d, _mm512_loadu_ps(c)));
        _mm512_storeu_ps(c + 16, _mm512_fmadd_ps(f1[i], d, _mm512_loadu_ps(c + 16)));
      } else {
        _mm512_storeu_ps(c, _mm512_mul_ps(f0[i], d));
        _mm512_storeu_ps(c + 16, _mm512_mul_ps(f1[i], d));
      }
    } else {
      _mm512_storeu_ps(tmp, _mm512_mul_ps(f0[i], d));
      _mm512_storeu_ps(tmp + 16, _mm512_mul_ps(f1[i], d));
      for (int j = 0; j < nn; ++j) c[j] = accumulate ? c[j] + tmp[j] : tmp[j];
    }
  }
}

// Column blocks [b0, b1) of NR outputs, all rows of the quantized x (xu [M][Kp], dx [strips * MR]).
template <bool INT4>
void gemm_blocks(const Problem& p, const uint8_t* xu, const float* dx, int64_t Kp, int64_t b0, int64_t b1) {
  const int64_t strips = (p.M + MR - 1) / MR;
  std::vector<int32_t> apack(size_t(strips * MR * (KC / 4)));
  alignas(64) int8_t wpack[KC * NR];
  alignas(64) float spack[(KC / Q4_GROUP) * NR];
  alignas(64) float corr[NR];
  for (int64_t k0 = 0; k0 < Kp; k0 += KC) {
    const int64_t kc = std::min(KC, Kp - k0), k4n = kc / 4;
    for (int64_t s = 0; s < strips; ++s) {
      int32_t* a = apack.data() + s * MR * k4n;
      for (int i = 0; i < MR; ++i) {
        const int64_t m = s * MR + i;
        const uint8_t* xr = xu + m * Kp + k0;
        for (int64_t k4 = 0; k4 < k4n; ++k4) {
          int32_t v = 0;
          if (m < p.M) std::memcpy(&v, xr + 4 * k4, 4);
          a[k4 * MR + i] = v;
        }
      }
    }
    const int64_t gk4 = INT4 ? Q4_GROUP / 4 : k4n;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NR;
      const int nn = int(std::min<int64_t>(NR, p.N - n0));
      pack_weights<INT4>(p, n0, k0, kc, wpack, spack, corr);
      for (int64_t s = 0; s < strips; ++s) {
        const int mr = int(std::min<int64_t>(MR, p.M - s * MR));
        micro(k4n, gk4, apack.data() + s * MR * k4n, wpack, spack, corr, dx + s * MR, p.y + s * MR * p.N + n0,
              p.N, mr, nn, k0 > 0);
      }
    }
  }
}

template <bool INT4>
void matmul(const Problem& p) {
  const int64_t Kp = (p.K + 3) / 4 * 4, strips = (p.M + MR - 1) / MR;
  std::vector<uint8_t> xu(size_t(p.M * Kp));
  std::vector<float> dx(size_t(strips * MR), 0.0f);
  const int threads = thread_count(double(p.M) * double(p.N) * double(p.K));
  parallel_ranges(p.M, std::min(threads, int(p.M)), [&](int64_t a, int64_t b) {
    quantize_rows(p, Kp, xu.data(), dx.data(), a, b);
  });
  parallel_ranges((p.N + NR - 1) / NR, threads, [&](int64_t a, int64_t b) {
    gemm_blocks<INT4>(p, xu.data(), dx.data(), Kp, a, b);
  });
}
}  // namespace isa_vnni
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX2 + FMA + F16C (8 floats)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
struct V {
  using reg = __m256;
  static constexpr int W = 8;
  static constexpr int MR = 6;  // 6 x 2 accumulators + 3 temporaries of 16 registers
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg bcast(float v) { return _mm256_set1_ps(v); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static float sum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static reg exp_poly(reg x, reg n) {
    LLAVA_EXP_POLY(x, n)
  }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg keep(const int32_t* m, reg s, reg fill) {
    const __m256i zero = _mm256_cmpeq_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m)),
                                            _mm256_setzero_si256());
    return _mm256_blendv_ps(s, fill, _mm256_castsi256_ps(zero));
  }
  static float hmax(reg v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  // as the AVX-512 one; 2^n built in the exponent bits (n >= -126 above the cut-off)
  static reg exp(reg x) {
    const reg live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
    const reg n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(live, _mm256_mul_ps(exp_poly(x, n), _mm256_castsi256_ps(bits)));
  }
  static reg lw(Q8, const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static reg lw(H16, const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static reg lw(B16, const uint16_t* p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
  static float sw(Q8, int8_t v) { return float(v); }
  static float sw(H16, uint16_t v) { return _cvtsh_ss(v); }
  static void q4(const uint8_t* p, reg* out) {  // bytes 0-7: inputs 0-7 and 16-23; bytes 8-15: 8-15 and 24-31
    const __m256i eight = _mm256_set1_epi32(8), low = _mm256_set1_epi32(15);
    for (int h = 0; h < 2; ++h) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * h)));
      out[h] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, low), eight));
      out[2 + h] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight));
    }
  }
  static void q4u(const uint8_t* p, reg* out) {
    const __m256i low = _mm256_set1_epi32(15);
    for (int h = 0; h < 2; ++h) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * h)));
      out[h] = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
      out[2 + h] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
    }
  }
  static reg lw(F32, const float* p) { return _mm256_loadu_ps(p); }
  static float sw(B16, uint16_t v) { return bf16_to_float(v); }
  static float sw(F32, float v) { return v; }
};
#include "lowbit_matmul.cc"  // this very file (found next to itself), as the generic body
}  // namespace isa_avx2
#pragma GCC pop_options
#endif  // LLAVA_X86

// ------------------------------------------------------------------ portable C++ (1 float "register")
namespace isa_scalar {
struct V {
  using reg = float;
  static constexpr int W = 1;
  static constexpr int MR = 4;
  static reg zero() { return 0.0f; }
  static reg load(const float* p) { return *p; }
  static void store(float* p, reg v) { *p = v; }
  static reg bcast(float v) { return v; }
  static reg fma(reg a, reg b, reg c) { return a * b + c; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg div(reg a, reg b) { return a / b; }
  static float sum(reg v) { return v; }
  static reg max(reg a, reg b) { return std::max(a, b); }
  static reg keep(const int32_t* m, reg s, reg fill) { return *m ? s : fill; }
  static float hmax(reg v) { return v; }
  static reg exp(reg x) { return x < -87.3f ? 0.0f : std::exp(x); }
  static reg lw(Q8, const int8_t* p) { return float(*p); }
  static reg lw(H16, const uint16_t* p) { return half_to_float(*p); }
  static reg lw(B16, const uint16_t* p) { return bf16_to_float(*p); }
  static float sw(Q8, int8_t v) { return float(v); }
  static float sw(H16, uint16_t v) { return half_to_float(v); }
  static void q4(const uint8_t* p, reg* out) {
    for (int j = 0; j < 16; ++j) {
      out[j] = float(int(p[j] & 15) - 8);
      out[16 + j] = float(int(p[j] >> 4) - 8);
    }
  }
  static void q4u(const uint8_t* p, reg* out) {
    for (int j = 0; j < 16; ++j) {
      out[j] = float(p[j] & 15);
      out[16 + j] = float(p[j] >> 4);
    }
  }
  static reg lw(F32, const float* p) { return *p; }
  static float sw(B16, uint16_t v) { return bf16_to_float(v); }
  static float sw(F32, float v) { return v; }
};
#include "lowbit_matmul.cc"  // this very file (found next to itself), as the generic body
}  // namespace isa_scalar

#undef LLAVA_KERNEL_GENERIC_BODY

namespace {

enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

bool supported(Isa isa) {
#if !LLAVA_X86
  return isa == kScalar;
#else
  __builtin_cpu_init();
  switch (isa) {
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    default:
      return true;
  }
#endif
}

// -1: LLAVA_KERNEL_ISA names an unknown or unsupported path.
int choose_isa() {
  const char* env = std::getenv("LLAVA_KERNEL_ISA");
  if (env && *env && std::strcmp(env, "auto") != 0) {
    Isa want;
    if (!std::strcmp(env, "avx512")) want = kAvx512;
    else if (!std::strcmp(env, "avx2")) want = kAvx2;
    else if (!std::strcmp(env, "scalar")) want = kScalar;
    else return -1;
    return supported(want) ? want : -1;
  }
  if (supported(kAvx512)) return kAvx512;
  if (supported(kAvx2)) return kAvx2;
  return kScalar;
}

// One call of the chosen path's function: LLAVA_DISPATCH(isa, fn(args)).
#if LLAVA_X86
#define LLAVA_DISPATCH(isa, call)                 \
  switch (isa) {                                  \
    case kAvx512: isa_avx512::call; break;        \
    case kAvx2: isa_avx2::call; break;            \
    default: isa_scalar::call; break;             \
  }
#else
#define LLAVA_DISPATCH(isa, call) isa_scalar::call;
#endif

bool f32(const char* t) { return std::strcmp(t, "float32") == 0; }

// Prefill rows (M > 4) of int8 (one scale per row) and int4 weights on VNNI int8 dot products: only with
// LLAVA_KERNEL_PREFILL=int8, on the AVX-512 path of a CPU with AVX512-VNNI (else the float paths run).
bool int8_prefill(int isa) {
#if LLAVA_X86
  const char* env = std::getenv("LLAVA_KERNEL_PREFILL");
  if (!env || std::strcmp(env, "int8") != 0 || isa != kAvx512) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
#else
  (void)isa;
  return false;
#endif
}

}  // namespace

extern "C" {

// The path LLAVA_KERNEL_ISA selects on this machine: "avx512", "avx2", "scalar", or "" when the variable
// names an unknown or unsupported one.
const char* LlavaKernelIsa() {
  static const char* names[] = {"scalar", "avx2", "avx512"};
  int isa = choose_isa();
  return isa < 0 ? "" : names[isa];
}

// ops.Custom(func_type="aot") entry. Inputs x [M, K] float32, w [N, K] int8|float16|bfloat16|float32 and, for int8,
// scale [N, G] float32 (G divides K; each scale covers K / G consecutive inputs), or w [N, ceil(K / 32) * 16]
// uint8 (int4, packed) with scale [N, ceil(K / 32)] float16; output y [M, N] float32.
// Returns non-zero (MindSpore raises) on a signature it was not built for.
int LlavaLowbitMatmul(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                      void* /*stream*/, void* /*extra*/) {
  if (nparam != 3 && nparam != 4) return 1;
  const int out = nparam - 1;
  if (ndims[0] != 2 || ndims[1] != 2 || ndims[out] != 2) return 2;
  if (!f32(dtypes[0]) || !f32(dtypes[out])) return 3;
  Problem p;
  p.M = shapes[0][0];
  p.K = shapes[0][1];
  p.N = shapes[1][0];
  if ((shapes[1][1] != p.K && std::strcmp(dtypes[1], "uint8") != 0) || shapes[out][0] != p.M ||
      shapes[out][1] != p.N)
    return 4;
  p.x = static_cast<const float*>(params[0]);
  p.w = params[1];
  p.y = static_cast<float*>(params[out]);
  p.scale = nullptr;
  p.scale16 = nullptr;
  p.groups = 1;
  const int isa = choose_isa();
  if (isa < 0) return 5;
  const char* wt = dtypes[1];
  if (!std::strcmp(wt, "int8")) {
    if (nparam != 4 || ndims[2] != 2 || !f32(dtypes[2])) return 6;
    if (shapes[2][0] != p.N || shapes[2][1] <= 0 || p.K % shapes[2][1] != 0) return 7;
    p.scale = static_cast<const float*>(params[2]);
    p.groups = shapes[2][1];
#if LLAVA_X86
    if (p.M > 4 && p.N > 0 && p.K > 0 && p.groups == 1 && int8_prefill(isa)) {
      isa_vnni::matmul<false>(p);
      return 0;
    }
#endif
    LLAVA_DISPATCH(isa, matmul<Q8>(p))
  } else if (!std::strcmp(wt, "uint8")) {  // int4, packed
    const int64_t groups = (p.K + Q4_GROUP - 1) / Q4_GROUP;
    if (nparam != 4 || ndims[2] != 2 || std::strcmp(dtypes[2], "float16") != 0) return 6;
    if (shapes[1][1] != groups * Q4_BYTES || shapes[2][0] != p.N || shapes[2][1] != groups) return 7;
    p.scale16 = static_cast<const uint16_t*>(params[2]);
    p.groups = groups;
#if LLAVA_X86
    if (p.M > 4 && p.N > 0 && p.K > 0 && int8_prefill(isa)) {
      isa_vnni::matmul<true>(p);
      return 0;
    }
#endif
    LLAVA_DISPATCH(isa, matmul<Q4>(p))
  } else if (nparam == 3 && !std::strcmp(wt, "float16")) {
    LLAVA_DISPATCH(isa, matmul<H16>(p))
  } else if (nparam == 3 && !std::strcmp(wt, "bfloat16")) {
    LLAVA_DISPATCH(isa, matmul<B16>(p))
  } else if (nparam == 3 && !std::strcmp(wt, "float32")) {
    LLAVA_DISPATCH(isa, matmul<F32>(p))
  } else {
    return 8;
  }
  return 0;
}

// ops.Custom(func_type="aot") entry. Inputs q [B * Lq, H, D], k and v [B * Lk, kv, D] (float32, token-major
// as the projections give them) and mask [B, Lq, Lk] int32 (1 = attend); output [B * Lq, H, D] float32:
// per row, query and head softmax(q . K + mask) . V over that row's keys, head h reading KV head
// h / (H / kv). Non-zero (MindSpore raises) on a signature it was not built for.
int LlavaPromptAttention(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                         void* /*stream*/, void* /*extra*/) {
  if (nparam != 5) return 1;
  if (ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3 || ndims[3] != 3 || ndims[4] != 3) return 2;
  for (int i : {0, 1, 2, 4})
    if (!f32(dtypes[i])) return 3;
  if (std::strcmp(dtypes[3], "int32") != 0) return 3;
  Prompt a;
  a.B = shapes[3][0];
  a.Lq = shapes[3][1];
  a.Lk = shapes[3][2];
  a.H = shapes[0][1];
  a.D = shapes[0][2];
  a.kv = shapes[1][1];
  if (a.B <= 0 || a.kv <= 0 || a.H % a.kv != 0 || shapes[0][0] != a.B * a.Lq || shapes[1][0] != a.B * a.Lk ||
      shapes[1][2] != a.D || shapes[2][0] != shapes[1][0] || shapes[2][1] != a.kv || shapes[2][2] != a.D ||
      shapes[4][0] != shapes[0][0] || shapes[4][1] != a.H || shapes[4][2] != a.D)
    return 4;
  a.q = static_cast<const float*>(params[0]);
  a.k = static_cast<const float*>(params[1]);
  a.v = static_cast<const float*>(params[2]);
  a.mask = static_cast<const int32_t*>(params[3]);
  a.out = static_cast<float*>(params[4]);
  const int isa = choose_isa();
  if (isa < 0) return 5;
  LLAVA_DISPATCH(isa, prompt_attention(a))
  return 0;
}

// ops.Custom(func_type="aot") entry: the decoder's attention over the paged KV pool, prompt chunks and decode
// tokens of any rows in one call. Inputs q [N, H, D] (rotated, scaled by 1/sqrt(D)), k_cache and v_cache
// [NB * kv * BS, D] (NB blocks of BS positions: position o of KV head g in block b is row (b * kv + g) * BS + o),
// tokens [N, 2] int32 = (table row r, positions attended L), tables [R, MB] int32 (position p of row r is in
// block tables[r, p / BS]) and layout [2] int32 = (kv, BS), all float32 but the int32 ones; output [N, H, D]
// float32: per token and head softmax(q . K[0:L]) . V[0:L] over positions 0..L-1 of its row (head h reads KV
// head h / (H / kv)), zeros for L = 0 (padding). Consecutive tokens of one row with L rising by 1 (a prompt
// chunk) take the prompt kernel's blocked path, the others a streaming one (attend_one). Non-zero
// (MindSpore raises) on a signature it was not built for, r outside tables, L > MB * BS, or a block id of an
// attended position outside the pool.
int LlavaPagedAttention(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                        void* /*stream*/, void* /*extra*/) {
  if (nparam != 7) return 1;
  if (ndims[0] != 3 || ndims[1] != 2 || ndims[2] != 2 || ndims[3] != 2 || ndims[4] != 2 || ndims[5] != 1 ||
      ndims[6] != 3)
    return 2;
  for (int i : {0, 1, 2, 6})
    if (!f32(dtypes[i])) return 3;
  for (int i : {3, 4, 5})
    if (std::strcmp(dtypes[i], "int32") != 0) return 3;
  if (shapes[5][0] != 2) return 3;
  const int32_t* layout = static_cast<const int32_t*>(params[5]);
  Paged a;
  const int64_t N = shapes[0][0], R = shapes[4][0];
  a.H = shapes[0][1];
  a.D = shapes[0][2];
  a.kv = layout[0];
  a.BS = layout[1];
  a.MB = shapes[4][1];
  if (a.kv <= 0 || a.BS <= 0 || a.H % a.kv != 0 || shapes[1][1] != a.D || shapes[2][1] != a.D ||
      shapes[1][0] % (a.kv * a.BS) != 0 || shapes[2][0] != shapes[1][0] || shapes[3][0] != N ||
      shapes[3][1] != 2 || shapes[6][0] != N || shapes[6][1] != a.H || shapes[6][2] != a.D)
    return 4;
  const int64_t NB = shapes[1][0] / (a.kv * a.BS);
  a.q = static_cast<const float*>(params[0]);
  a.k = static_cast<const float*>(params[1]);
  a.v = static_cast<const float*>(params[2]);
  a.tables = static_cast<const int32_t*>(params[4]);
  a.out = static_cast<float*>(params[6]);
  const int isa = choose_isa();
  if (isa < 0) return 5;
  const int32_t* tok = static_cast<const int32_t*>(params[3]);
  std::vector<Run> runs;
  for (int64_t i = 0; i < N;) {
    const int64_t r = tok[2 * i], L = tok[2 * i + 1];
    if (r < 0 || r >= R || L < 0 || L > a.MB * a.BS) return 6;
    if (L == 0) {
      std::memset(a.out + i * a.H * a.D, 0, sizeof(float) * a.H * a.D);
      ++i;
      continue;
    }
    int64_t n = 1;
    while (i + n < N && tok[2 * (i + n)] == r && tok[2 * (i + n) + 1] == L + n && L + n <= a.MB * a.BS) ++n;
    const int32_t* blocks = a.tables + r * a.MB;
    for (int64_t s = 0; s < (L + n - 1 + a.BS - 1) / a.BS; ++s)
      if (blocks[s] < 0 || blocks[s] >= NB) return 7;   // would read outside the pool
    runs.push_back(Run{i, n, r, L});
    i += n;
  }
  a.runs = runs.data();
  a.nruns = int64_t(runs.size());
  LLAVA_DISPATCH(isa, paged_attention(a))
  return 0;
}

// ops.Custom(func_type="aot") entries for the per-token steps (all float32; non-zero on another signature):
// LlavaRmsNorm(x [N, C], weight [C], eps [1]) -> [N, C]
int LlavaRmsNorm(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 1 || ndims[2] != 1 || ndims[3] != 2) return 1;
  if (!f32(dtypes[0]) || !f32(dtypes[1]) || !f32(dtypes[2]) || !f32(dtypes[3])) return 3;
  const int64_t N = shapes[0][0], C = shapes[0][1];
  if (shapes[1][0] != C || shapes[2][0] != 1 || shapes[3][0] != N || shapes[3][1] != C) return 4;
  const int isa = choose_isa();
  if (isa < 0) return 5;
  const float eps = *static_cast<const float*>(params[2]);
  LLAVA_DISPATCH(isa, rms_norm(static_cast<const float*>(params[0]), static_cast<const float*>(params[1]), eps,
                               static_cast<float*>(params[3]), N, C))
  return 0;
}

// LlavaSwiGlu(gate [N, C], up [N, C]) -> silu(gate) * up [N, C]
int LlavaSwiGlu(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 1;
  if (!f32(dtypes[0]) || !f32(dtypes[1]) || !f32(dtypes[2])) return 3;
  for (int i = 1; i < 3; ++i)
    if (shapes[i][0] != shapes[0][0] || shapes[i][1] != shapes[0][1]) return 4;
  const int isa = choose_isa();
  if (isa < 0) return 5;
  LLAVA_DISPATCH(isa, swiglu(static_cast<const float*>(params[0]), static_cast<const float*>(params[1]),
                             static_cast<float*>(params[2]), shapes[0][0] * shapes[0][1]))
  return 0;
}

// LlavaRotary(x [N, Hx, D], cos [N, D], sin [N, D]) -> x * cos + swap_halves(x) * sin [N, Hx, D], the token's
// tables applied to each of its heads (sin's first half negated by the caller).
int LlavaRotary(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 4 || ndims[0] != 3 || ndims[1] != 2 || ndims[2] != 2 || ndims[3] != 3) return 1;
  if (!f32(dtypes[0]) || !f32(dtypes[1]) || !f32(dtypes[2]) || !f32(dtypes[3])) return 3;
  const int64_t N = shapes[0][0], Hx = shapes[0][1], D = shapes[0][2];
  if (D % 2 != 0 || shapes[1][0] != N || shapes[1][1] != D || shapes[2][0] != N || shapes[2][1] != D ||
      shapes[3][0] != N || shapes[3][1] != Hx || shapes[3][2] != D)
    return 4;
  const int isa = choose_isa();
  if (isa < 0) return 5;
  LLAVA_DISPATCH(isa, rotary(static_cast<const float*>(params[0]), static_cast<const float*>(params[1]),
                             static_cast<const float*>(params[2]), static_cast<float*>(params[3]), N, Hx, D))
  return 0;
}

}  // extern "C"

#else  // ================================================================ the generic body, once per ISA

constexpr int W = V::W;
constexpr int NR = 2 * W;     // micro-kernel columns: two registers
constexpr int KC = 256;      // K per packed panel: KC x NR floats = 32 KiB (AVX-512), 16 KiB (AVX2): in L1/L2
constexpr int GEMV_ROWS = 4;  // up to this many rows of x: stream W once, convert in registers

// Decode: each weight row is converted in registers and used for the M (<= GEMV_ROWS) rows of x. Per group
// of inputs sharing a scale, the partial dot products are scaled once and added to the row's total.
template <class WK, int MM>
void gemv_rows(const Problem& p, int64_t n0, int64_t n1) {
  using T = typename WK::T;
  const int64_t K = p.K, G = K / p.groups;
  const T* Wm = static_cast<const T*>(p.w);
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = Wm + n * K;
    typename V::reg tot[MM];
    float tail[MM];
    for (int m = 0; m < MM; ++m) { tot[m] = V::zero(); tail[m] = 0.0f; }
    for (int64_t g0 = 0; g0 < K; g0 += G) {
      const int64_t g1 = g0 + G;
      typename V::reg a0[MM], a1[MM];
      float s[MM];
      for (int m = 0; m < MM; ++m) { a0[m] = V::zero(); a1[m] = V::zero(); s[m] = 0.0f; }
      int64_t k = g0;
      for (; k + 2 * W <= g1; k += 2 * W) {  // two chains: hides the FMA latency
        const typename V::reg w0 = V::lw(WK{}, wr + k), w1 = V::lw(WK{}, wr + k + W);
        for (int m = 0; m < MM; ++m) {
          a0[m] = V::fma(V::load(p.x + m * K + k), w0, a0[m]);
          a1[m] = V::fma(V::load(p.x + m * K + k + W), w1, a1[m]);
        }
      }
      for (; k + W <= g1; k += W) {
        const typename V::reg w0 = V::lw(WK{}, wr + k);
        for (int m = 0; m < MM; ++m) a0[m] = V::fma(V::load(p.x + m * K + k), w0, a0[m]);
      }
      for (; k < g1; ++k) {
        const float wv = V::sw(WK{}, wr[k]);
        for (int m = 0; m < MM; ++m) s[m] += p.x[m * K + k] * wv;
      }
      const float sc = p.scale ? p.scale[n * p.groups + g0 / G] : 1.0f;
      const typename V::reg scv = V::bcast(sc);
      for (int m = 0; m < MM; ++m) {
        tot[m] = V::fma(V::fma(a1[m], V::bcast(1.0f), a0[m]), scv, tot[m]);
        tail[m] += s[m] * sc;
      }
    }
    for (int m = 0; m < MM; ++m) p.y[m * p.N + n] = V::sum(tot[m]) + tail[m];
  }
}

// Decode of one row of x with one scale per output row (the model's case): GEMV_BLOCK weight rows at a time,
// one FMA chain each, so each loaded x register serves GEMV_BLOCK weight vectors and as many independent
// chains hide the FMA latency. Measured on 7B shapes (int8, 2 threads, AVX-512): 2 rows at a time 15.5-17.7
// GB/s, 4 rows 19.5-21.5, 8 rows 22.5-23.0, against 23.5 GB/s for a plain read of the same bytes.
constexpr int GEMV_BLOCK = 8;

template <class WK>
void gemv1_block(const Problem& p, int64_t n0, int64_t n1) {
  using T = typename WK::T;
  constexpr int R = GEMV_BLOCK;
  const int64_t K = p.K;
  const T* Wm = static_cast<const T*>(p.w);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    const T* w = Wm + n * K;
    typename V::reg acc[R];
    float tail[R];
    for (int r = 0; r < R; ++r) { acc[r] = V::zero(); tail[r] = 0.0f; }
    int64_t k = 0;
    for (; k + W <= K; k += W) {
      const typename V::reg xv = V::load(p.x + k);
      for (int r = 0; r < R; ++r) acc[r] = V::fma(xv, V::lw(WK{}, w + r * K + k), acc[r]);
    }
    for (; k < K; ++k)
      for (int r = 0; r < R; ++r) tail[r] += p.x[k] * V::sw(WK{}, w[r * K + k]);
    for (int r = 0; r < R; ++r) {
      const float v = V::sum(acc[r]) + tail[r];
      p.y[n + r] = p.scale ? v * p.scale[n + r] : v;
    }
  }
  if (n < n1) gemv_rows<WK, 1>(p, n, n1);
}

// Decode with int4 weights, weight rows [n, n + RR) against the MM (<= GEMV_ROWS) rows of x. Per whole group,
// its 32 stored nibbles u = q + 8 are unpacked in registers (V::q4u), multiplied with x and the partial sum
// scaled once by the group's scale (converted from float16 for the whole row first, then broadcast from
// memory); the 8 is taken off once per row, as 8 * sum_g s[g] * xs[g] with xs[g] the sum of x over group g
// (made once per call): two vector operations fewer per group than unpacking q itself. The last, partial
// group (K not a multiple of Q4_GROUP) is summed in scalars from q. RR > 1 rows at a time for one row of x:
// each loaded x register serves RR weight groups, and RR independent chains hide the FMA latency.
template <int MM, int RR>
void gemv_q4_rows(const Problem& p, int64_t n, const float* xs, float* sbuf) {
  constexpr int NV = int(Q4_GROUP) / W;
  const int64_t K = p.K, full = K / Q4_GROUP, G = p.groups, rb = G * Q4_BYTES;
  const uint8_t* w = static_cast<const uint8_t*>(p.w) + n * rb;
  for (int r = 0; r < RR; ++r) {
    const uint16_t* sc = p.scale16 + (n + r) * G;
    float* sr = sbuf + r * G;
    int64_t g = 0;
    for (; g + W <= G; g += W) V::store(sr + g, V::lw(H16{}, sc + g));
    for (; g < G; ++g) sr[g] = V::sw(H16{}, sc[g]);
  }
  typename V::reg tot[RR][MM];
  float tail[RR][MM];
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < MM; ++m) { tot[r][m] = V::zero(); tail[r][m] = 0.0f; }
  for (int64_t g = 0; g < full; ++g) {
    typename V::reg wv[RR][NV];
    for (int r = 0; r < RR; ++r) V::q4u(w + r * rb + g * Q4_BYTES, wv[r]);
    for (int m = 0; m < MM; ++m) {
      const float* xg = p.x + m * K + g * Q4_GROUP;
      typename V::reg xv[NV];
      for (int i = 0; i < NV; ++i) xv[i] = V::load(xg + i * W);
      for (int r = 0; r < RR; ++r) {
        typename V::reg a = V::mul(xv[0], wv[r][0]);
        for (int i = 1; i < NV; ++i) a = V::fma(xv[i], wv[r][i], a);
        tot[r][m] = V::fma(a, V::bcast(sbuf[r * G + g]), tot[r][m]);
      }
    }
  }
  for (int r = 0; r < RR; ++r) {       // - 8 * sum_g s[g] * xs[g] over the whole groups
    const float* sr = sbuf + r * G;
    for (int m = 0; m < MM; ++m) {
      const float* xm = xs + m * G;
      typename V::reg c = V::zero();
      int64_t g = 0;
      for (; g + W <= full; g += W) c = V::fma(V::load(sr + g), V::load(xm + g), c);
      float cs = V::sum(c);
      for (; g < full; ++g) cs += sr[g] * xm[g];
      tail[r][m] = -8.0f * cs;
    }
  }
  if (full < G) {
    const int64_t k0 = full * Q4_GROUP, t = K - k0;
    for (int r = 0; r < RR; ++r) {
      const uint8_t* b = w + r * rb + full * Q4_BYTES;
      const float s = sbuf[r * G + full];
      for (int m = 0; m < MM; ++m) {
        float acc = 0.0f;
        for (int64_t j = 0; j < t; ++j)
          acc += p.x[m * K + k0 + j] * float(int(j < Q4_BYTES ? b[j] & 15 : b[j - Q4_BYTES] >> 4) - 8);
        tail[r][m] += acc * s;
      }
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < MM; ++m) p.y[m * p.N + n + r] = V::sum(tot[r][m]) + tail[r][m];
}

constexpr int Q4_ROWS = W >= 16 ? 8 : 2;  // AVX2's 16 registers hold 2 rows' unpacked groups, AVX-512's 32 hold 8

template <int MM>
void gemv_q4(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t G = p.groups, full = p.K / Q4_GROUP;
  std::vector<float> xs(size_t(MM * G), 0.0f), sbuf(size_t(Q4_ROWS * G));
  for (int m = 0; m < MM; ++m)       // xs[m][g] = sum of x[m] over whole group g
    for (int64_t g = 0; g < full; ++g) {
      const float* xg = p.x + m * p.K + g * Q4_GROUP;
      typename V::reg a = V::load(xg);
      for (int i = 1; i < int(Q4_GROUP) / W; ++i) a = a + V::load(xg + i * W);
      xs[size_t(m * G + g)] = V::sum(a);
    }
  int64_t n = n0;
  if (MM == 1)
    for (; n + Q4_ROWS <= n1; n += Q4_ROWS) gemv_q4_rows<1, Q4_ROWS>(p, n, xs.data(), sbuf.data());
  for (; n < n1; ++n) gemv_q4_rows<MM, 1>(p, n, xs.data(), sbuf.data());
}

// Converts int4 W[n0 : n0 + NR, k0 : k0 + kc] (scaled) into pack[k][j] (k0 is a multiple of KC, so of
// Q4_GROUP); rows past N are zeros. A row's last group is read whole: its padding nibbles hold q = 0.
void pack_panel_q4(const Problem& p, int64_t n0, int64_t k0, int64_t kc, float* pack) {
  constexpr int NV = int(Q4_GROUP) / W;
  static_assert(KC % Q4_GROUP == 0, "a K panel holds whole int4 groups");
  const int64_t rb = p.groups * Q4_BYTES;
  alignas(64) float row[KC];
  for (int j = 0; j < NR; ++j) {
    const int64_t n = n0 + j;
    if (n >= p.N) {
      for (int64_t k = 0; k < kc; ++k) pack[k * NR + j] = 0.0f;
      continue;
    }
    const uint8_t* wr = static_cast<const uint8_t*>(p.w) + n * rb;
    const uint16_t* sr = p.scale16 + n * p.groups;
    for (int64_t k = 0; k < kc; k += Q4_GROUP) {
      const int64_t g = (k0 + k) / Q4_GROUP;
      typename V::reg v[NV];
      V::q4(wr + g * Q4_BYTES, v);
      const typename V::reg s = V::bcast(V::sw(H16{}, sr[g]));
      for (int i = 0; i < NV; ++i) V::store(row + k + i * W, V::mul(v[i], s));
    }
    for (int64_t k = 0; k < kc; ++k) pack[k * NR + j] = row[k];
  }
}

// Converts W[n0 : n0 + NR, k0 : k0 + kc] (scaled) into pack[k][j]; rows past N are zeros.
template <class WK>
void pack_panel(const Problem& p, int64_t n0, int64_t k0, int64_t kc, float* pack) {
  using T = typename WK::T;
  const int64_t K = p.K, G = K / p.groups;
  const T* Wm = static_cast<const T*>(p.w);
  alignas(64) float row[KC];
  for (int j = 0; j < NR; ++j) {
    const int64_t n = n0 + j;
    if (n >= p.N) {
      for (int64_t k = 0; k < kc; ++k) pack[k * NR + j] = 0.0f;
      continue;
    }
    const T* wr = Wm + n * K + k0;
    int64_t k = 0;
    for (; k + W <= kc; k += W) V::store(row + k, V::lw(WK{}, wr + k));
    for (; k < kc; ++k) row[k] = V::sw(WK{}, wr[k]);
    if (p.scale) {  // one scale per run of G inputs: no division per element
      const float* sr = p.scale + n * p.groups;
      for (k = 0; k < kc;) {
        const int64_t g = (k0 + k) / G, end = std::min<int64_t>(kc, (g + 1) * G - k0);
        const float sc = sr[g];
        for (; k < end; ++k) row[k] *= sc;
      }
    }
    for (k = 0; k < kc; ++k) pack[k * NR + j] = row[k];
  }
}

// C[mr, NR] (+)= A[mr, kc] @ pack[kc, NR] with A packed as apack[k][MR] (rows past M are zeros, so the
// loop always runs MR rows); only the first `mr` rows and `nn` columns of C are written.
void micro(int64_t kc, const float* apack, const float* pack, float* C, int64_t ldc, int mr, int nn,
           bool accumulate) {
  constexpr int MR = V::MR;
  typename V::reg c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) { c0[i] = V::zero(); c1[i] = V::zero(); }
  for (int64_t k = 0; k < kc; ++k) {
    const typename V::reg b0 = V::load(pack + k * NR), b1 = V::load(pack + k * NR + W);
    const float* a = apack + k * MR;
    for (int i = 0; i < MR; ++i) {
      const typename V::reg ai = V::bcast(a[i]);
      c0[i] = V::fma(ai, b0, c0[i]);
      c1[i] = V::fma(ai, b1, c1[i]);
    }
  }
  alignas(64) float tmp[NR];
  for (int i = 0; i < mr; ++i) {
    float* c = C + i * ldc;
    if (nn == NR) {
      if (accumulate) {
        c0[i] = V::fma(V::bcast(1.0f), V::load(c), c0[i]);
        c1[i] = V::fma(V::bcast(1.0f), V::load(c + W), c1[i]);
      }
      V::store(c, c0[i]);
      V::store(c + W, c1[i]);
    } else {
      V::store(tmp, c0[i]);
      V::store(tmp + W, c1[i]);
      for (int j = 0; j < nn; ++j) c[j] = accumulate ? c[j] + tmp[j] : tmp[j];
    }
  }
}

// Prefill: column blocks [b0, b1) of NR outputs. Per K panel: x[:, k0 : k0 + kc] is copied into MR-row
// strips (contiguous, so the micro-kernel's broadcasts walk one stream instead of MR rows K floats apart,
// which alias in L1), each NR-column weight panel is converted once and swept over all rows of x.
template <class WK>
void gemm_blocks(const Problem& p, int64_t b0, int64_t b1) {
  constexpr int MR = V::MR;
  alignas(64) float pack[KC * NR];
  const int64_t strips = (p.M + MR - 1) / MR;
  std::vector<float> apack(size_t(strips) * MR * KC);
  for (int64_t k0 = 0; k0 < p.K; k0 += KC) {
    const int64_t kc = std::min<int64_t>(KC, p.K - k0);
    for (int64_t s = 0; s < strips; ++s) {
      float* a = apack.data() + s * MR * kc;
      for (int i = 0; i < MR; ++i) {
        const int64_t m = s * MR + i;
        const float* xr = p.x + m * p.K + k0;
        if (m < p.M) {
          for (int64_t k = 0; k < kc; ++k) a[k * MR + i] = xr[k];
        } else {
          for (int64_t k = 0; k < kc; ++k) a[k * MR + i] = 0.0f;
        }
      }
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NR;
      const int nn = int(std::min<int64_t>(NR, p.N - n0));
      if constexpr (std::is_same<WK, Q4>::value) pack_panel_q4(p, n0, k0, kc, pack);
      else pack_panel<WK>(p, n0, k0, kc, pack);
      for (int64_t s = 0; s < strips; ++s) {
        const int mr = int(std::min<int64_t>(MR, p.M - s * MR));
        micro(kc, apack.data() + s * MR * kc, pack, p.y + s * MR * p.N + n0, p.N, mr, nn, k0 > 0);
      }
    }
  }
}

template <class WK>
void matmul(const Problem& p) {
  if (p.M <= 0 || p.N <= 0) return;
  if (p.K <= 0) {
    std::memset(p.y, 0, sizeof(float) * p.M * p.N);
    return;
  }
  const int threads = thread_count(double(p.M) * double(p.N) * double(p.K));
  if constexpr (std::is_same<WK, Q4>::value) {
    if (p.M <= GEMV_ROWS) {
      parallel_ranges(p.N, threads, [&](int64_t a, int64_t b) {
        switch (p.M) {
          case 1: gemv_q4<1>(p, a, b); break;
          case 2: gemv_q4<2>(p, a, b); break;
          case 3: gemv_q4<3>(p, a, b); break;
          default: gemv_q4<4>(p, a, b); break;
        }
      });
      return;
    }
  } else if (p.M <= GEMV_ROWS) {
    parallel_ranges(p.N, threads, [&](int64_t a, int64_t b) {
      switch (p.M) {
        case 1:
          if (p.groups == 1) gemv1_block<WK>(p, a, b);
          else gemv_rows<WK, 1>(p, a, b);
          break;
        case 2: gemv_rows<WK, 2>(p, a, b); break;
        case 3: gemv_rows<WK, 3>(p, a, b); break;
        default: gemv_rows<WK, 4>(p, a, b); break;
      }
    });
    return;
  }
  parallel_ranges((p.N + NR - 1) / NR, threads, [&](int64_t a, int64_t b) { gemm_blocks<WK>(p, a, b); });
}

// Asks for the cache lines of a row of D floats.
inline void prefetch_row(const float* p, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(p + d, 0, 3);
  __builtin_prefetch(p + D - 1, 0, 3);   // the row's last line when it does not start on one
}

// The attention kernels' shared pieces. Keys and values are read in place through Rows (one segment for a
// prompt's token-major k / v, a segment per block for the paged pool), so the prompt and paged entries run the
// same loops.

// softmax(q . K[0:T]) . V[0:T] for one query and head, keys and values streamed from the cache (no
// transpose: each key serves one query); softmax in float32, max subtracted (as torch does). scores: T floats.
// Rows of a paged cache are scattered in short segments at which the hardware prefetchers start over (a 7B
// decode step read its blocks ~1.3x slower than one contiguous cache): row j of a segment prefetches row j of
// the next one.
void attend_one(const float* q, const float* k, const float* v, const Rows& src, int64_t T, int64_t D,
                float* scores, float* o) {
  float top = -3.4e38f;
  for (int64_t t0 = 0; t0 < T; t0 += src.len) {
    const int64_t t1 = std::min(T, t0 + src.len);
    const float* kr = k + src.seg[t0 / src.len];
    const bool more = t1 < T;
    const int64_t ahead = more ? src.seg[t1 / src.len] - src.seg[t0 / src.len] : 0;  // floats to the next
    for (int64_t t = t0; t < t1; ++t, kr += src.stride) {
      if (more) prefetch_row(kr + ahead, D);
      typename V::reg acc = V::zero();
      int64_t d = 0;
      for (; d + W <= D; d += W) acc = V::fma(V::load(q + d), V::load(kr + d), acc);
      float s = V::sum(acc);
      for (; d < D; ++d) s += q[d] * kr[d];
      scores[t] = s;
      top = std::max(top, s);
    }
  }
  float total = 0.0f;
  for (int64_t t = 0; t < T; ++t) {
    scores[t] = std::exp(scores[t] - top);
    total += scores[t];
  }
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
  for (int64_t t0 = 0; t0 < T; t0 += src.len) {
    const int64_t t1 = std::min(T, t0 + src.len);
    const float* vr = v + src.seg[t0 / src.len];
    const bool more = t1 < T;
    const int64_t ahead = more ? src.seg[t1 / src.len] - src.seg[t0 / src.len] : 0;
    for (int64_t t = t0; t < t1; ++t, vr += src.stride) {
      if (more) prefetch_row(vr + ahead, D);
      const float pt = scores[t] * inv;
      if (pt == 0.0f) continue;                 // positions whose weight underflows add nothing
      const typename V::reg pv = V::bcast(pt);
      int64_t d = 0;
      for (; d + W <= D; d += W) V::store(o + d, V::fma(pv, V::load(vr + d), V::load(o + d)));
      for (; d < D; ++d) o[d] += pt * vr[d];
    }
  }
}

// The blocked paths (many queries per KV head) work in blocks of PR queries held in registers like the
// GEMM's micro-kernel, against the head's keys transposed once into kt [D][Lp] (shared by the heads of a
// group); keys past the last one any query of the block attends to are skipped (a causal mask leaves about
// half).
constexpr int PR = V::MR >= 12 ? 8 : 4;

// kt[d][t] = key row t's element d for t < n, zeros up to Lp.
void gather_keys(const float* k, const Rows& src, int64_t n, int64_t D, int64_t Lp, float* kt) {
  for (int64_t t0 = 0; t0 < n; t0 += src.len) {
    const int64_t t1 = std::min(n, t0 + src.len);
    const float* kr = k + src.seg[t0 / src.len];
    for (int64_t t = t0; t < t1; ++t, kr += src.stride)
      for (int64_t d = 0; d < D; ++d) kt[d * Lp + t] = kr[d];
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t t = n; t < Lp; ++t) kt[d * Lp + t] = 0.0f;
}

// scores[r * Lp + j] = q_r . key j for PR queries and keys [0, hp) (hp a multiple of 2 W): PR queries x 2 W
// keys at a time (one broadcast per query and two kt loads per d, no horizontal sums).
void score_block(const float* kt, int64_t Lp, int64_t D, const float* const* qr, int64_t hp, float* scores) {
  for (int64_t j = 0; j < hp; j += 2 * W) {
    typename V::reg c0[PR], c1[PR];
    for (int r = 0; r < PR; ++r) { c0[r] = V::zero(); c1[r] = V::zero(); }
    const float* kd = kt + j;
    for (int64_t d = 0; d < D; ++d, kd += Lp) {
      const typename V::reg k0 = V::load(kd), k1 = V::load(kd + W);
      for (int r = 0; r < PR; ++r) {
        const typename V::reg qv = V::bcast(qr[r][d]);
        c0[r] = V::fma(qv, k0, c0[r]);
        c1[r] = V::fma(qv, k1, c1[r]);
      }
    }
    for (int r = 0; r < PR; ++r) {
      V::store(scores + r * Lp + j, c0[r]);
      V::store(scores + r * Lp + j + W, c1[r]);
    }
  }
}

// One query's softmax in place over sr[0, hw): keys j < lim with m[j] != 0 (every j < lim when m is null)
// get exp(s - max) in float32 (max subtracted, as torch does), the rest 0; returns 1 / the sum. A query
// attending to nothing gets equal weights over [0, lim), as a softmax over equal masked scores does in
// transformers. Inlined: as a function of its own, GCC 12 warns (falsely, -Wuninitialized) on the AVX-512
// horizontal reductions' header code.
inline __attribute__((always_inline)) float softmax_row(float* sr, const int32_t* m, int64_t lim, int64_t hw) {
  const typename V::reg low = V::bcast(-3.4e38f);
  typename V::reg tops = low;
  int64_t j = 0;
  for (; j + W <= lim; j += W) {
    typename V::reg v = V::load(sr + j);
    if (m) {
      v = V::keep(m + j, v, low);
      V::store(sr + j, v);
    }
    tops = V::max(tops, v);
  }
  for (; j < hw; ++j) sr[j] = j < lim && (!m || m[j]) ? sr[j] : -3.4e38f;
  float top = V::hmax(tops);
  for (j = lim / W * W; j < lim; ++j) top = std::max(top, sr[j]);
  if (top == -3.4e38f) {                      // nothing to attend to: equal weights
    for (j = 0; j < lim; ++j) sr[j] = 0.0f;
    top = 0.0f;
  }
  const typename V::reg tv = V::bcast(top);
  typename V::reg tot = V::zero();
  for (j = 0; j < hw; j += W) {
    const typename V::reg e = V::exp(V::load(sr + j) - tv);
    V::store(sr + j, e);
    tot = tot + e;
  }
  return 1.0f / V::sum(tot);
}

// out[r][d] = inv[r] * sum_{j < hi} p[r][j] V[j][d] (p = scores, rows Lp apart) for PR queries, of which the
// first `rows` are stored: 2 W columns at a time in registers, then single vectors, then scalars.
void weighted_values(const float* v, const Rows& src, const float* scores, int64_t Lp, const float* inv, int rows,
                     int64_t hi, int64_t D, float* const* out) {
  int64_t d0 = 0;
  for (; d0 + 2 * W <= D; d0 += 2 * W) {
    typename V::reg o0[PR], o1[PR];
    for (int r = 0; r < PR; ++r) { o0[r] = V::zero(); o1[r] = V::zero(); }
    for (int64_t j0 = 0; j0 < hi; j0 += src.len) {
      const int64_t j1 = std::min(hi, j0 + src.len);
      const float* vr = v + src.seg[j0 / src.len] + d0;
      for (int64_t j = j0; j < j1; ++j, vr += src.stride) {
        const typename V::reg v0 = V::load(vr), v1 = V::load(vr + W);
        for (int r = 0; r < PR; ++r) {
          const typename V::reg pv = V::bcast(scores[r * Lp + j]);
          o0[r] = V::fma(pv, v0, o0[r]);
          o1[r] = V::fma(pv, v1, o1[r]);
        }
      }
    }
    for (int r = 0; r < rows; ++r) {
      V::store(out[r] + d0, V::mul(o0[r], V::bcast(inv[r])));
      V::store(out[r] + d0 + W, V::mul(o1[r], V::bcast(inv[r])));
    }
  }
  for (; d0 + W <= D; d0 += W) {
    typename V::reg o0[PR];
    for (int r = 0; r < PR; ++r) o0[r] = V::zero();
    for (int64_t j0 = 0; j0 < hi; j0 += src.len) {
      const int64_t j1 = std::min(hi, j0 + src.len);
      const float* vr = v + src.seg[j0 / src.len] + d0;
      for (int64_t j = j0; j < j1; ++j, vr += src.stride) {
        const typename V::reg v0 = V::load(vr);
        for (int r = 0; r < PR; ++r) o0[r] = V::fma(V::bcast(scores[r * Lp + j]), v0, o0[r]);
      }
    }
    for (int r = 0; r < rows; ++r) V::store(out[r] + d0, V::mul(o0[r], V::bcast(inv[r])));
  }
  for (; d0 < D; ++d0) {
    for (int r = 0; r < rows; ++r) {
      float acc = 0.0f;
      for (int64_t j0 = 0; j0 < hi; j0 += src.len) {
        const int64_t j1 = std::min(hi, j0 + src.len);
        const float* vr = v + src.seg[j0 / src.len] + d0;
        for (int64_t j = j0; j < j1; ++j, vr += src.stride) acc += scores[r * Lp + j] * *vr;
      }
      out[r][d0] = acc * inv[r];
    }
  }
}

// A prompt's attention for (row, head) pairs [i0, i1) (pair = b * H + h; the heads of a group are consecutive
// pairs and share kt), blocked as above.
void prompt_pairs(const Prompt& a, int64_t i0, int64_t i1) {
  const int64_t D = a.D, Lk = a.Lk, Lq = a.Lq, groups = a.H / a.kv;
  const int64_t Lp = (Lk + 2 * W - 1) / (2 * W) * (2 * W);
  std::vector<float> kt(size_t(D * Lp)), scores(size_t(PR * Lp));
  int64_t packed = -1, base = 0;
  const Rows src{&base, std::max<int64_t>(Lk, 1), a.kv * D};   // token-major: one segment, kv * D apart
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / a.H, h = i % a.H, g = h / groups;
    if (b * a.kv + g != packed) {
      packed = b * a.kv + g;
      base = (b * Lk * a.kv + g) * D;
      gather_keys(a.k, src, Lk, D, Lp, kt.data());
    }
    for (int64_t q0 = 0; q0 < Lq; q0 += PR) {
      const int rows = int(std::min<int64_t>(PR, Lq - q0));
      const float* qr[PR];
      float* out[PR];
      const int32_t* mr[PR];
      int64_t hi = 0;
      for (int r = 0; r < PR; ++r) {
        const int64_t qi = b * Lq + q0 + std::min(r, rows - 1);  // rows past Lq repeat the last: not stored
        qr[r] = a.q + (qi * a.H + h) * D;
        out[r] = a.out + (qi * a.H + h) * D;
        mr[r] = a.mask + qi * Lk;
        hi = std::max(hi, a.last[qi] == 0 ? Lk : a.last[qi]);
      }
      const int64_t hw = (hi + W - 1) / W * W, hp = (hi + 2 * W - 1) / (2 * W) * (2 * W);
      score_block(kt.data(), Lp, D, qr, hp, scores.data());
      float inv[PR];
      for (int r = 0; r < PR; ++r) inv[r] = softmax_row(scores.data() + r * Lp, mr[r], hi, hw);
      weighted_values(a.v, src, scores.data(), Lp, inv, rows, hi, D, out);
    }
  }
}

void prompt_attention(Prompt a) {
  std::vector<int64_t> last(size_t(a.B * a.Lq));
  for (int64_t i = 0; i < a.B * a.Lq; ++i) {
    const int32_t* m = a.mask + i * a.Lk;
    int64_t e = a.Lk;
    while (e > 0 && m[e - 1] == 0) --e;
    last[i] = e;
  }
  a.last = last.data();
  const int64_t pairs = a.B * a.H;
  const int threads = thread_count(2.0 * double(pairs) * double(a.Lq) * double(a.Lk) * double(a.D));
  parallel_ranges(pairs, threads, [&](int64_t b, int64_t e) { prompt_pairs(a, b, e); });
}

// Paged attention for (run, head) units [u0, u1) (unit = run * H + h): a single token streams its row's
// blocks (attend_one); a run (a prompt chunk: query j attends keys [0, L0 + j)) gathers keys [0, L0 + n - 1)
// from its blocks into kt once per KV head and takes the blocked path, each query's softmax cut at its own
// L and the block's keys at its last query's.
void paged_units(const Paged& a, int64_t u0, int64_t u1) {
  const int64_t D = a.D, H = a.H, groups = a.H / a.kv;
  std::vector<float> kt, scores;
  std::vector<int64_t> seg;
  int64_t cur = -1;                                       // run * kv + g whose blocks are in seg (and kt)
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t ri = u / H, h = u % H, g = h / groups;
    const Run& run = a.runs[ri];
    const int64_t Lmax = run.L0 + run.n - 1, Lp = (Lmax + 2 * W - 1) / (2 * W) * (2 * W);
    if (ri * a.kv + g != cur) {
      cur = ri * a.kv + g;
      const int32_t* blocks = a.tables + run.r * a.MB;
      seg.resize(size_t((Lmax + a.BS - 1) / a.BS));
      for (size_t s = 0; s < seg.size(); ++s) seg[s] = (int64_t(blocks[s]) * a.kv + g) * a.BS * D;
      if (run.n > 1) {
        kt.resize(size_t(D * Lp));
        gather_keys(a.k, Rows{seg.data(), a.BS, D}, Lmax, D, Lp, kt.data());
      }
    }
    const Rows src{seg.data(), a.BS, D};                   // a block's rows are contiguous
    const size_t need = size_t(run.n > 1 ? PR * Lp : Lmax);
    if (scores.size() < need) scores.resize(need);
    if (run.n == 1) {
      const int64_t o = (run.first * H + h) * D;
      attend_one(a.q + o, a.k, a.v, src, Lmax, D, scores.data(), a.out + o);
      continue;
    }
    for (int64_t q0 = 0; q0 < run.n; q0 += PR) {
      const int rows = int(std::min<int64_t>(PR, run.n - q0));
      const float* qr[PR];
      float* out[PR];
      int64_t lim[PR];
      for (int r = 0; r < PR; ++r) {
        const int64_t j = q0 + std::min(r, rows - 1);     // rows past the run repeat the last: not stored
        qr[r] = a.q + ((run.first + j) * H + h) * D;
        out[r] = a.out + ((run.first + j) * H + h) * D;
        lim[r] = run.L0 + j;
      }
      const int64_t hi = lim[PR - 1];
      const int64_t hw = (hi + W - 1) / W * W, hp = (hi + 2 * W - 1) / (2 * W) * (2 * W);
      score_block(kt.data(), Lp, D, qr, hp, scores.data());
      float inv[PR];
      for (int r = 0; r < PR; ++r) inv[r] = softmax_row(scores.data() + r * Lp, nullptr, lim[r], hw);
      weighted_values(a.v, src, scores.data(), Lp, inv, rows, hi, D, out);
    }
  }
}

void paged_attention(const Paged& a) {
  // a unit's cost ~ the positions its queries attend (+ a little per unit): a prompt chunk's unit can cost
  // hundreds of decode ones, so equal unit counts per thread would leave threads idle
  std::vector<double> cost(size_t(a.nruns * a.H) + 1, 0.0);
  double work = 0.0;
  for (int64_t ri = 0; ri < a.nruns; ++ri) {
    const Run& run = a.runs[ri];
    const double c = double(run.n) * (double(run.L0) + 0.5 * double(run.n - 1));
    work += c;
    for (int64_t h = 0; h < a.H; ++h) cost[ri * a.H + h + 1] = cost[ri * a.H + h] + c + 16.0;
  }
  const int threads = thread_count(2.0 * double(a.H) * work * double(a.D));
  parallel_costed(cost, threads, [&](int64_t b, int64_t e) { paged_units(a, b, e); });
}

// The small per-token steps around the matmuls, one pass each instead of MindSpore's 2-6 ops (which cost a
// launch apiece in a decode step and a pass over the activations apiece in a prompt run op by op).

// y = w * (x * 1 / sqrt(mean(x^2) + eps)) per row of C (LlamaRMSNorm in float32), rows [r0, r1).
void rms_rows(const float* x, const float* w, float eps, float* y, int64_t C, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    typename V::reg acc = V::zero();
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      const typename V::reg v = V::load(xr + c);
      acc = V::fma(v, v, acc);
    }
    float ss = V::sum(acc);
    for (; c < C; ++c) ss += xr[c] * xr[c];
    const float inv = 1.0f / std::sqrt(ss / float(C) + eps);
    const typename V::reg iv = V::bcast(inv);
    for (c = 0; c + W <= C; c += W) V::store(yr + c, V::mul(V::load(w + c), V::mul(V::load(xr + c), iv)));
    for (; c < C; ++c) yr[c] = w[c] * (xr[c] * inv);
  }
}

// y = silu(g) * u = g / (1 + exp(-g)) * u over [i0, i1).
void swiglu_range(const float* g, const float* u, float* y, int64_t i0, int64_t i1) {
  const typename V::reg one = V::bcast(1.0f);
  int64_t i = i0;
  for (; i + W <= i1; i += W) {
    const typename V::reg gv = V::load(g + i);
    const typename V::reg e = V::exp(V::mul(gv, V::bcast(-1.0f)));
    V::store(y + i, V::mul(V::div(gv, e + one), V::load(u + i)));
  }
  for (; i < i1; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// Rotary embedding of token n's heads: out = x * cos + swap_halves(x) * sin, with cos / sin [D] the token's
// tables (sin with its first half negated, so that this equals transformers' x * cos + rotate_half(x) * sin),
// rows (token, head) [r0, r1) of x [N, Hx, D].
void rotary_rows(const float* x, const float* cs, const float* sn, float* y, int64_t Hx, int64_t D, int64_t r0,
                 int64_t r1) {
  const int64_t half = D / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / Hx;
    const float* xr = x + r * D;
    const float* c = cs + n * D;
    const float* sv = sn + n * D;
    float* yr = y + r * D;
    int64_t d = 0;
    if (half % W == 0) {
      for (; d < half; d += W)
        V::store(yr + d, V::fma(V::load(xr + d + half), V::load(sv + d), V::mul(V::load(xr + d), V::load(c + d))));
      for (; d < D; d += W)
        V::store(yr + d, V::fma(V::load(xr + d - half), V::load(sv + d), V::mul(V::load(xr + d), V::load(c + d))));
    }
    for (; d < D; ++d) yr[d] = xr[d] * c[d] + xr[d < half ? d + half : d - half] * sv[d];
  }
}

void rms_norm(const float* x, const float* w, float eps, float* y, int64_t N, int64_t C) {
  const int threads = thread_count(4.0 * double(N) * double(C));
  parallel_ranges(N, threads, [&](int64_t a, int64_t b) { rms_rows(x, w, eps, y, C, a, b); });
}

void swiglu(const float* g, const float* u, float* y, int64_t n) {
  const int threads = thread_count(16.0 * double(n));
  parallel_ranges(n, threads, [&](int64_t a, int64_t b) { swiglu_range(g, u, y, a, b); });
}

void rotary(const float* x, const float* cs, const float* sn, float* y, int64_t N, int64_t Hx, int64_t D) {
  const int threads = thread_count(4.0 * double(N) * double(Hx) * double(D));
  parallel_ranges(N * Hx, threads, [&](int64_t a, int64_t b) { rotary_rows(x, cs, sn, y, Hx, D, a, b); });
}

#endif
