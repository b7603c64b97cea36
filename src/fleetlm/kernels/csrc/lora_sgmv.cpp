// Multi-LoRA delta for a packed batch on CPU (SGMV/BGMV-style): the op fleetlm::lora_sgmv.
//
//   delta[t, offsets[p]:offsets[p+1]] =
//       scales[s, p] * (x[t] @ a[s, p, :r].T) @ bt[s, :r, offsets[p]:offsets[p+1]]
//   with s = token_slots[t] (-1: no adapter, a row of zeros) and r = ranks[s, p]
//
// x [T, in] float32/bfloat16; a [S, P, R, in] and bt [S, R, out] in x's dtype, contiguous;
// ranks [S, P] int32; scales [S, P] float32; offsets [P+1] int64; token_slots [T] int64.
// The result [T, out] is in x's dtype; everything accumulates in float32.
//
// Tokens are grouped by slot (a counting sort) so each adapter's weights are read once per
// call however many tokens use it, and only the first r rows of A and of Bt are read.
// Two phases, each an at::parallel_for over work items split by estimated cost:
//   shrink: items (group, token chunk, part, block of A rows); register-blocked dot
//           products of up to 4 tokens x 4 A rows (or 2 x 8), h[t, p, k] = scale * <x[t], A[k]>;
//   expand: items (group, token chunk, part, column block); each Bt row segment is loaded
//           (bf16 widened to fp32) once per 4 tokens and FMA'd into 4 x 64 accumulators.
//
// Micro-kernel paths, chosen at run time (cpu_isa.h; the library is built without
// -march=native), all behind the same driver (lora_sgmv_impl, templated on the path):
//   avx512      AVX512F/BW/VL/DQ, 16-wide, masked tails; with AVX512_BF16 on the CPU the
//               bf16 expand rounds with vcvtne2ps2bf16 (reported as "avx512+bf16")
//   avx2        AVX2+FMA, 8-wide, scalar tails
//   neon        aarch64 Advanced SIMD, 4-wide, scalar tails
//   scalar      plain loops; -DFLEETLM_LORA_SCALAR builds only this one
// Ops: `fleetlm::lora_sgmv_isa() -> str` (the path in use) and
// `fleetlm::lora_sgmv_set_isa(str) -> str` (force one; see cpu_isa.h).
//
// The fake/meta kernel for torch.compile lives in fleetlm/kernels/lora_sgmv.py.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

#if defined(FLEETLM_X86) && !defined(FLEETLM_LORA_SCALAR)
#define FLEETLM_LORA_X86 1
#include <immintrin.h>
#endif
#if defined(__aarch64__) && !defined(FLEETLM_LORA_SCALAR)
#define FLEETLM_LORA_NEON 1
#include <arm_neon.h>
#endif

namespace fleetlm {
namespace {

using bf16 = c10::BFloat16;

// Tokens of one group per work item: bounds an item's size for prefill-sized groups.
constexpr int64_t kTokenChunk = 64;
// A rows per shrink item (two passes of 4 rows for 3-4 tokens, one of 8 for 1-2 tokens).
constexpr int64_t kShrinkRows = 8;
// Output columns per expand item; the micro-kernel does 64 at a time.
constexpr int64_t kExpandCols = 128;
constexpr int64_t kExpandBlock = 64;
// Estimated cost (~multiply-adds) below which a second thread costs more than it saves
// (an OpenMP fork/join is a few microseconds).
constexpr int64_t kMinCostPerThread = 24 * 1024;
// A weight element read from memory costs about this many multiply-adds (cost model only).
constexpr int64_t kWeightCost = 4;

// ------------------------------------------------------------------ micro-kernels
//
// Every path provides, for MB <= 4 tokens (x[m], h[m], y[m] are per-token row pointers):
//   shrink_f32/shrink_bf16<MB, RB>(x, a, K, out): out[m * RB + j] = <x[m][0:K], a[j*K:(j+1)*K]>
//   expand_f32/expand_bf16<MB>(h, bt, ldb, r, ncols, y):
//       y[m][c] = sum_{k < r} h[m][k] * bt[k * ldb + c] for c < ncols (<= 64)
//
// bf16 is widened to fp32 by bit shifts, 32 elements at a time (AVX-512): a 512-bit load
// of 32 bf16 holds element 2i in the low and 2i+1 in the high half of 32-bit lane i, so
// `<< 16` gives the even elements and `& 0xFFFF0000` the odd ones as fp32 -- two cheap ops
// per 32 values and no shuffles. A dot product does not care about element order, so the
// shrink splits x and A alike; the expand keeps even and odd output columns in separate
// accumulators and re-interleaves them when rounding to bf16. (vdpbf16ps measured 2x
// slower than this on the development CPU: one instruction per 2 cycles against two FMAs
// per cycle; a fp32 copy of x made once per call cost more in memory traffic than it
// saved.) The AVX2 path uses the same even/odd split in the shrink and widens in order
// (vpmovzxwd) in the expand.

#if defined(FLEETLM_LORA_X86)

// ------------------------------------------------------------------ AVX-512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {

inline __mmask16 mask16(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << n) - 1u);
}
inline __m512 even_f32(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline __m512 odd_f32(__m512i v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
}

// fp32 -> bf16 (round to nearest even, NaN -> 0x7FC0, as c10::BFloat16(float)) in the high
// 16 bits of each 32-bit lane
inline __m512i round_bf16_hi(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0x7FC00000));
}
// out[m * RB + j] = <x[m][0:K], a[j * K : (j + 1) * K]> for m < MB, j < RB
template <int MB, int RB>
inline void shrink_f32(const float* const* x, const float* __restrict a, int64_t K,
                             float* out) {
  __m512 acc[MB][RB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) acc[m][j] = _mm512_setzero_ps();
  auto step = [&](int64_t k, __mmask16 mask) __attribute__((always_inline)) {
    __m512 xv[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x[m] + k);
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) {
      const __m512 av = _mm512_maskz_loadu_ps(mask, a + j * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m][j] = _mm512_fmadd_ps(xv[m], av, acc[m][j]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) step(k, 0xFFFF);
  if (k < K) step(k, mask16(K - k));
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) out[m * RB + j] = _mm512_reduce_add_ps(acc[m][j]);
}

