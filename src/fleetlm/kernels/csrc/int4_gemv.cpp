// Weight-only 4-bit (group-wise, asymmetric) matrix-vector / skinny matrix product for CPU
// decode:
//
//   y[M, N] = x[M, K] @ W[N, K].T,   W[n, k] = q[n, k] * scales[n, g] + mins[n, g],  g = k / G
//
// (fp32 accumulation). The format ("int4 group-wise", see fleetlm/kernels/int4_gemv.py):
//   packed  uint8 [N, K / 2]  two 4-bit codes q in 0..15 per byte. Each run of 32 weights
//                             (k0 .. k0+31, k0 a multiple of 32) is 16 bytes, and byte j of
//                             it holds q[k0 + j] in its low nibble and q[k0 + 16 + j] in its
//                             high nibble -- so one 16-byte load, an AND and a shift give 16
//                             consecutive codes each (llama.cpp's Q4 order).
//   scales  float32 [N, K / G] per-group step,  mins  float32 [N, K / G] per-group offset.
//   G (group_size) is a multiple of 32 and divides K (checked).
// x: float32 or bfloat16 (widened to fp32 once); y has x's dtype.
//
// At 32 weights per group that is 16 + 8 bytes per 32 weights = 0.75 byte/weight (int8: 1,
// float32: 4). The codes are widened in registers (u8 -> i32 -> fp32) and dequantised with
// one FMA (q * scale + min) per 16 (avx2: 8, neon: 4) weights, then FMA'd against x.
//
// Code paths, chosen at run time (cpu_isa.h; built without -march=native):
//   avx512  16-wide, blocks of 4 weight rows x 4 rows of x
//   avx2    8-wide FMA, 4 weight rows x 2 rows of x
//   neon    4-wide FMA on aarch64, 4 weight rows x 4 rows of x
//   scalar  plain loops
// Each block of weight rows is unpacked once per pass of up to MB rows of x. For
// M >= kBatchMinM the avx512 and avx2 paths switch to a batched variant: each block of 4
// weight rows is dequantised to fp32 once into a per-thread buffer (L1/L2 resident) and
// swept by all M rows of x, 6 (avx2: 3) at a time -- each weight is unpacked once per step
// for all rows.
// Ops (a TORCH_LIBRARY_FRAGMENT: int8_gemv.cpp owns TORCH_LIBRARY(fleetlm)):
//   fleetlm::int4_linear(x, packed, scales, mins, group_size), fleetlm::int4_linear_isa(),
//   fleetlm::int4_linear_set_isa(str). The fake kernel lives in fleetlm/kernels/int4_gemv.py.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
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

// Minimum packed weight bytes per parallel task.
constexpr int64_t kMinBytesPerTask = 16 * 1024;

// Micro-kernel contract, every path:
//   dot_block<R, MB>(x, ldx, w, sc, mn, K, G, pf, out): out[m * R + r] = dot(x[m, :], W[r, :])
//   for r < R, m < MB. x rows are ldx floats apart; w rows K / 2 bytes apart; sc / mn rows
//   K / G floats apart. K is a multiple of 32 and of G. `pf` (or nullptr): the next row
//   block's packed bytes, prefetched on the way.

#if defined(FLEETLM_X86)

// ------------------------------------------------------------------ AVX-512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {

// 32 weights (16 bytes) -> lo = weights 0..15, hi = weights 16..31, dequantised. The 16
// bytes are widened to 16 dwords once (byte j -> dword j), then split: lo = d & 15,
// hi = d >> 4 -- one widening shuffle per 32 weights.
static inline void deq32(const uint8_t* p, __m512 s, __m512 mn, __m512& lo, __m512& hi) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(d, _mm512_set1_epi32(0x0F))), s, mn);
  hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4)), s, mn);
}

