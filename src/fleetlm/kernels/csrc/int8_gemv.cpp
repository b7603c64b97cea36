// Weight-only int8 matrix-vector / skinny matrix product for CPU decode.
//
//   y[M, N] = (x[M, K] @ w[N, K].T) * scales[N]      (fp32 accumulation)
//
// x: float32 or bfloat16, w: int8 (row-major [N, K], contiguous), scales: x's dtype.
// Built for small M (single-stream decode, M = 1..8): each weight row is streamed from
// memory once and reused for every row of x (row blocks of R weight rows stay in L1 while
// the M rows of x are walked in chunks of up to kMaxMB). The int8 weights are widened in
// registers (int8 -> int32 -> fp32) and FMA'd against x in fp32, so the memory traffic is
// 1 byte per weight -- the bound for decode on a CPU.
//
// Code paths, chosen at run time (cpu_isa.h; the library is built without -march=native):
//   avx512  16-wide, R = 4 weight rows x 4 rows of x, masked K tail (AVX512F/BW/VL/DQ)
//   avx2    8-wide FMA, R = 4 x 2 rows of x (16 ymm registers), scalar K tail (AVX2+FMA)
//   neon    4-wide FMA on aarch64, R = 4 x 4 rows of x, scalar K tail
//   scalar  plain loops (the compiler's baseline vectorisation only)
// All share the blocking/threading driver below (gemv_impl), templated on the path. For
// M >= kBatchMinM (10) the avx512 and avx2 paths switch to a batched variant
// (gemv_batched): each 4-row weight block is widened to fp32 once into a per-thread buffer
// and swept by all rows of x, 6 (avx2: 3) at a time, instead of being re-widened per pass;
// about 1.2-1.4x faster at M = 32.
// Ops: `fleetlm::int8_linear`, `fleetlm::int8_linear_isa() -> str` (the path in use) and
// `fleetlm::int8_linear_set_isa(str) -> str` (force one; see cpu_isa.h).
//
// The fake/meta kernel for torch.compile lives in fleetlm/kernels/int8_gemv.py.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <torch/types.h>

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

#if defined(FLEETLM_X86)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace fleetlm {
namespace {

// Minimum weight bytes per parallel task: below this the fork/join costs more than it saves.
constexpr int64_t kMinBytesPerTask = 16 * 1024;
// Software prefetch: the next row block into L1, and the block about kPrefetchFarBytes
// beyond it into L2. Without it the kernel is only as fast as ATen's; the far L2 prefetch
// adds another ~10-15% on cold weights here.
constexpr int64_t kPrefetchFarBytes = 9 * 1024;

// Every path's micro-kernel has this contract:
//   dot_block<R, MB>(x, ldx, w, K, pf, pf_far, out): out[m * R + r] = dot(x[m, :], w[r, :])
//   for r < R, m < MB; x rows are ldx floats apart, w rows K bytes apart. `pf` / `pf_far`
//   point at the next row block / the one ~kPrefetchFarBytes beyond it (prefetched into
//   L1 / L2), or are nullptr.

#if defined(FLEETLM_X86)

// ------------------------------------------------------------------ AVX-512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {

// 16 int8 weights -> 16 fp32
static inline __m512 load_w16(const int8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
}

static inline __m512 load_w16_tail(const int8_t* p, int n) {
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

// out[m * R + r] = dot(x[m, :], w[r, :]) for r < R, m < MB.
// x rows are ldx floats apart, w rows K bytes apart. `pf` / `pf_far` point at the next row
// block / the one ~kPrefetchFarBytes beyond it (prefetched into L1 / L2), or are nullptr.
template <int R, int MB>
static inline void dot_block(const float* __restrict x, int64_t ldx, const int8_t* __restrict w,
                             int64_t K, const int8_t* pf, const int8_t* pf_far,
                             float* __restrict out) {
  __m512 acc[MB][R];
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();

  auto step = [&](int64_t k) __attribute__((always_inline)) {
    __m512 wf[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) wf[r] = load_w16(w + r * K + k);
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wf[r], acc[m][r]);
    }
  };