// The same for bf16: x and A are both split into even/odd halves, 32 elements per step.
template <int MB, int RB>
inline void shrink_bf16(const bf16* const* x, const bf16* __restrict a, int64_t K,
                              float* out) {
  __m512 acc[MB][RB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) acc[m][j] = _mm512_setzero_ps();
  auto step = [&](int64_t k, __mmask32 mask) __attribute__((always_inline)) {
    __m512 xe[MB], xo[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m512i v = _mm512_maskz_loadu_epi16(mask, x[m] + k);
      xe[m] = even_f32(v);
      xo[m] = odd_f32(v);
    }
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) {
      const __m512i v = _mm512_maskz_loadu_epi16(mask, a + j * K + k);
      const __m512 ae = even_f32(v), ao = odd_f32(v);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        acc[m][j] = _mm512_fmadd_ps(xe[m], ae, acc[m][j]);
        acc[m][j] = _mm512_fmadd_ps(xo[m], ao, acc[m][j]);
      }
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step(k, ~__mmask32(0));
  if (k < K) step(k, mask32(K - k));
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) out[m * RB + j] = _mm512_reduce_add_ps(acc[m][j]);
}

// y[m][c] = sum_k h[m][k] * bt[k * ldb + c] for the `ncols` (<= 64) columns of this block;
// each bt row segment is loaded once for all MB tokens.
template <int MB, int NV>  // NV vectors of 16 columns
inline void expand_block_f32(const float* const* h, const float* __restrict bt, int64_t ldb,
                             int64_t r, int64_t ncols, float* const* y) {
  const __mmask16 last = mask16(ncols - (NV - 1) * 16);
  __m512 acc[MB][NV];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < r; ++k) {
    const float* row = bt + k * ldb;
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      b[v] = (v == NV - 1) ? _mm512_maskz_loadu_ps(last, row + 16 * v) : _mm512_loadu_ps(row + 16 * v);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const __m512 hv = _mm512_set1_ps(h[m][k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(hv, b[v], acc[m][v]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(y[m] + 16 * v, (v == NV - 1) ? last : __mmask16(0xFFFF), acc[m][v]);
}

// ncols (1..64) output columns for MB tokens
template <int MB>
inline void expand_f32(const float* const* h, const float* bt, int64_t ldb, int64_t r,
                       int64_t ncols, float* const* y) {
  switch ((ncols + 15) / 16) {
    case 1: return expand_block_f32<MB, 1>(h, bt, ldb, r, ncols, y);
    case 2: return expand_block_f32<MB, 2>(h, bt, ldb, r, ncols, y);
    case 3: return expand_block_f32<MB, 3>(h, bt, ldb, r, ncols, y);
    case 4: return expand_block_f32<MB, 4>(h, bt, ldb, r, ncols, y);
    default: TORCH_INTERNAL_ASSERT(false, "fleetlm::lora_sgmv: bad column block ", ncols);
  }
}

#include "lora_sgmv_avx512_bf16.inc"  // pack_bf16 (software rounding), expand_bf16

}  // namespace avx512
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX-512 + AVX512_BF16
// Only the bf16 expand differs (hardware rounding); everything else is avx512's.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")
namespace avx512bf16 {

using avx512::even_f32;
using avx512::mask32;
using avx512::odd_f32;
using avx512::round_bf16_hi;
#define FLEETLM_LORA_HW_BF16 1
#include "lora_sgmv_avx512_bf16.inc"  // pack_bf16 (vcvtne2ps2bf16), expand_bf16
#undef FLEETLM_LORA_HW_BF16

}  // namespace avx512bf16
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX2 + FMA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// 16 bf16 in a 256-bit register: elements 2i / 2i+1 of lane i as fp32
inline __m256 even_f32(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256 odd_f32(__m256i v) {
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
}
// 8 bf16 -> 8 fp32, in order
inline __m256 load8_bf16(const bf16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
// 8 fp32 -> 8 bf16 (round to nearest even, NaN -> 0x7FC0, as c10::BFloat16(float))
inline __m128i to_bf16x8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_srli_epi32(_mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan), 16);
  // [r0..3 r0..3 | r4..7 r4..7] as 16-bit -> quadwords 0 and 2
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

template <typename T, int MB, int RB>
inline void shrink_tail(const T* const* x, const T* a, int64_t K, int64_t k0,
                        const __m256 (&acc)[MB][RB], float* out) {
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < RB; ++j) {
      float s = hsum(acc[m][j]);
      for (int64_t k = k0; k < K; ++k)
        s += static_cast<float>(x[m][k]) * static_cast<float>(a[j * K + k]);
      out[m * RB + j] = s;
    }
}

template <int MB, int RB>
inline void shrink_f32(const float* const* x, const float* __restrict a, int64_t K,
                       float* out) {
  __m256 acc[MB][RB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) acc[m][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x[m] + k);
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) {
      const __m256 av = _mm256_loadu_ps(a + j * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m][j] = _mm256_fmadd_ps(xv[m], av, acc[m][j]);
    }
  }
  shrink_tail<float, MB, RB>(x, a, K, k, acc, out);
}