template <int R, int MB>
static inline void dot_block(const float* __restrict x, int64_t ldx, const uint8_t* __restrict w,
                             const float* sc, const float* mn, int64_t K, int64_t G,
                             const uint8_t* pf, float* __restrict out) {
  const int64_t K2 = K / 2, ng = K / G;
  __m512 acc[MB][R];
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512 s[R], b[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      s[r] = _mm512_set1_ps(sc[r * ng + g]);
      b[r] = _mm512_set1_ps(mn[r * ng + g]);
    }
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      if (pf != nullptr && ((k / 2) & 63) == 0) {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(pf + r * K2 + k / 2), _MM_HINT_T0);
      }
      __m512 xl[MB], xh[MB];
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        xl[m] = _mm512_loadu_ps(x + m * ldx + k);
        xh[m] = _mm512_loadu_ps(x + m * ldx + k + 16);
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        __m512 lo, hi;
        deq32(w + r * K2 + k / 2, s[r], b[r], lo, hi);
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) {
          acc[m][r] = _mm512_fmadd_ps(xl[m], lo, acc[m][r]);
          acc[m][r] = _mm512_fmadd_ps(xh[m], hi, acc[m][r]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// ---- batched variant: dequant4 writes 4 weight rows as fp32 (K apart) into buf;
// dot4_rows sweeps it with up to kBatchRows rows of x.

static void dequant4(const uint8_t* w, const float* sc, const float* mn, int64_t K, int64_t G,
                     const uint8_t* pf, float* buf) {
  const int64_t K2 = K / 2, ng = K / G;
  for (int r = 0; r < 4; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      const __m512 s = _mm512_set1_ps(sc[r * ng + g]), b = _mm512_set1_ps(mn[r * ng + g]);
      for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
        if (pf != nullptr && ((k / 2) & 63) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(pf + r * K2 + k / 2), _MM_HINT_T1);
        __m512 lo, hi;
        deq32(w + r * K2 + k / 2, s, b, lo, hi);
        _mm512_storeu_ps(buf + r * K + k, lo);
        _mm512_storeu_ps(buf + r * K + k + 16, hi);
      }
    }
}

static inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
  const __m256 v = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
  return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

// out[m] = [dot(x[m], wb[r]) for r < 4], m < MB; K a multiple of 16
template <int MB>
static inline void dot4_f32(const float* __restrict x, int64_t ldx, const float* __restrict wb,
                            int64_t K, __m128* out) {
  __m512 acc[MB][4];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 wv[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) wv[r] = _mm512_loadu_ps(wb + r * K + k);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) out[m] = reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
}

constexpr int kBatchRows = 6;
static void dot4_rows(int64_t mb, const float* x, int64_t K, const float* wb, __m128* out) {
  switch (mb) {
    case 6: return dot4_f32<6>(x, K, wb, K, out);
    case 5: return dot4_f32<5>(x, K, wb, K, out);
    case 4: return dot4_f32<4>(x, K, wb, K, out);
    case 3: return dot4_f32<3>(x, K, wb, K, out);
    case 2: return dot4_f32<2>(x, K, wb, K, out);
    default: return dot4_f32<1>(x, K, wb, K, out);
  }
}


// ---- int8 activations: one row of x -> int8 codes per run of 32 (natural order),
// their scales (max |x| / 127) and the exact sums of x per weight group.
static void quantize_x(const float* x, int64_t K, int64_t G, int8_t* xq, float* xs,
                       float* gsum) {
  for (int64_t g = 0; g < K / G; ++g) {
    gsum[g] = 0.f;
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      const __m512 v0 = _mm512_loadu_ps(x + k), v1 = _mm512_loadu_ps(x + k + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      gsum[g] += _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      xs[k / 32] = amax / 127.f;
      const __m512 idv = _mm512_set1_ps(id);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + k),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, idv))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + k + 16),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, idv))));
    }
  }
}

}  // namespace avx512

// the int8-activation micro-kernel without VNNI: vpmaddubsw + vpmaddwd
#define FLEETLM_Q8_NS avx512q8
#define FLEETLM_Q8_DPBUSD(codes, x) \
  _mm512_madd_epi16(_mm512_maddubs_epi16((codes), (x)), _mm512_set1_epi16(1))
#include "int4_q8_avx512.inc"
#undef FLEETLM_Q8_NS
#undef FLEETLM_Q8_DPBUSD
#pragma GCC pop_options

// ... and with it: vpdpbusd
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#define FLEETLM_Q8_NS avx512vnni
#define FLEETLM_Q8_DPBUSD(codes, x) _mm512_dpbusd_epi32(_mm512_setzero_si512(), (codes), (x))
#include "int4_q8_avx512.inc"
#undef FLEETLM_Q8_NS
#undef FLEETLM_Q8_DPBUSD
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX2 + FMA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