  int64_t k = 0;
  // 64 weights (one cache line per row) per iteration, one prefetch per row and line
  for (; k + 64 <= K; k += 64) {
    if (pf != nullptr) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(pf + r * K + k), _MM_HINT_T0);
    }
    if (pf_far != nullptr) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(pf_far + r * K + k), _MM_HINT_T1);
    }
    step(k);
    step(k + 16);
    step(k + 32);
    step(k + 48);
  }
  for (; k + 16 <= K; k += 16) step(k);
  if (k < K) {
    const int n = static_cast<int>(K - k);
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
    __m512 wf[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) wf[r] = load_w16_tail(w + r * K + k, n);
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wf[r], acc[m][r]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// ---- batched variant (M >= kBatchMinM, see batched_block): widen4 widens a block of 4
// weight rows to fp32 once (rows Kp floats apart, zero-padded to a multiple of 16);
// dot4_rows sweeps it with up to 6 rows of x (24 accumulators); reduce4 reduces 4
// accumulators at once.

// [sum(a0), sum(a1), sum(a2), sum(a3)]
static inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  // per 128-bit lane: [a0_0 + a0_2, a1_0 + a1_2, a0_1 + a0_3, a1_1 + a1_3], same for a2, a3
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  // per 128-bit lane: [a0, a1, a2, a3] partial sums
  const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
  const __m256 v = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
  return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

// 4 weight rows (K int8 each, K apart) -> buf (4 rows of Kp fp32, zeros beyond K); the
// next block (pf, or nullptr) is prefetched into L2 on the way.
constexpr int64_t kPad = 16;
static void widen4(const int8_t* w, int64_t K, int64_t Kp, const int8_t* pf, float* buf) {
  for (int r = 0; r < 4; ++r) {
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      if (pf != nullptr && (k & 63) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(pf + r * K + k), _MM_HINT_T1);
      _mm512_storeu_ps(buf + r * Kp + k, load_w16(w + r * K + k));
    }
    if (k < K) _mm512_storeu_ps(buf + r * Kp + k, load_w16_tail(w + r * K + k, int(K - k)));
  }
}

// out[m] = [dot(x[m], wb[r]) for r < 4], m < MB
template <int MB>
static inline void dot4_f32(const float* __restrict x, int64_t ldx, const float* __restrict wb,
                            int64_t Kp, int64_t K, __m128* out) {
  __m512 acc[MB][4];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  auto step = [&](int64_t k, __mmask16 mask) __attribute__((always_inline)) {
    __m512 wv[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) wv[r] = _mm512_loadu_ps(wb + r * Kp + k);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) step(k, 0xFFFF);
  if (k < K) step(k, static_cast<__mmask16>((1u << (K - k)) - 1u));
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) out[m] = reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
}

// out[m] = [dot(x[m], wb[r]) for r < 4], m < mb (1..kBatchRows)
constexpr int kBatchRows = 6;
static void dot4_rows(int64_t mb, const float* x, int64_t K, const float* wb, int64_t Kp,
                      __m128* out) {
  switch (mb) {
    case 6: return dot4_f32<6>(x, K, wb, Kp, K, out);
    case 5: return dot4_f32<5>(x, K, wb, Kp, K, out);
    case 4: return dot4_f32<4>(x, K, wb, Kp, K, out);
    case 3: return dot4_f32<3>(x, K, wb, Kp, K, out);
    case 2: return dot4_f32<2>(x, K, wb, Kp, K, out);
    default: return dot4_f32<1>(x, K, wb, Kp, K, out);
  }
}

}  // namespace avx512
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX2 + FMA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