template <int MB, int RB>
inline void shrink_bf16(const bf16* const* x, const bf16* __restrict a, int64_t K,
                        float* out) {
  __m256 acc[MB][RB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) acc[m][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 xe[MB], xo[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[m] + k));
      xe[m] = even_f32(v);
      xo[m] = odd_f32(v);
    }
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + j * K + k));
      const __m256 ae = even_f32(v), ao = odd_f32(v);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        acc[m][j] = _mm256_fmadd_ps(xe[m], ae, acc[m][j]);
        acc[m][j] = _mm256_fmadd_ps(xo[m], ao, acc[m][j]);
      }
    }
  }
  shrink_tail<bf16, MB, RB>(x, a, K, k, acc, out);
}

// columns [c, c + 8 * NV) for MB tokens, each Bt row segment loaded once
template <typename T, int MB, int NV>
inline void expand_vec(const float* const* h, const T* __restrict bt, int64_t ldb, int64_t r,
                       int64_t c, T* const* y) {
  __m256 acc[MB][NV];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < r; ++k) {
    const T* row = bt + k * ldb + c;
    __m256 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if constexpr (std::is_same_v<T, bf16>)
        b[v] = load8_bf16(row + 8 * v);
      else
        b[v] = _mm256_loadu_ps(row + 8 * v);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const __m256 hv = _mm256_set1_ps(h[m][k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(hv, b[v], acc[m][v]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if constexpr (std::is_same_v<T, bf16>)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y[m] + c + 8 * v), to_bf16x8(acc[m][v]));
      else
        _mm256_storeu_ps(y[m] + c + 8 * v, acc[m][v]);
    }
}

template <typename T, int MB>
inline void expand_any(const float* const* h, const T* bt, int64_t ldb, int64_t r,
                       int64_t ncols, T* const* y) {
  int64_t c = 0;
  for (; c + 16 <= ncols; c += 16) expand_vec<T, MB, 2>(h, bt, ldb, r, c, y);
  if (c + 8 <= ncols) {
    expand_vec<T, MB, 1>(h, bt, ldb, r, c, y);
    c += 8;
  }
  for (; c < ncols; ++c)  // the last < 8 columns
    for (int m = 0; m < MB; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < r; ++k) s += h[m][k] * static_cast<float>(bt[k * ldb + c]);
      y[m][c] = static_cast<T>(s);
    }
}
template <int MB>
inline void expand_f32(const float* const* h, const float* bt, int64_t ldb, int64_t r,
                       int64_t ncols, float* const* y) {
  expand_any<float, MB>(h, bt, ldb, r, ncols, y);
}
template <int MB>
inline void expand_bf16(const float* const* h, const bf16* bt, int64_t ldb, int64_t r,
                        int64_t ncols, bf16* const* y) {
  expand_any<bf16, MB>(h, bt, ldb, r, ncols, y);
}

}  // namespace avx2
#pragma GCC pop_options

#endif  // FLEETLM_LORA_X86

#if defined(FLEETLM_LORA_NEON)