// 8 bytes of a 32-weight run -> lo = 8 weights from the low nibbles, hi = 8 from the high
// (widened to dwords once, then split with an AND and a shift)
static inline void deq8x2(const uint8_t* p, __m256 s, __m256 mn, __m256& lo, __m256& hi) {
  const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(d, _mm256_set1_epi32(0x0F))), s, mn);
  hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(d, 4)), s, mn);
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R, int MB>
static inline void dot_block(const float* __restrict x, int64_t ldx, const uint8_t* __restrict w,
                             const float* sc, const float* mn, int64_t K, int64_t G,
                             const uint8_t* pf, float* __restrict out) {
  const int64_t K2 = K / 2, ng = K / G;
  __m256 acc[MB][R];
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      if (pf != nullptr && ((k / 2) & 63) == 0) {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(pf + r * K2 + k / 2), _MM_HINT_T0);
      }
#pragma GCC unroll 2
      for (int j = 0; j < 16; j += 8) {
        __m256 xl[MB], xh[MB];
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) {
          xl[m] = _mm256_loadu_ps(x + m * ldx + k + j);
          xh[m] = _mm256_loadu_ps(x + m * ldx + k + 16 + j);
        }
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          __m256 lo, hi;
          deq8x2(w + r * K2 + k / 2 + j, _mm256_set1_ps(sc[r * ng + g]),
                 _mm256_set1_ps(mn[r * ng + g]), lo, hi);
#pragma GCC unroll 16
          for (int m = 0; m < MB; ++m) {
            acc[m][r] = _mm256_fmadd_ps(xl[m], lo, acc[m][r]);
            acc[m][r] = _mm256_fmadd_ps(xh[m], hi, acc[m][r]);
          }
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) out[m * R + r] = hsum(acc[m][r]);
}

static void dequant4(const uint8_t* w, const float* sc, const float* mn, int64_t K, int64_t G,
                     const uint8_t* pf, float* buf) {
  const int64_t K2 = K / 2, ng = K / G;
  for (int r = 0; r < 4; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      const __m256 s = _mm256_set1_ps(sc[r * ng + g]), b = _mm256_set1_ps(mn[r * ng + g]);
      for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
        if (pf != nullptr && ((k / 2) & 63) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(pf + r * K2 + k / 2), _MM_HINT_T1);
        for (int j = 0; j < 16; j += 8) {
          __m256 lo, hi;
          deq8x2(w + r * K2 + k / 2 + j, s, b, lo, hi);
          _mm256_storeu_ps(buf + r * K + k + j, lo);
          _mm256_storeu_ps(buf + r * K + k + 16 + j, hi);
        }
      }
    }
}

static inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

template <int MB>
static inline void dot4_f32(const float* __restrict x, int64_t ldx, const float* __restrict wb,
                            int64_t K, __m128* out) {
  __m256 acc[MB][4];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[MB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m256 wv = _mm256_loadu_ps(wb + r * K + k);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) out[m] = reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
}

constexpr int kBatchRows = 3;
static void dot4_rows(int64_t mb, const float* x, int64_t K, const float* wb, __m128* out) {
  switch (mb) {
    case 3: return dot4_f32<3>(x, K, wb, K, out);
    case 2: return dot4_f32<2>(x, K, wb, K, out);
    default: return dot4_f32<1>(x, K, wb, K, out);
  }
}


// ---- int8 activations (see avx512::quantize_x; here 8 floats at a time)
static void quantize_x(const float* x, int64_t K, int64_t G, int8_t* xq, float* xs,
                       float* gsum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t g = 0; g < K / G; ++g) {
    gsum[g] = 0.f;
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      __m256 v[4];
      __m256 mx = _mm256_setzero_ps(), sm = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(x + k + 8 * i);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
        sm = _mm256_add_ps(sm, v[i]);
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float amax = _mm_cvtss_f32(m4);
      gsum[g] += hsum(sm);
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      xs[k / 32] = amax / 127.f;
      const __m256 idv = _mm256_set1_ps(id);
      __m256i q[4];
      for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], idv));
      // packs work per 128-bit lane: dwords come out as [0 4 1 5 2 6 3 7] of the wanted order
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + k),
                          _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
  }
}