// 8 int8 weights -> 8 fp32
static inline __m256 load_w8(const int8_t* p) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R, int MB>
static inline void dot_block(const float* __restrict x, int64_t ldx, const int8_t* __restrict w,
                             int64_t K, const int8_t* pf, const int8_t* pf_far,
                             float* __restrict out) {
  __m256 acc[MB][R];
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();

  auto step = [&](int64_t k) __attribute__((always_inline)) {
    __m256 wf[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) wf[r] = load_w8(w + r * K + k);
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wf[r], acc[m][r]);
    }
  };

  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {  // one cache line per weight row and iteration
    if (pf != nullptr) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(pf + r * K + k), _MM_HINT_T0);
    }
    if (pf_far != nullptr) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(pf_far + r * K + k), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int j = 0; j < 64; j += 8) step(k + j);
  }
  for (; k + 8 <= K; k += 8) step(k);
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t t = k; t < K; ++t) s += x[m * ldx + t] * static_cast<float>(w[r * K + t]);
      out[m * R + r] = s;
    }
}

// ---- batched variant, as avx512's: widen4 to fp32 rows padded to a multiple of 8, up to
// 3 rows of x per sweep (12 accumulators + 3 x + 1 w = the 16 ymm registers).

static inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  // per 128-bit lane [sum a0, sum a1, sum a2, sum a3], then the two lanes added
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

constexpr int64_t kPad = 8;
static void widen4(const int8_t* w, int64_t K, int64_t Kp, const int8_t* pf, float* buf) {
  for (int r = 0; r < 4; ++r) {
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      if (pf != nullptr && (k & 63) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(pf + r * K + k), _MM_HINT_T1);
      _mm256_storeu_ps(buf + r * Kp + k, load_w8(w + r * K + k));
    }
    if (k < K) {
      alignas(16) int8_t tail[8] = {0};
      std::memcpy(tail, w + r * K + k, static_cast<size_t>(K - k));
      _mm256_storeu_ps(buf + r * Kp + k, load_w8(tail));
    }
  }
}

template <int MB>
static inline void dot4_f32(const float* __restrict x, int64_t ldx, const float* __restrict wb,
                            int64_t Kp, int64_t K, __m128* out) {
  __m256 acc[MB][4];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_setzero_ps();
  auto step = [&](int64_t k, bool full, __m256i mask) __attribute__((always_inline)) {
    __m256 xv[MB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m)
      xv[m] = full ? _mm256_loadu_ps(x + m * ldx + k) : _mm256_maskload_ps(x + m * ldx + k, mask);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m256 wv = _mm256_loadu_ps(wb + r * Kp + k);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);
    }
  };
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) step(k, true, _mm256_setzero_si256());
  if (k < K) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    step(k, false, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(K - k)), lanes));
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) out[m] = reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
}

constexpr int kBatchRows = 3;
static void dot4_rows(int64_t mb, const float* x, int64_t K, const float* wb, int64_t Kp,
                      __m128* out) {
  switch (mb) {
    case 3: return dot4_f32<3>(x, K, wb, Kp, K, out);
    case 2: return dot4_f32<2>(x, K, wb, Kp, K, out);
    default: return dot4_f32<1>(x, K, wb, Kp, K, out);
  }
}

}  // namespace avx2
#pragma GCC pop_options

#endif  // FLEETLM_X86

#if defined(__aarch64__)