// ------------------------------------------------------------------ NEON (aarch64)
namespace neon {

inline float32x4_t load4(const float* p) { return vld1q_f32(p); }
inline float32x4_t load4(const bf16* p) {  // 4 bf16 -> 4 fp32
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}

template <typename T, int MB, int RB>
inline void shrink_any(const T* const* x, const T* __restrict a, int64_t K, float* out) {
  float32x4_t acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < RB; ++j) acc[m][j] = vdupq_n_f32(0.f);
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    float32x4_t xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = load4(x[m] + k);
    for (int j = 0; j < RB; ++j) {
      const float32x4_t av = load4(a + j * K + k);
      for (int m = 0; m < MB; ++m) acc[m][j] = vfmaq_f32(acc[m][j], xv[m], av);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < RB; ++j) {
      float s = vaddvq_f32(acc[m][j]);
      for (int64_t t = k; t < K; ++t)
        s += static_cast<float>(x[m][t]) * static_cast<float>(a[j * K + t]);
      out[m * RB + j] = s;
    }
}
template <int MB, int RB>
inline void shrink_f32(const float* const* x, const float* a, int64_t K, float* out) {
  shrink_any<float, MB, RB>(x, a, K, out);
}
template <int MB, int RB>
inline void shrink_bf16(const bf16* const* x, const bf16* a, int64_t K, float* out) {
  shrink_any<bf16, MB, RB>(x, a, K, out);
}

template <typename T, int MB>
inline void expand_any(const float* const* h, const T* __restrict bt, int64_t ldb, int64_t r,
                       int64_t ncols, T* const* y) {
  int64_t c = 0;
  for (; c + 8 <= ncols; c += 8) {  // 8 columns x MB tokens
    float32x4_t acc[MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = vdupq_n_f32(0.f);
    for (int64_t k = 0; k < r; ++k) {
      const float32x4_t b0 = load4(bt + k * ldb + c), b1 = load4(bt + k * ldb + c + 4);
      for (int m = 0; m < MB; ++m) {
        acc[m][0] = vfmaq_n_f32(acc[m][0], b0, h[m][k]);
        acc[m][1] = vfmaq_n_f32(acc[m][1], b1, h[m][k]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      float tmp[8];
      vst1q_f32(tmp, acc[m][0]);
      vst1q_f32(tmp + 4, acc[m][1]);
      for (int i = 0; i < 8; ++i) y[m][c + i] = static_cast<T>(tmp[i]);
    }
  }
  for (; c < ncols; ++c)  // the last < 8 columns
    for (int m = 0; m < MB; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < r; ++k) s += h[m][k] * static_cast<float>(bt[k * ldb + c]);
      y[m][c] = static_cast<T>(s);
    }
}
template <int MB>
inline void expand_f32(const float* const* h, const float* bt, int64_t ldb, int64_t r,
                       int64_t ncols, float* const* y) {
  expand_any<float, MB>(h, bt, ldb, r, ncols, y);
}
template <int MB>
inline void expand_bf16(const float* const* h, const bf16* bt, int64_t ldb, int64_t r,
                        int64_t ncols, bf16* const* y) {
  expand_any<bf16, MB>(h, bt, ldb, r, ncols, y);
}

}  // namespace neon

#endif  // FLEETLM_LORA_NEON

// ------------------------------------------------------------------ scalar
namespace scalar {

template <typename T, int MB, int RB>
inline void shrink_block_scalar(const T* const* x, const T* __restrict a, int64_t K,
                                float* out) {
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < RB; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k)
        s += static_cast<float>(x[m][k]) * static_cast<float>(a[j * K + k]);
      out[m * RB + j] = s;
    }
}
template <int MB, int RB>
inline void shrink_f32(const float* const* x, const float* a, int64_t K, float* out) {
  shrink_block_scalar<float, MB, RB>(x, a, K, out);
}
template <int MB, int RB>
inline void shrink_bf16(const bf16* const* x, const bf16* a, int64_t K, float* out) {
  shrink_block_scalar<bf16, MB, RB>(x, a, K, out);
}

template <typename T, int MB>
inline void expand_block_scalar(const float* const* h, const T* __restrict bt, int64_t ldb,
                                int64_t r, int64_t ncols, T* const* y) {
  float acc[kExpandBlock];
  for (int m = 0; m < MB; ++m) {
    std::fill(acc, acc + ncols, 0.f);
    for (int64_t k = 0; k < r; ++k) {
      const float hk = h[m][k];
      const T* row = bt + k * ldb;
      for (int64_t c = 0; c < ncols; ++c) acc[c] += hk * static_cast<float>(row[c]);
    }
    for (int64_t c = 0; c < ncols; ++c) y[m][c] = static_cast<T>(acc[c]);
  }
}
template <int MB>
inline void expand_f32(const float* const* h, const float* bt, int64_t ldb, int64_t r,
                             int64_t ncols, float* const* y) {
  expand_block_scalar<float, MB>(h, bt, ldb, r, ncols, y);
}
template <int MB>
inline void expand_bf16(const float* const* h, const bf16* bt, int64_t ldb, int64_t r,
                              int64_t ncols, bf16* const* y) {
  expand_block_scalar<bf16, MB>(h, bt, ldb, r, ncols, y);
}

}  // namespace scalar