// One 4-row weight block against one quantised row of x: per run of 32 weights the 16
// packed bytes become 32 codes in order ([low nibbles | high nibbles]), vpmaddubsw +
// vpmaddwd give 8 int32 sums, scaled by scale_w * scale_x of the run in fp32.
template <int R>
static inline void dotq_block(const int8_t* __restrict xq, const float* __restrict xs,
                              const float* __restrict gsum, const uint8_t* __restrict w,
                              const float* sc, const float* mn, int64_t K, int64_t G,
                              const uint8_t* pf, float* __restrict out) {
  const int64_t K2 = K / 2, ng = K / G;
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      if (pf != nullptr && ((k / 2) & 63) == 0) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(pf + r * K2 + k / 2), _MM_HINT_T0);
      }
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
      const float xsb = xs[k / 32];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K2 + k / 2));
        const __m256i codes =
            _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nib), _mm_and_si128(v, nib));
        const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sc[r * ng + g] * xsb), acc[r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float m = 0.f;
    for (int64_t g = 0; g < ng; ++g) m += mn[r * ng + g] * gsum[g];
    out[r] = hsum(acc[r]) + m;
  }
}

}  // namespace avx2
#pragma GCC pop_options

#endif  // FLEETLM_X86

#if defined(__aarch64__)

// ------------------------------------------------------------------ NEON (aarch64)
namespace neon {

// 32 weights (16 bytes) -> q[0..32) dequantised, 4 per vector
static inline void deq32(const uint8_t* p, float32x4_t s, float32x4_t mn, float32x4_t* out) {
  const uint8x16_t v = vld1q_u8(p);
  const uint8x16_t halves[2] = {vandq_u8(v, vdupq_n_u8(0x0F)), vshrq_n_u8(v, 4)};
  for (int h = 0; h < 2; ++h) {
    const uint16x8_t a = vmovl_u8(vget_low_u8(halves[h]));
    const uint16x8_t b = vmovl_high_u8(halves[h]);
    out[h * 4 + 0] = vfmaq_f32(mn, vcvtq_f32_u32(vmovl_u16(vget_low_u16(a))), s);
    out[h * 4 + 1] = vfmaq_f32(mn, vcvtq_f32_u32(vmovl_high_u16(a)), s);
    out[h * 4 + 2] = vfmaq_f32(mn, vcvtq_f32_u32(vmovl_u16(vget_low_u16(b))), s);
    out[h * 4 + 3] = vfmaq_f32(mn, vcvtq_f32_u32(vmovl_high_u16(b)), s);
  }
}

template <int R, int MB>
static inline void dot_block(const float* __restrict x, int64_t ldx, const uint8_t* __restrict w,
                             const float* sc, const float* mn, int64_t K, int64_t G,
                             const uint8_t* pf, float* __restrict out) {
  const int64_t K2 = K / 2, ng = K / G;
  float32x4_t acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = vdupq_n_f32(0.f);
  for (int64_t g = 0; g < ng; ++g) {
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      if (pf != nullptr && ((k / 2) & 63) == 0)
        for (int r = 0; r < R; ++r) __builtin_prefetch(pf + r * K2 + k / 2, 0, 3);
      for (int r = 0; r < R; ++r) {
        float32x4_t wv[8];
        deq32(w + r * K2 + k / 2, vdupq_n_f32(sc[r * ng + g]), vdupq_n_f32(mn[r * ng + g]), wv);
        for (int m = 0; m < MB; ++m)
          for (int i = 0; i < 8; ++i)
            acc[m][r] = vfmaq_f32(acc[m][r], vld1q_f32(x + m * ldx + k + 4 * i), wv[i]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = vaddvq_f32(acc[m][r]);
}

}  // namespace neon

#endif  // __aarch64__

// ------------------------------------------------------------------ scalar
namespace scalar {

template <int R, int MB>
static inline void dot_block(const float* __restrict x, int64_t ldx, const uint8_t* __restrict w,
                             const float* sc, const float* mn, int64_t K, int64_t G,
                             const uint8_t* /*pf*/, float* __restrict out) {
  const int64_t K2 = K / 2, ng = K / G;
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      const float* xr = x + m * ldx;
      const uint8_t* wr = w + r * K2;
      float s = 0.f;
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        const int64_t g = k0 / G;
        const float a = sc[r * ng + g], b = mn[r * ng + g];
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = wr[k0 / 2 + j];
          s += xr[k0 + j] * (static_cast<float>(byte & 0x0F) * a + b);
          s += xr[k0 + 16 + j] * (static_cast<float>(byte >> 4) * a + b);
        }
      }
      out[m * R + r] = s;
    }
}

}  // namespace scalar