// ------------------------------------------------------------------ NEON (aarch64)
namespace neon {

template <int R, int MB>
static inline void dot_block(const float* __restrict x, int64_t ldx, const int8_t* __restrict w,
                             int64_t K, const int8_t* pf, const int8_t* pf_far,
                             float* __restrict out) {
  float32x4_t acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = vdupq_n_f32(0.f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 63) == 0) {
      for (int r = 0; r < R; ++r) {
        if (pf != nullptr) __builtin_prefetch(pf + r * K + k, 0, 3);
        if (pf_far != nullptr) __builtin_prefetch(pf_far + r * K + k, 0, 2);
      }
    }
    float32x4_t wlo[R], whi[R];
    for (int r = 0; r < R; ++r) {
      const int16x8_t v = vmovl_s8(vld1_s8(w + r * K + k));
      wlo[r] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(v)));
      whi[r] = vcvtq_f32_s32(vmovl_high_s16(v));
    }
    for (int m = 0; m < MB; ++m) {
      const float32x4_t xlo = vld1q_f32(x + m * ldx + k);
      const float32x4_t xhi = vld1q_f32(x + m * ldx + k + 4);
      for (int r = 0; r < R; ++r) {
        acc[m][r] = vfmaq_f32(acc[m][r], xlo, wlo[r]);
        acc[m][r] = vfmaq_f32(acc[m][r], xhi, whi[r]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      float s = vaddvq_f32(acc[m][r]);
      for (int64_t t = k; t < K; ++t) s += x[m * ldx + t] * static_cast<float>(w[r * K + t]);
      out[m * R + r] = s;
    }
}

}  // namespace neon

#endif  // __aarch64__

// ------------------------------------------------------------------ scalar
namespace scalar {

template <int R, int MB>
static inline void dot_block(const float* __restrict x, int64_t ldx, const int8_t* __restrict w,
                             int64_t K, const int8_t* /*pf*/, const int8_t* /*pf_far*/,
                             float* __restrict out) {
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < R; ++r) {
      const float* xr = x + m * ldx;
      const int8_t* wr = w + r * K;
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xr[k] * static_cast<float>(wr[k]);
      out[m * R + r] = s;
    }
  }
}

}  // namespace scalar

// ------------------------------------------------------------------ paths
// kRows: weight rows per block; kMaxMB: rows of x per pass (accumulators = kRows * kMaxMB).
// The driver calls dot() out of line (it is compiled for the baseline ISA).

#define FLEETLM_INT8_PATH(NAME, NS, ROWS, MAX_MB)                                            \
  struct NAME {                                                                              \
    static constexpr int kRows = ROWS;                                                       \
    static constexpr int kMaxMB = MAX_MB;                                                    \
    template <int R, int MB>                                                                 \
    static void dot(const float* x, int64_t ldx, const int8_t* w, int64_t K,                 \
                    const int8_t* pf, const int8_t* pf_far, float* out) {                    \
      NS::dot_block<R, MB>(x, ldx, w, K, pf, pf_far, out);                                   \
    }                                                                                        \
  };

#if defined(FLEETLM_X86)
FLEETLM_INT8_PATH(Avx512Path, avx512, 4, 4)
FLEETLM_INT8_PATH(Avx2Path, avx2, 4, 2)
#endif
#if defined(__aarch64__)
FLEETLM_INT8_PATH(NeonPath, neon, 4, 4)
#endif
FLEETLM_INT8_PATH(ScalarPath, scalar, 4, 4)
#undef FLEETLM_INT8_PATH

// ------------------------------------------------------------------ driver

// y[m0 .. m0+MB, n0 .. n0+R] from one pass over the weight row block at w[n0 * K].
template <class Path, int R, int MB, typename T>
static inline void pass(const float* x, int64_t m0, int64_t K, const int8_t* w, const T* scales,
                        int64_t n0, int64_t N, const int8_t* pf, const int8_t* pf_far, T* y) {
  float out[MB * R];
  Path::template dot<R, MB>(x + m0 * K, K, w + n0 * K, K, pf, pf_far, out);
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < R; ++r)
      y[(m0 + i) * N + n0 + r] = static_cast<T>(out[i * R + r] * static_cast<float>(scales[n0 + r]));
}