// ------------------------------------------------------------------ paths
// kFewTokenRows: A rows per shrink micro-kernel call for 1-2 tokens (4 for 3-4 tokens).
// The driver (compiled for the baseline ISA) calls the micro-kernels out of line.

#define FLEETLM_LORA_PATH(NAME, NS, FEW_TOKEN_ROWS, EXPAND_BF16_NS)                        \
  struct NAME {                                                                           \
    static constexpr int64_t kFewTokenRows = FEW_TOKEN_ROWS;                              \
    template <int MB, int RB>                                                             \
    static void shrink(const float* const* x, const float* a, int64_t K, float* out) {    \
      NS::shrink_f32<MB, RB>(x, a, K, out);                                               \
    }                                                                                     \
    template <int MB, int RB>                                                             \
    static void shrink(const bf16* const* x, const bf16* a, int64_t K, float* out) {      \
      NS::shrink_bf16<MB, RB>(x, a, K, out);                                              \
    }                                                                                     \
    template <int MB>                                                                     \
    static void expand(const float* const* h, const float* bt, int64_t ldb, int64_t r,    \
                       int64_t ncols, float* const* y) {                                  \
      NS::expand_f32<MB>(h, bt, ldb, r, ncols, y);                                        \
    }                                                                                     \
    template <int MB>                                                                     \
    static void expand(const float* const* h, const bf16* bt, int64_t ldb, int64_t r,     \
                       int64_t ncols, bf16* const* y) {                                   \
      EXPAND_BF16_NS::expand_bf16<MB>(h, bt, ldb, r, ncols, y);                           \
    }                                                                                     \
  };

#if defined(FLEETLM_LORA_X86)
FLEETLM_LORA_PATH(Avx512Path, avx512, 8, avx512)
FLEETLM_LORA_PATH(Avx512Bf16Path, avx512, 8, avx512bf16)
FLEETLM_LORA_PATH(Avx2Path, avx2, 4, avx2)
#endif
#if defined(FLEETLM_LORA_NEON)
FLEETLM_LORA_PATH(NeonPath, neon, 8, neon)
#endif
FLEETLM_LORA_PATH(ScalarPath, scalar, 8, scalar)
#undef FLEETLM_LORA_PATH

// ------------------------------------------------------------------ dispatch to templates

// rb rows of A (1..8 for MB <= 2, 1..4 otherwise) against MB tokens
template <class Path, typename T, int MB>
inline void shrink_rows(int64_t rb, const T* const* x, const T* a, int64_t K, float* out) {
  switch (rb) {
    case 1: return Path::template shrink<MB, 1>(x, a, K, out);
    case 2: return Path::template shrink<MB, 2>(x, a, K, out);
    case 3: return Path::template shrink<MB, 3>(x, a, K, out);
    case 4: return Path::template shrink<MB, 4>(x, a, K, out);
    default: break;
  }
  if constexpr (MB <= 2) {
    switch (rb) {
      case 5: return Path::template shrink<MB, 5>(x, a, K, out);
      case 6: return Path::template shrink<MB, 6>(x, a, K, out);
      case 7: return Path::template shrink<MB, 7>(x, a, K, out);
      case 8: return Path::template shrink<MB, 8>(x, a, K, out);
      default: break;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "fleetlm::lora_sgmv: bad row block ", rb, " for ", MB, " tokens");
}

template <class Path, typename T>
inline void shrink_tokens(int64_t mb, int64_t rb, const T* const* x, const T* a, int64_t K,
                          float* out) {
  switch (mb) {
    case 1: return shrink_rows<Path, T, 1>(rb, x, a, K, out);
    case 2: return shrink_rows<Path, T, 2>(rb, x, a, K, out);
    case 3: return shrink_rows<Path, T, 3>(rb, x, a, K, out);
    case 4: return shrink_rows<Path, T, 4>(rb, x, a, K, out);
    default: TORCH_INTERNAL_ASSERT(false, "fleetlm::lora_sgmv: bad token block ", mb);
  }
}

// ncols (1..64) output columns for mb tokens
template <class Path, typename T>
inline void expand_tokens(int64_t mb, const float* const* h, const T* bt, int64_t ldb, int64_t r,
                          int64_t ncols, T* const* y) {
  switch (mb) {
    case 1: return Path::template expand<1>(h, bt, ldb, r, ncols, y);
    case 2: return Path::template expand<2>(h, bt, ldb, r, ncols, y);
    case 3: return Path::template expand<3>(h, bt, ldb, r, ncols, y);
    case 4: return Path::template expand<4>(h, bt, ldb, r, ncols, y);
    default: TORCH_INTERNAL_ASSERT(false, "fleetlm::lora_sgmv: bad token block ", mb);
  }
}

// ------------------------------------------------------------------ run-time choice

enum class Choice { kScalar, kNeon, kAvx2, kAvx512, kAvx512Bf16 };

// The path for this call: cpu::current() (only paths this CPU supports), the avx512 one
// with hardware bf16 rounding when the CPU has AVX512_BF16; scalar when built that way.
inline Choice current_path() {
#if defined(FLEETLM_LORA_SCALAR)
  return Choice::kScalar;
#else
  switch (cpu::current()) {
    case cpu::Isa::kAvx512: {
      static const bool bf16_hw = cpu::has_avx512_bf16();
      return bf16_hw ? Choice::kAvx512Bf16 : Choice::kAvx512;
    }
    case cpu::Isa::kAvx2: return Choice::kAvx2;
    case cpu::Isa::kNeon: return Choice::kNeon;
    default: return Choice::kScalar;
  }
#endif
}

inline const char* path_name(Choice p) {
  switch (p) {
    case Choice::kAvx512Bf16: return "avx512+bf16";
    case Choice::kAvx512: return "avx512";
    case Choice::kAvx2: return "avx2";
    case Choice::kNeon: return "neon";
    default: return "scalar";
  }
}

// ------------------------------------------------------------------ work items

struct Group {
  int64_t slot, start, len;  // tokens order[start : start + len] use `slot`
};

struct Item {
  int32_t group, part;
  int64_t t0, t1;  // token range within the group
  int64_t lo, hi;  // shrink: A rows [lo, hi); expand: output columns [lo, hi)
};

// Runs fn(items[i]) for every item, split into at most get_num_threads() contiguous runs
// of about equal estimated cost (one parallel region; inline when the work is small).
template <typename F>
void run_items(const std::vector<Item>& items, const std::vector<int64_t>& cost, const F& fn) {
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) return;
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost[i];
  const int64_t total = prefix[n];
  const int64_t chunks = std::min<int64_t>(
      {static_cast<int64_t>(at::get_num_threads()), n, std::max<int64_t>(1, total / kMinCostPerThread)});
  if (chunks <= 1) {
    for (const Item& it : items) fn(it);
    return;
  }
  std::vector<int64_t> bounds(chunks + 1, n);
  bounds[0] = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = total * c / chunks;
    bounds[c] = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t i = bounds[c]; i < bounds[c + 1]; ++i) fn(items[i]);
  });
}