// ------------------------------------------------------------------ paths

#define FLEETLM_INT4_PATH(NAME, NS, ROWS, MAX_MB)                                            \
  struct NAME {                                                                              \
    static constexpr int kRows = ROWS;                                                       \
    static constexpr int kMaxMB = MAX_MB;                                                    \
    template <int R, int MB>                                                                 \
    static void dot(const float* x, int64_t ldx, const uint8_t* w, const float* sc,          \
                    const float* mn, int64_t K, int64_t G, const uint8_t* pf, float* out) {  \
      NS::dot_block<R, MB>(x, ldx, w, sc, mn, K, G, pf, out);                                \
    }                                                                                        \
  };

#if defined(FLEETLM_X86)
FLEETLM_INT4_PATH(Avx512Path, avx512, 4, 4)
FLEETLM_INT4_PATH(Avx2Path, avx2, 4, 2)
#endif
#if defined(__aarch64__)
FLEETLM_INT4_PATH(NeonPath, neon, 4, 4)
#endif
FLEETLM_INT4_PATH(ScalarPath, scalar, 4, 4)
#undef FLEETLM_INT4_PATH

// ------------------------------------------------------------------ driver

struct Weights {
  const uint8_t* w;  // [N, K / 2]
  const float* sc;   // [N, K / G]
  const float* mn;   // [N, K / G]
  int64_t N, K, G;
  const uint8_t* row(int64_t n) const { return w + n * (K / 2); }
  const float* scales(int64_t n) const { return sc + n * (K / G); }
  const float* mins(int64_t n) const { return mn + n * (K / G); }
};

template <class Path, int R, int MB, typename T>
static inline void pass(const float* x, int64_t m0, const Weights& W, int64_t n0,
                        const uint8_t* pf, T* y) {
  float out[MB * R];
  Path::template dot<R, MB>(x + m0 * W.K, W.K, W.row(n0), W.scales(n0), W.mins(n0), W.K, W.G,
                            pf, out);
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < R; ++r) y[(m0 + i) * W.N + n0 + r] = static_cast<T>(out[i * R + r]);
}

// Rows [n0, n0 + R) of y for all M rows of x, MB rows of x per pass over the weight block.
template <class Path, int R, typename T>
static inline void row_block(const float* x, int64_t M, const Weights& W, int64_t n0,
                             const uint8_t* pf, T* y) {
  constexpr int MB = Path::kMaxMB;
  int64_t m = 0;
  for (; m + MB <= M; m += MB, pf = nullptr) pass<Path, R, MB, T>(x, m, W, n0, pf, y);
  const int64_t rest = M - m;
  if constexpr (MB > 3) {
    if (rest == 3) return pass<Path, R, 3, T>(x, m, W, n0, pf, y);
  }
  if constexpr (MB > 2) {
    if (rest == 2) return pass<Path, R, 2, T>(x, m, W, n0, pf, y);
  }
  if constexpr (MB > 1) {
    if (rest == 1) return pass<Path, R, 1, T>(x, m, W, n0, pf, y);
  }
}

template <class Path, typename T>
static void gemv_impl(const float* x, int64_t M, const Weights& W, T* y) {
  constexpr int R = Path::kRows;
  const int64_t nblocks = W.N / R;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / std::max<int64_t>(1, R * W.K / 2));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * R;
      const uint8_t* pf = (b + 1 < nblocks) ? W.row(n0 + R) : nullptr;
      row_block<Path, R, T>(x, M, W, n0, pf, y);
    }
  });
  for (int64_t n = nblocks * R; n < W.N; ++n) row_block<Path, 1, T>(x, M, W, n, nullptr, y);
}