// Rows [n0, n0 + R) of the output, for all M rows of x: the first pass streams the block
// from memory (and prefetches the next ones), later passes find it in L1.
template <class Path, int R, typename T>
static inline void row_block(const float* x, int64_t M, int64_t K, const int8_t* w,
                             const T* scales, int64_t n0, int64_t N, const int8_t* pf,
                             const int8_t* pf_far, T* y) {
  constexpr int MB = Path::kMaxMB;
  int64_t m = 0;
  for (; m + MB <= M; m += MB, pf = pf_far = nullptr)
    pass<Path, R, MB, T>(x, m, K, w, scales, n0, N, pf, pf_far, y);
  const int64_t rest = M - m;  // 0 .. MB - 1
  if constexpr (MB > 3) {
    if (rest == 3) return pass<Path, R, 3, T>(x, m, K, w, scales, n0, N, pf, pf_far, y);
  }
  if constexpr (MB > 2) {
    if (rest == 2) return pass<Path, R, 2, T>(x, m, K, w, scales, n0, N, pf, pf_far, y);
  }
  if constexpr (MB > 1) {
    if (rest == 1) return pass<Path, R, 1, T>(x, m, K, w, scales, n0, N, pf, pf_far, y);
  }
}

template <class Path, typename T>
static void gemv_impl(const float* x, int64_t M, int64_t K, const int8_t* w,
                      const T* scales, int64_t N, T* y) {
  constexpr int R = Path::kRows;
  const int64_t nblocks = N / R;
  const int64_t tail_start = nblocks * R;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / std::max<int64_t>(1, R * K));
  const int64_t far = std::max<int64_t>(1, kPrefetchFarBytes / std::max<int64_t>(1, R * K));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * R;
      const int8_t* pf = (b + 1 < nblocks) ? w + (n0 + R) * K : nullptr;
      const int8_t* pf_far =
          (b + 1 + far < nblocks) ? w + (n0 + (1 + far) * R) * K : nullptr;
      row_block<Path, R, T>(x, M, K, w, scales, n0, N, pf, pf_far, y);
    }
  });
  // leftover rows (N % R), one at a time
  for (int64_t n = tail_start; n < N; ++n)
    row_block<Path, 1, T>(x, M, K, w, scales, n, N, nullptr, nullptr, y);
}

#if defined(FLEETLM_X86)
// Batched variant for M >= kBatchMinM (avx512 and avx2; NS is the path's namespace):
// each block of 4 weight rows is widened to fp32 once, into a per-thread buffer, and then
// swept by every row of x, NS::kBatchRows rows at a time -- instead of being re-widened
// for every 4 (avx2: 2) rows of x. Below kBatchMinM the widening costs more than it saves.
constexpr int64_t kBatchMinM = 10;

#define FLEETLM_INT8_BATCHED(NAME, NS)                                                       \
  struct NAME {                                                                              \
    static constexpr int kBatchRows = NS::kBatchRows;                                        \
    static constexpr int64_t kPad = NS::kPad;                                                \
    static void widen4(const int8_t* w, int64_t K, int64_t Kp, const int8_t* pf, float* b) { \
      NS::widen4(w, K, Kp, pf, b);                                                           \
    }                                                                                        \
    static void dot4_rows(int64_t mb, const float* x, int64_t K, const float* wb,            \
                          int64_t Kp, __m128* out) {                                         \
      NS::dot4_rows(mb, x, K, wb, Kp, out);                                                  \
    }                                                                                        \
  };
FLEETLM_INT8_BATCHED(Avx512Batched, avx512)
FLEETLM_INT8_BATCHED(Avx2Batched, avx2)
#undef FLEETLM_INT8_BATCHED