// h [T, P, R] fp32, per calling thread and reused across calls: a large fresh allocation
// would be mmap'd and page-faulted in again on every prefill call.
inline float* scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

template <class Path, typename T>
void lora_sgmv_impl(const T* x, int64_t T_, int64_t K, const T* a, const T* bt, int64_t P,
                    int64_t R, int64_t N, const int32_t* ranks, const float* scales,
                    const int64_t* offsets, const int64_t* slots, int64_t S, T* y) {
  // ---- group tokens by slot (counting sort, slot order); tokens without adapter -> zeros
  std::vector<int64_t> count(S + 1, 0);
  for (int64_t t = 0; t < T_; ++t) ++count[slots[t] + 1];  // bucket 0: no adapter
  std::vector<int64_t> start(S + 2, 0);
  for (int64_t s = 0; s <= S; ++s) start[s + 1] = start[s] + count[s];
  std::vector<int64_t> order(T_);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T_; ++t) order[fill[slots[t] + 1]++] = t;
  }
  for (int64_t i = 0; i < count[0]; ++i)
    std::memset(static_cast<void*>(y + order[i] * N), 0, sizeof(T) * static_cast<size_t>(N));
  std::vector<Group> groups;
  for (int64_t s = 0; s < S; ++s)
    if (count[s + 1] > 0) groups.push_back({s, start[s + 1], count[s + 1]});
  if (groups.empty()) return;

  // ---- shrink: h[t, p, k] = scale[s, p] * <x[t], a[s, p, k]> for k < r
  float* h = scratch(T_ * P * R);
  std::vector<Item> items;
  std::vector<int64_t> cost;
  for (int32_t g = 0; g < static_cast<int32_t>(groups.size()); ++g) {
    const Group& G = groups[g];
    for (int64_t t0 = 0; t0 < G.len; t0 += kTokenChunk) {
      const int64_t t1 = std::min(G.len, t0 + kTokenChunk);
      for (int32_t p = 0; p < P; ++p) {
        const int64_t r = ranks[G.slot * P + p];
        for (int64_t k0 = 0; k0 < r; k0 += kShrinkRows) {
          const int64_t k1 = std::min(r, k0 + kShrinkRows);
          items.push_back({g, p, t0, t1, k0, k1});
          cost.push_back((k1 - k0) * K * (t1 - t0 + kWeightCost));
        }
      }
    }
  }
  run_items(items, cost, [&](const Item& it) {
    const Group& G = groups[it.group];
    const int64_t s = G.slot, p = it.part;
    const float scale = scales[s * P + p];
    const T* ap = a + ((s * P + p) * R) * K;
    const T* xp[4];
    float* hp[4];
    float out[4 * 8];
    for (int64_t tb = it.t0; tb < it.t1; tb += 4) {
      const int64_t mb = std::min<int64_t>(4, it.t1 - tb);
      for (int64_t m = 0; m < mb; ++m) {
        const int64_t t = order[G.start + tb + m];
        xp[m] = x + t * K;
        hp[m] = h + (t * P + p) * R;
      }
      const int64_t rows = mb <= 2 ? Path::kFewTokenRows : 4;
      for (int64_t k = it.lo; k < it.hi; k += rows) {
        const int64_t rb = std::min(rows, it.hi - k);
        shrink_tokens<Path, T>(mb, rb, xp, ap + k * K, K, out);
        for (int64_t m = 0; m < mb; ++m)
          for (int64_t j = 0; j < rb; ++j) hp[m][k + j] = scale * out[m * rb + j];
      }
    }
  });

  // ---- expand: y[t, cols of p] = h[t, p, :r] @ bt[s, :r, cols]
  items.clear();
  cost.clear();
  for (int32_t g = 0; g < static_cast<int32_t>(groups.size()); ++g) {
    const Group& G = groups[g];
    for (int64_t t0 = 0; t0 < G.len; t0 += kTokenChunk) {
      const int64_t t1 = std::min(G.len, t0 + kTokenChunk);
      for (int32_t p = 0; p < P; ++p) {
        const int64_t r = ranks[G.slot * P + p];
        for (int64_t c0 = offsets[p]; c0 < offsets[p + 1]; c0 += kExpandCols) {
          const int64_t c1 = std::min(offsets[p + 1], c0 + kExpandCols);
          items.push_back({g, p, t0, t1, c0, c1});
          cost.push_back((c1 - c0) * (std::max<int64_t>(r, 1) * (t1 - t0 + kWeightCost)));
        }
      }
    }
  }
  run_items(items, cost, [&](const Item& it) {
    const Group& G = groups[it.group];
    const int64_t s = G.slot, p = it.part;
    const int64_t r = ranks[s * P + p];
    const T* bp = bt + s * R * N;
    const float* hp[4];
    T* yp[4];
    T* yc[4];
    for (int64_t tb = it.t0; tb < it.t1; tb += 4) {
      const int64_t mb = std::min<int64_t>(4, it.t1 - tb);
      for (int64_t m = 0; m < mb; ++m) {
        const int64_t t = order[G.start + tb + m];
        hp[m] = h + (t * P + p) * R;
        yp[m] = y + t * N;
      }
      if (r == 0) {  // part absent in this adapter
        for (int64_t m = 0; m < mb; ++m)
          std::memset(static_cast<void*>(yp[m] + it.lo), 0,
                      sizeof(T) * static_cast<size_t>(it.hi - it.lo));
        continue;
      }
      for (int64_t c = it.lo; c < it.hi; c += kExpandBlock) {
        const int64_t ncols = std::min(kExpandBlock, it.hi - c);
        for (int64_t m = 0; m < mb; ++m) yc[m] = yp[m] + c;
        expand_tokens<Path, T>(mb, hp, bp + c, N, r, ncols, yc);
      }
    }
  });
}