#if defined(FLEETLM_X86)
// Batched variant (avx512 / avx2) for M >= kBatchMinM: every 4-row weight block is
// dequantised once into a per-thread fp32 buffer, then swept by all M rows of x.
constexpr int64_t kBatchMinM = 8;

template <class Path, typename T, int kBatchRows, class Dequant, class Dot>
static void gemv_batched(const float* x, int64_t M, const Weights& W, T* y, Dequant dequant4,
                         Dot dot4_rows) {
  constexpr int R = 4;
  const int64_t nblocks = W.N / R, K = W.K;
  const int64_t grain = std::max<int64_t>(1, 4 * kMinBytesPerTask / std::max<int64_t>(1, R * K * M));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < R * K) buf.resize(static_cast<size_t>(R * K));
    __m128 out[kBatchRows];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * R;
      const uint8_t* pf = (b + 1 < b1) ? W.row(n0 + R) : nullptr;
      dequant4(W.row(n0), W.scales(n0), W.mins(n0), K, W.G, pf, buf.data());
      // passes of equal size (M = 13, 6 rows a pass: 5 + 4 + 4)
      const int64_t passes = (M + kBatchRows - 1) / kBatchRows;
      for (int64_t p = 0, m0 = 0; p < passes; ++p) {
        const int64_t mb = (M - m0) / (passes - p);
        dot4_rows(mb, x + m0 * K, K, buf.data(), out);
        for (int64_t i = 0; i < mb; ++i) {
          float t[4];
          _mm_storeu_ps(t, out[i]);
          T* yr = y + (m0 + i) * W.N + n0;
          for (int r = 0; r < 4; ++r) yr[r] = static_cast<T>(t[r]);
        }
        m0 += mb;
      }
    }
  });
  for (int64_t n = nblocks * R; n < W.N; ++n) row_block<Path, 1, T>(x, M, W, n, nullptr, y);
}

// int8 activations (avx512 / avx2) for M < kBatchMinM: each row of x is quantised to
// int8 per run of 32 (scale max |x| / 127, as llama.cpp's Q8 blocks) once per call, and
// the 4-bit codes are multiplied with it in integer arithmetic (vpdpbusd with
// AVX512-VNNI, else vpmaddubsw + vpmaddwd): about half the instructions of widening every
// weight to fp32, which is what kept 4-bit decode below the memory's speed. The mins term
// uses the exact float sums of x. FLEETLM_INT4_ACTIVATIONS=float (or
// fleetlm::int4_linear_set_activations("float")) keeps x in fp32 everywhere;
// fleetlm::int4_linear_activation_path() names the variant in use.
#define FLEETLM_Q8_PATH(NAME, QUANT_NS, DOT_NS)                                              \
  struct NAME {                                                                              \
    static void quant(const float* x, int64_t K, int64_t G, int8_t* q, float* s, float* gs) { \
      QUANT_NS::quantize_x(x, K, G, q, s, gs);                                               \
    }                                                                                        \
    template <int R>                                                                         \
    static void dot(const int8_t* q, const float* s, const float* gs, const uint8_t* w,      \
                    const float* sc, const float* mn, int64_t K, int64_t G, const uint8_t* pf, \
                    float* out) {                                                            \
      DOT_NS::dotq_block<R>(q, s, gs, w, sc, mn, K, G, pf, out);                             \
    }                                                                                        \
  };
FLEETLM_Q8_PATH(Q8Avx512Vnni, avx512, avx512vnni)
FLEETLM_Q8_PATH(Q8Avx512, avx512, avx512q8)
FLEETLM_Q8_PATH(Q8Avx2, avx2, avx2)
#undef FLEETLM_Q8_PATH