// y[m, 0..4) (rows N apart) for all M rows of x from the 4 weight rows at w
template <class B, typename T>
static void batched_block(const float* x, int64_t M, int64_t K, const int8_t* w,
                          const T* scales, int64_t N, const int8_t* pf, float* buf, T* y) {
  const int64_t Kp = (K + B::kPad - 1) / B::kPad * B::kPad;
  B::widen4(w, K, Kp, pf, buf);
  float s[4];
  for (int r = 0; r < 4; ++r) s[r] = static_cast<float>(scales[r]);
  const __m128 sv = _mm_loadu_ps(s);
  __m128 out[B::kBatchRows];
  // passes of equal size (M = 13, 6 rows a pass: 5 + 4 + 4, not 6 + 6 + 1)
  const int64_t passes = (M + B::kBatchRows - 1) / B::kBatchRows;
  for (int64_t p = 0, m0 = 0; p < passes; ++p) {
    const int64_t mb = (M - m0) / (passes - p);
    B::dot4_rows(mb, x + m0 * K, K, buf, Kp, out);
    for (int64_t i = 0; i < mb; ++i) {
      T* yr = y + (m0 + i) * N;
      const __m128 v = _mm_mul_ps(out[i], sv);
      if constexpr (std::is_same_v<T, float>) {
        _mm_storeu_ps(yr, v);
      } else {
        float t[4];
        _mm_storeu_ps(t, v);
        for (int r = 0; r < 4; ++r) yr[r] = static_cast<T>(t[r]);
      }
    }
    m0 += mb;
  }
}

template <class B, class Path, typename T>
static void gemv_batched(const float* x, int64_t M, int64_t K, const int8_t* w,
                         const T* scales, int64_t N, T* y) {
  constexpr int R = 4;
  const int64_t nblocks = N / R;
  const int64_t Kp = (K + B::kPad - 1) / B::kPad * B::kPad;
  // about 4 x kMinBytesPerTask multiply-adds per task
  const int64_t grain = std::max<int64_t>(1, 4 * kMinBytesPerTask / std::max<int64_t>(1, R * K * M));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < R * Kp) buf.resize(static_cast<size_t>(R * Kp));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * R;
      const int8_t* pf = (b + 1 < b1) ? w + (n0 + R) * K : nullptr;
      batched_block<B, T>(x, M, K, w + n0 * K, scales + n0, N, pf, buf.data(), y + n0);
    }
  });
  // leftover rows (N % 4), as in gemv_impl
  for (int64_t n = nblocks * R; n < N; ++n)
    row_block<Path, 1, T>(x, M, K, w, scales, n, N, nullptr, nullptr, y);
}
#endif

#if defined(FLEETLM_X86)
#include "int8_bf16dot.inc"  // bf16dot::gemm: the batched path with vdpbf16ps
#endif

// the path chosen at run time (cpu::current() only returns paths this CPU supports)
template <typename T>
static void gemv(const float* x, int64_t M, int64_t K, const int8_t* w, const T* scales,
                 int64_t N, T* y) {
  switch (cpu::current()) {
#if defined(FLEETLM_X86)
    case cpu::Isa::kAvx512:
      if (M >= kBatchMinM)
        return gemv_batched<Avx512Batched, Avx512Path, T>(x, M, K, w, scales, N, y);
      return gemv_impl<Avx512Path, T>(x, M, K, w, scales, N, y);
    case cpu::Isa::kAvx2:
      if (M >= kBatchMinM)
        return gemv_batched<Avx2Batched, Avx2Path, T>(x, M, K, w, scales, N, y);
      return gemv_impl<Avx2Path, T>(x, M, K, w, scales, N, y);
#endif
#if defined(__aarch64__)
    case cpu::Isa::kNeon:
      return gemv_impl<NeonPath, T>(x, M, K, w, scales, N, y);
#endif
    default:
      return gemv_impl<ScalarPath, T>(x, M, K, w, scales, N, y);
  }
}