at::Tensor lora_sgmv_cpu(const at::Tensor& x_in, const at::Tensor& a, const at::Tensor& bt,
                         const at::Tensor& ranks_in, const at::Tensor& scales_in,
                         const at::Tensor& offsets_in, const at::Tensor& slots_in) {
  const char* op = "fleetlm::lora_sgmv: ";
  for (const at::Tensor* t : {&x_in, &a, &bt, &ranks_in, &scales_in, &offsets_in, &slots_in})
    TORCH_CHECK(t->device().is_cpu(), op, "all tensors must be on CPU, got one on ", t->device());
  TORCH_CHECK(x_in.dim() == 2, op, "x must be 2-D [T, in], got shape ", x_in.sizes());
  TORCH_CHECK(a.dim() == 4, op, "a must be 4-D [S, P, R, in], got shape ", a.sizes());
  TORCH_CHECK(bt.dim() == 3, op, "bt must be 3-D [S, R, out], got shape ", bt.sizes());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op,
              "x must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(a.scalar_type() == dtype && bt.scalar_type() == dtype, op,
              "a and bt must have x's dtype (", dtype, "), got a ", a.scalar_type(), ", bt ",
              bt.scalar_type());
  const int64_t T_ = x_in.size(0), K = x_in.size(1);
  const int64_t S = a.size(0), P = a.size(1), R = a.size(2), N = bt.size(2);
  TORCH_CHECK(a.size(3) == K, op, "x has ", K, " features but a is ", a.sizes(),
              " (x.size(1) must equal a.size(3))");
  TORCH_CHECK(bt.size(0) == S && bt.size(1) == R, op, "bt ", bt.sizes(),
              " does not match a ", a.sizes(), " (need bt.size(0) == S and bt.size(1) == R)");
  TORCH_CHECK(ranks_in.scalar_type() == at::kInt && ranks_in.dim() == 2 &&
                  ranks_in.size(0) == S && ranks_in.size(1) == P,
              op, "ranks must be int32 [S, P] = [", S, ", ", P, "], got ", ranks_in.scalar_type(),
              " ", ranks_in.sizes());
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 &&
                  scales_in.size(0) == S && scales_in.size(1) == P,
              op, "scales must be float32 [S, P] = [", S, ", ", P, "], got ",
              scales_in.scalar_type(), " ", scales_in.sizes());
  TORCH_CHECK(offsets_in.scalar_type() == at::kLong && offsets_in.dim() == 1 &&
                  offsets_in.size(0) == P + 1,
              op, "offsets must be int64 [P + 1] = [", P + 1, "], got ", offsets_in.scalar_type(),
              " ", offsets_in.sizes());
  TORCH_CHECK(slots_in.scalar_type() == at::kLong && slots_in.dim() == 1 &&
                  slots_in.size(0) == T_,
              op, "token_slots must be int64 [T] = [", T_, "], got ", slots_in.scalar_type(), " ",
              slots_in.sizes());
  // Copying the weights on every call would silently cost more than the product itself.
  TORCH_CHECK(a.is_contiguous() && bt.is_contiguous(), op, "a and bt must be contiguous");

  const at::Tensor ranks = ranks_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous(), slots = slots_in.contiguous();
  const int32_t* rp = ranks.data_ptr<int32_t>();
  const int64_t* op_ = offsets.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  TORCH_CHECK(op_[0] == 0 && op_[P] == N, op, "offsets must run from 0 to out = ", N, ", got ",
              offsets_in);
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(op_[p] <= op_[p + 1], op, "offsets must be non-decreasing, got ", offsets_in);
  for (int64_t i = 0; i < S * P; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] <= R, op, "ranks[", i / P, ", ", i % P, "] = ", rp[i],
                " is outside [0, R = ", R, "]");
  for (int64_t t = 0; t < T_; ++t)
    TORCH_CHECK(sp[t] >= -1 && sp[t] < S, op, "token_slots[", t, "] = ", sp[t],
                " is outside [-1, S = ", S, ")");

  auto y = at::empty({T_, N}, x_in.options());
  if (T_ == 0 || N == 0) return y;
  if (K == 0 || R == 0 || S == 0) return y.zero_();
  const at::Tensor x = x_in.contiguous();
  const float* sc = scales.data_ptr<float>();
  const auto run = [&](auto path) {
    using Path = decltype(path);
    if (dtype == at::kFloat) {
      lora_sgmv_impl<Path, float>(x.data_ptr<float>(), T_, K, a.data_ptr<float>(),
                                  bt.data_ptr<float>(), P, R, N, rp, sc, op_, sp, S,
                                  y.data_ptr<float>());
    } else {
      lora_sgmv_impl<Path, bf16>(x.data_ptr<bf16>(), T_, K, a.data_ptr<bf16>(),
                                 bt.data_ptr<bf16>(), P, R, N, rp, sc, op_, sp, S,
                                 y.data_ptr<bf16>());
    }
  };
  switch (current_path()) {
#if defined(FLEETLM_LORA_X86)
    case Choice::kAvx512Bf16: run(Avx512Bf16Path{}); break;
    case Choice::kAvx512: run(Avx512Path{}); break;
    case Choice::kAvx2: run(Avx2Path{}); break;
#endif
#if defined(FLEETLM_LORA_NEON)
    case Choice::kNeon: run(NeonPath{}); break;
#endif
    default: run(ScalarPath{}); break;
  }
  return y;
}

std::string lora_sgmv_isa() { return path_name(current_path()); }

std::string lora_sgmv_set_isa(const std::string& isa) {
  cpu::set_isa(isa);
  return path_name(current_path());
}

}  // namespace
}  // namespace fleetlm

// A fragment: int8_gemv.cpp owns TORCH_LIBRARY(fleetlm); the two load in either order.
TORCH_LIBRARY_FRAGMENT(fleetlm, m) {
  m.def(
      "lora_sgmv(Tensor x, Tensor a, Tensor bt, Tensor ranks, Tensor scales, Tensor offsets, "
      "Tensor token_slots) -> Tensor");
  m.def("lora_sgmv_isa() -> str", &fleetlm::lora_sgmv_isa);
  m.def("lora_sgmv_set_isa(str isa) -> str", &fleetlm::lora_sgmv_set_isa);
}

TORCH_LIBRARY_IMPL(fleetlm, CPU, m) {
  m.impl("lora_sgmv", &fleetlm::lora_sgmv_cpu);
}