template <class Q, typename T>
static void gemv_q8(const float* x, int64_t M, const Weights& W, T* y) {
  constexpr int R = 4;
  const int64_t K = W.K, nb = K / 32, ng = K / W.G;
  thread_local std::vector<int8_t> qbuf;
  thread_local std::vector<float> sbuf, gbuf;
  qbuf.resize(static_cast<size_t>(M * K));
  sbuf.resize(static_cast<size_t>(M * nb));
  gbuf.resize(static_cast<size_t>(M * ng));
  for (int64_t m = 0; m < M; ++m)
    Q::quant(x + m * K, K, W.G, qbuf.data() + m * K, sbuf.data() + m * nb, gbuf.data() + m * ng);
  const int8_t* q = qbuf.data();
  const float* s = sbuf.data();
  const float* gs = gbuf.data();
  const int64_t nblocks = W.N / R;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / std::max<int64_t>(1, R * K / 2));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    float out[R];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * R;
      const uint8_t* pf = (b + 1 < nblocks) ? W.row(n0 + R) : nullptr;
      for (int64_t m = 0; m < M; ++m, pf = nullptr) {  // later rows of x: the block is in L1
        Q::template dot<R>(q + m * K, s + m * nb, gs + m * ng, W.row(n0), W.scales(n0),
                           W.mins(n0), K, W.G, pf, out);
        for (int r = 0; r < R; ++r) y[m * W.N + n0 + r] = static_cast<T>(out[r]);
      }
    }
  });
  for (int64_t n = nblocks * R; n < W.N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float out[1];
      Q::template dot<1>(q + m * K, s + m * nb, gs + m * ng, W.row(n), W.scales(n), W.mins(n),
                         K, W.G, nullptr, out);
      y[m * W.N + n] = static_cast<T>(out[0]);
    }
}
#endif

// How the small-M paths treat x: 0 fp32, 1 int8 (vpdpbusd where the CPU has AVX512-VNNI),
// 2 int8 without VNNI (vpmaddubsw + vpmaddwd; for tests on a VNNI machine).
enum Q8Mode : int { kQ8Off = 0, kQ8Auto = 1, kQ8NoVnni = 2 };

std::atomic<int>& q8_mode() {
  static std::atomic<int> value{[] {
    const char* env = std::getenv("FLEETLM_INT4_ACTIVATIONS");
    return env != nullptr && std::string(env) == "float" ? kQ8Off : kQ8Auto;
  }()};
  return value;
}

bool q8_on() { return q8_mode().load(std::memory_order_relaxed) != kQ8Off; }

bool q8_vnni() {
  static const bool has = cpu::has_avx512_vnni();
  return has && q8_mode().load(std::memory_order_relaxed) == kQ8Auto;
}

// Rows of x below which the current path quantises x to int8 (0: it never does).
int64_t q8_rows() {
  if (!q8_on()) return 0;
#if defined(FLEETLM_X86)
  const cpu::Isa isa = cpu::current();
  if (isa == cpu::Isa::kAvx512 || isa == cpu::Isa::kAvx2) return kBatchMinM;
#endif
  return 0;
}

template <typename T>
static void gemv(const float* x, int64_t M, const Weights& W, T* y) {
  switch (cpu::current()) {
#if defined(FLEETLM_X86)
    case cpu::Isa::kAvx512:
      if (M >= kBatchMinM)
        return gemv_batched<Avx512Path, T, avx512::kBatchRows>(x, M, W, y, avx512::dequant4,
                                                               avx512::dot4_rows);
      if (q8_on())
        return q8_vnni() ? gemv_q8<Q8Avx512Vnni, T>(x, M, W, y) : gemv_q8<Q8Avx512, T>(x, M, W, y);
      return gemv_impl<Avx512Path, T>(x, M, W, y);
    case cpu::Isa::kAvx2:
      if (M >= kBatchMinM)
        return gemv_batched<Avx2Path, T, avx2::kBatchRows>(x, M, W, y, avx2::dequant4,
                                                           avx2::dot4_rows);
      if (q8_on()) return gemv_q8<Q8Avx2, T>(x, M, W, y);
      return gemv_impl<Avx2Path, T>(x, M, W, y);
#endif
#if defined(__aarch64__)
    case cpu::Isa::kNeon:
      return gemv_impl<NeonPath, T>(x, M, W, y);
#endif
    default:
      return gemv_impl<ScalarPath, T>(x, M, W, y);
  }
}