at::Tensor int8_linear_cpu(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scales_in) {
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu() && scales_in.device().is_cpu(),
              "fleetlm::int8_linear: all tensors must be on CPU, got x on ", x_in.device(),
              ", w on ", w.device(), ", scales on ", scales_in.device());
  TORCH_CHECK(x_in.dim() == 2, "fleetlm::int8_linear: x must be 2-D [M, K], got shape ",
              x_in.sizes());
  TORCH_CHECK(w.dim() == 2, "fleetlm::int8_linear: w must be 2-D [N, K], got shape ", w.sizes());
  TORCH_CHECK(scales_in.dim() == 1, "fleetlm::int8_linear: scales must be 1-D [N], got shape ",
              scales_in.sizes());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "fleetlm::int8_linear: x must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(w.scalar_type() == at::kChar, "fleetlm::int8_linear: w must be int8, got ",
              w.scalar_type());
  TORCH_CHECK(scales_in.scalar_type() == dtype,
              "fleetlm::int8_linear: scales must have x's dtype (", dtype, "), got ",
              scales_in.scalar_type());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "fleetlm::int8_linear: shape mismatch, x is ", x_in.sizes(),
              " but w is ", w.sizes(), " (x.size(1) must equal w.size(1))");
  TORCH_CHECK(scales_in.size(0) == N, "fleetlm::int8_linear: scales has ", scales_in.size(0),
              " elements but w has ", N, " rows");
  // Copying the weight on every call would silently cost more than the product itself.
  TORCH_CHECK(w.is_contiguous(), "fleetlm::int8_linear: w must be contiguous");

  auto y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();

  const at::Tensor x = x_in.contiguous();
  const int8_t* wp = w.data_ptr<int8_t>();

  // scales are read in their own dtype (T, same as x and y); x is widened to fp32 once
  const at::Tensor s = scales_in.contiguous();
  if (dtype == at::kFloat) {
    gemv<float>(x.data_ptr<float>(), M, K, wp, s.data_ptr<float>(), N, y.data_ptr<float>());
  } else {
    const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
#if defined(FLEETLM_X86)
    if (M >= kBatchMinM && bf16dot::enabled()) {  // x stays bfloat16
      bf16dot::gemm(xb, M, K, wp, s.data_ptr<c10::BFloat16>(), N, y.data_ptr<c10::BFloat16>());
      return y;
    }
#endif
    std::vector<float> xbuf(static_cast<size_t>(M * K));
    for (int64_t i = 0; i < M * K; ++i) xbuf[i] = static_cast<float>(xb[i]);
    gemv<c10::BFloat16>(xbuf.data(), M, K, wp, s.data_ptr<c10::BFloat16>(), N,
                        y.data_ptr<c10::BFloat16>());
  }
  return y;
}

// fleetlm::decode_stack_int8: a whole one-row decode step on these GEMV paths
#include "decode_stack.inc"

std::string int8_linear_isa() { return cpu::isa_name(cpu::current()); }

std::string int8_linear_set_isa(const std::string& isa) { return cpu::set_isa(isa); }

#if defined(FLEETLM_X86)
bool int8_linear_bf16dot() { return bf16dot::enabled(); }
bool int8_linear_set_bf16dot(const std::string& how) { return bf16dot::set(how); }
#else
bool int8_linear_bf16dot() { return false; }
bool int8_linear_set_bf16dot(const std::string& how) {
  TORCH_CHECK(how == "on" || how == "off" || how == "auto", "fleetlm: '", how,
              "' is not one of auto, on, off");
  return false;
}
#endif

}  // namespace
}  // namespace fleetlm

TORCH_LIBRARY(fleetlm, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int8_linear_isa() -> str", &fleetlm::int8_linear_isa);
  m.def("decode_stack_int8(Tensor x, Tensor[] weights, Tensor(a!)[] k_cache, "
        "Tensor(b!)[] v_cache, Tensor cos, Tensor sin, int slot, int pos0, int window, float eps, "
        "int num_heads, int num_kv_heads) -> Tensor");
  m.def("int8_linear_set_isa(str isa) -> str", &fleetlm::int8_linear_set_isa);
  m.def("int8_linear_bf16dot() -> bool", &fleetlm::int8_linear_bf16dot);
  m.def("int8_linear_set_bf16dot(str how) -> bool", &fleetlm::int8_linear_set_bf16dot);
}

TORCH_LIBRARY_IMPL(fleetlm, CPU, m) {
  m.impl("int8_linear", &fleetlm::int8_linear_cpu);
  m.impl("decode_stack_int8", &fleetlm::decode_stack_int8_cpu);
}