at::Tensor int4_linear_cpu(const at::Tensor& x_in, const at::Tensor& packed,
                           const at::Tensor& scales, const at::Tensor& mins, int64_t group_size) {
  const char* op = "fleetlm::int4_linear: ";
  TORCH_CHECK(x_in.device().is_cpu() && packed.device().is_cpu() && scales.device().is_cpu() &&
                  mins.device().is_cpu(),
              op, "all tensors must be on CPU");
  TORCH_CHECK(x_in.dim() == 2, op, "x must be 2-D [M, K], got shape ", x_in.sizes());
  TORCH_CHECK(packed.dim() == 2, op, "packed must be 2-D [N, K / 2], got shape ", packed.sizes());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op,
              "x must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, "packed must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && mins.scalar_type() == at::kFloat, op,
              "scales and mins must be float32, got ", scales.scalar_type(), " and ",
              mins.scalar_type());
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0, op,
              "group_size must be a positive multiple of 32, got ", group_size);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = packed.size(0);
  TORCH_CHECK(K % group_size == 0, op, "K (", K, ") must be a multiple of group_size (",
              group_size, ")");
  TORCH_CHECK(packed.size(1) * 2 == K, op, "shape mismatch, x is ", x_in.sizes(),
              " but packed is ", packed.sizes(), " (packed.size(1) must be K / 2)");
  const int64_t ng = K / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == ng, op,
              "scales must be [N, K / group_size] = [", N, ", ", ng, "], got ", scales.sizes());
  TORCH_CHECK(mins.sizes() == scales.sizes(), op, "mins must have scales' shape ",
              scales.sizes(), ", got ", mins.sizes());
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous() && mins.is_contiguous(), op,
              "packed, scales and mins must be contiguous");

  auto y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const Weights W{packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), mins.data_ptr<float>(),
                  N, K, group_size};
  const at::Tensor x = x_in.contiguous();
  if (dtype == at::kFloat) {
    gemv<float>(x.data_ptr<float>(), M, W, y.data_ptr<float>());
  } else {
    const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
    std::vector<float> xbuf(static_cast<size_t>(M * K));
    for (int64_t i = 0; i < M * K; ++i) xbuf[i] = static_cast<float>(xb[i]);
    gemv<c10::BFloat16>(xbuf.data(), M, W, y.data_ptr<c10::BFloat16>());
  }
  return y;
}

std::string int4_linear_isa() { return cpu::isa_name(cpu::current()); }

std::string int4_linear_set_isa(const std::string& isa) { return cpu::set_isa(isa); }

int64_t int4_linear_activation_rows() { return q8_rows(); }

// What the small-M path of the current ISA does with x: "avx512-vnni", "avx512-bw", "avx2"
// (int8 activations, by instruction set), or "float".
std::string int4_linear_activation_path() {
  if (q8_rows() == 0) return "float";
  if (cpu::current() == cpu::Isa::kAvx2) return "avx2";
  return q8_vnni() ? "avx512-vnni" : "avx512-bw";
}

std::string int4_linear_set_activations(const std::string& mode) {
  TORCH_CHECK(mode == "int8" || mode == "float" || mode == "int8-novnni",
              "fleetlm::int4_linear_set_activations: '", mode,
              "' is not int8, int8-novnni or float");
  q8_mode().store(mode == "float" ? kQ8Off : mode == "int8" ? kQ8Auto : kQ8NoVnni,
                  std::memory_order_relaxed);
  return int4_linear_activation_path();
}

}  // namespace
}  // namespace fleetlm

// A fragment: int8_gemv.cpp owns TORCH_LIBRARY(fleetlm); the libraries load in either order.
TORCH_LIBRARY_FRAGMENT(fleetlm, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor mins, int group_size) -> Tensor");
  m.def("int4_linear_isa() -> str", &fleetlm::int4_linear_isa);
  m.def("int4_linear_set_isa(str isa) -> str", &fleetlm::int4_linear_set_isa);
  m.def("int4_linear_activation_rows() -> int", &fleetlm::int4_linear_activation_rows);
  m.def("int4_linear_activation_path() -> str", &fleetlm::int4_linear_activation_path);
  m.def("int4_linear_set_activations(str mode) -> str", &fleetlm::int4_linear_set_activations);
}

TORCH_LIBRARY_IMPL(fleetlm, CPU, m) {
  m.impl("int4_linear", &fleetlm::int4_linear_cpu);
}
