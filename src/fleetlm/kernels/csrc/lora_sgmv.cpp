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
// fleetlm::lora_sgmv_q8 is the same with int8 a and bt (x and the result float32 or bf16):
// a_scale [S, P, R] float32 scales each A row (applied to the dot product), bt_scale [S, out]
// float32 each Bt column (applied to the sum before rounding). Half bfloat16's bytes; on the
// development CPU (Zen 4) no faster than bfloat16 -- the op is not bound by its bytes alone.
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
#include <cstdlib>
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
//   shrink_lin<TX, TW, MB, RB>(x, a, K, out): out[m * RB + j] = <x[m][0:K], a[j*K:(j+1)*K]>
//   expand_lin<TY, TW, MB>(h, bt, ldb, r, ncols, colscale, y):
//       y[m][c] = colscale[c] * sum_{k < r} h[m][k] * bt[k * ldb + c] for c < ncols (<= 64)
//       (colscale nullptr: no factor)
//   for float x/y with float weights, and float or bf16 x/y with int8 weights (unscaled;
//   the driver applies A's row scales, colscale Bt's column scales); and
//   shrink_bf16<MB, RB> / expand_bf16<MB> for bf16 x, weights and y.
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
// In-order loads of 16 values as fp32 (bf16 widened, int8 converted) and stores of 16 fp32
// (rounded to bf16 to nearest even), masked.
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(bf16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bf16_hi(v), 16)));
}

// out[m * RB + j] = <x[m][0:K], a[j * K : (j + 1) * K]> for m < MB, j < RB, 16 at a time
// (float32 x and A; or int8 A, unscaled, under float32 or bf16 x)
template <typename TX, typename TW, int MB, int RB>
inline void shrink_lin(const TX* const* x, const TW* __restrict a, int64_t K, float* out) {
  __m512 acc[MB][RB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) acc[m][j] = _mm512_setzero_ps();
  auto step = [&](int64_t k, __mmask16 mask) __attribute__((always_inline)) {
    __m512 xv[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) xv[m] = load16(x[m] + k, mask);
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) {
      const __m512 av = load16(a + j * K + k, mask);
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

// y[m][c] = colscale[c] * sum_k h[m][k] * bt[k * ldb + c] for the `ncols` (<= 64) columns
// of this block (no colscale: nullptr); each bt row segment is loaded once for all MB
// tokens. float32 Bt and y, or int8 Bt under float32 or bf16 y.
template <typename TY, typename TW, int MB, int NV>  // NV vectors of 16 columns
inline void expand_block_lin(const float* const* h, const TW* __restrict bt, int64_t ldb,
                             int64_t r, int64_t ncols, const float* colscale, TY* const* y) {
  const __mmask16 last = mask16(ncols - (NV - 1) * 16);
  __m512 acc[MB][NV];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < r; ++k) {
    const TW* row = bt + k * ldb;
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load16(row + 16 * v, v == NV - 1 ? last : __mmask16(0xFFFF));
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const __m512 hv = _mm512_set1_ps(h[m][k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(hv, b[v], acc[m][v]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __mmask16 mask = v == NV - 1 ? last : __mmask16(0xFFFF);
    const __m512 cs = colscale != nullptr ? load16(colscale + 16 * v, mask) : _mm512_set1_ps(1.f);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m)
      store16(y[m] + 16 * v, colscale != nullptr ? _mm512_mul_ps(acc[m][v], cs) : acc[m][v], mask);
  }
}

// ncols (1..64) output columns for MB tokens
template <typename TY, typename TW, int MB>
inline void expand_lin(const float* const* h, const TW* bt, int64_t ldb, int64_t r,
                       int64_t ncols, const float* colscale, TY* const* y) {
  switch ((ncols + 15) / 16) {
    case 1: return expand_block_lin<TY, TW, MB, 1>(h, bt, ldb, r, ncols, colscale, y);
    case 2: return expand_block_lin<TY, TW, MB, 2>(h, bt, ldb, r, ncols, colscale, y);
    case 3: return expand_block_lin<TY, TW, MB, 3>(h, bt, ldb, r, ncols, colscale, y);
    case 4: return expand_block_lin<TY, TW, MB, 4>(h, bt, ldb, r, ncols, colscale, y);
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

// In-order loads of 8 values as fp32 (bf16 widened, int8 converted); stores of 8 fp32
// (rounded to bf16)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) { return load8_bf16(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16x8(v));
}

template <typename TX, typename TW, int MB, int RB>
inline void shrink_tail(const TX* const* x, const TW* a, int64_t K, int64_t k0,
                        const __m256 (&acc)[MB][RB], float* out) {
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < RB; ++j) {
      float s = hsum(acc[m][j]);
      for (int64_t k = k0; k < K; ++k)
        s += static_cast<float>(x[m][k]) * static_cast<float>(a[j * K + k]);
      out[m * RB + j] = s;
    }
}

// 8 at a time in order: float32 x and A, or int8 A (unscaled) under float32 or bf16 x
template <typename TX, typename TW, int MB, int RB>
inline void shrink_lin(const TX* const* x, const TW* __restrict a, int64_t K, float* out) {
  __m256 acc[MB][RB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) acc[m][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) xv[m] = load8(x[m] + k);
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) {
      const __m256 av = load8(a + j * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m][j] = _mm256_fmadd_ps(xv[m], av, acc[m][j]);
    }
  }
  shrink_tail<TX, TW, MB, RB>(x, a, K, k, acc, out);
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
  shrink_tail<bf16, bf16, MB, RB>(x, a, K, k, acc, out);
}

// columns [c, c + 8 * NV) for MB tokens, each Bt row segment loaded once; colscale: the
// columns' factors (int8 Bt) or nullptr
template <typename TY, typename TW, int MB, int NV>
inline void expand_vec(const float* const* h, const TW* __restrict bt, int64_t ldb, int64_t r,
                       int64_t c, const float* colscale, TY* const* y) {
  __m256 acc[MB][NV];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < r; ++k) {
    __m256 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load8(bt + k * ldb + c + 8 * v);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const __m256 hv = _mm256_set1_ps(h[m][k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(hv, b[v], acc[m][v]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m256 cs = colscale != nullptr ? _mm256_loadu_ps(colscale + c + 8 * v)
                                          : _mm256_set1_ps(1.f);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m)
      store8(y[m] + c + 8 * v, colscale != nullptr ? _mm256_mul_ps(acc[m][v], cs) : acc[m][v]);
  }
}

template <typename TY, typename TW, int MB>
inline void expand_lin(const float* const* h, const TW* bt, int64_t ldb, int64_t r,
                       int64_t ncols, const float* colscale, TY* const* y) {
  int64_t c = 0;
  for (; c + 16 <= ncols; c += 16) expand_vec<TY, TW, MB, 2>(h, bt, ldb, r, c, colscale, y);
  if (c + 8 <= ncols) {
    expand_vec<TY, TW, MB, 1>(h, bt, ldb, r, c, colscale, y);
    c += 8;
  }
  for (; c < ncols; ++c)  // the last < 8 columns
    for (int m = 0; m < MB; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < r; ++k) s += h[m][k] * static_cast<float>(bt[k * ldb + c]);
      y[m][c] = static_cast<TY>(colscale != nullptr ? s * colscale[c] : s);
    }
}
template <int MB>
inline void expand_bf16(const float* const* h, const bf16* bt, int64_t ldb, int64_t r,
                        int64_t ncols, bf16* const* y) {
  expand_lin<bf16, bf16, MB>(h, bt, ldb, r, ncols, nullptr, y);
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
inline float32x4_t load4(const int8_t* p) {  // 4 int8 -> 4 fp32, reading only those 4 bytes
  int32_t w;
  std::memcpy(&w, p, sizeof(w));
  const int16x8_t v = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w)));
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(v)));
}

// x of type TX against A rows of type TW (TW = int8_t: unscaled, the driver scales)
template <typename TX, typename TW, int MB, int RB>
inline void shrink_lin(const TX* const* x, const TW* __restrict a, int64_t K, float* out) {
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
inline void shrink_bf16(const bf16* const* x, const bf16* a, int64_t K, float* out) {
  shrink_lin<bf16, bf16, MB, RB>(x, a, K, out);
}

// colscale: per-column factor (int8 Bt), or nullptr
template <typename TX, typename TW, int MB>
inline void expand_lin(const float* const* h, const TW* __restrict bt, int64_t ldb, int64_t r,
                       int64_t ncols, const float* colscale, TX* const* y) {
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
      if (colscale != nullptr) {
        acc[m][0] = vmulq_f32(acc[m][0], vld1q_f32(colscale + c));
        acc[m][1] = vmulq_f32(acc[m][1], vld1q_f32(colscale + c + 4));
      }
      float tmp[8];
      vst1q_f32(tmp, acc[m][0]);
      vst1q_f32(tmp + 4, acc[m][1]);
      for (int i = 0; i < 8; ++i) y[m][c + i] = static_cast<TX>(tmp[i]);
    }
  }
  for (; c < ncols; ++c)  // the last < 8 columns
    for (int m = 0; m < MB; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < r; ++k) s += h[m][k] * static_cast<float>(bt[k * ldb + c]);
      y[m][c] = static_cast<TX>(colscale != nullptr ? s * colscale[c] : s);
    }
}
template <int MB>
inline void expand_bf16(const float* const* h, const bf16* bt, int64_t ldb, int64_t r,
                        int64_t ncols, bf16* const* y) {
  expand_lin<bf16, bf16, MB>(h, bt, ldb, r, ncols, nullptr, y);
}

}  // namespace neon

#endif  // FLEETLM_LORA_NEON

// ------------------------------------------------------------------ scalar
namespace scalar {

template <typename TX, typename TW, int MB, int RB>
inline void shrink_lin(const TX* const* x, const TW* __restrict a, int64_t K,
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
inline void shrink_bf16(const bf16* const* x, const bf16* a, int64_t K, float* out) {
  shrink_lin<bf16, bf16, MB, RB>(x, a, K, out);
}

// colscale: per-column factor (int8 Bt), or nullptr
template <typename TX, typename TW, int MB>
inline void expand_lin(const float* const* h, const TW* __restrict bt, int64_t ldb,
                                int64_t r, int64_t ncols, const float* colscale,
                                TX* const* y) {
  float acc[kExpandBlock];
  for (int m = 0; m < MB; ++m) {
    std::fill(acc, acc + ncols, 0.f);
    for (int64_t k = 0; k < r; ++k) {
      const float hk = h[m][k];
      const TW* row = bt + k * ldb;
      for (int64_t c = 0; c < ncols; ++c) acc[c] += hk * static_cast<float>(row[c]);
    }
    for (int64_t c = 0; c < ncols; ++c)
      y[m][c] = static_cast<TX>(colscale != nullptr ? acc[c] * colscale[c] : acc[c]);
  }
}
template <int MB>
inline void expand_bf16(const float* const* h, const bf16* bt, int64_t ldb, int64_t r,
                              int64_t ncols, bf16* const* y) {
  expand_lin<bf16, bf16, MB>(h, bt, ldb, r, ncols, nullptr, y);
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
      NS::template shrink_lin<float, float, MB, RB>(x, a, K, out);                         \
    }                                                                                     \
    template <int MB, int RB>                                                             \
    static void shrink(const bf16* const* x, const bf16* a, int64_t K, float* out) {      \
      NS::shrink_bf16<MB, RB>(x, a, K, out);                                              \
    }                                                                                     \
    template <int MB>                                                                     \
    static void expand(const float* const* h, const float* bt, int64_t ldb, int64_t r,    \
                       int64_t ncols, float* const* y) {                                  \
      NS::template expand_lin<float, float, MB>(h, bt, ldb, r, ncols, nullptr, y);        \
    }                                                                                     \
    template <int MB>                                                                     \
    static void expand(const float* const* h, const bf16* bt, int64_t ldb, int64_t r,     \
                       int64_t ncols, bf16* const* y) {                                   \
      EXPAND_BF16_NS::expand_bf16<MB>(h, bt, ldb, r, ncols, y);                           \
    }                                                                                     \
    template <int MB, int RB, typename T>                                                 \
    static void shrink(const T* const* x, const int8_t* a, int64_t K, float* out) {       \
      NS::template shrink_lin<T, int8_t, MB, RB>(x, a, K, out);                           \
    }                                                                                     \
    template <int MB, typename T>                                                         \
    static void expand_q8(const float* const* h, const int8_t* bt, int64_t ldb, int64_t r, \
                          int64_t ncols, const float* colscale, T* const* y) {            \
      NS::template expand_lin<T, int8_t, MB>(h, bt, ldb, r, ncols, colscale, y);          \
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

// rb rows of A (1..8 for MB <= 2, 1..4 otherwise) against MB tokens; W: A's type
template <class Path, typename T, typename W, int MB>
inline void shrink_rows(int64_t rb, const T* const* x, const W* a, int64_t K, float* out) {
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

template <class Path, typename T, typename W>
inline void shrink_tokens(int64_t mb, int64_t rb, const T* const* x, const W* a, int64_t K,
                          float* out) {
  switch (mb) {
    case 1: return shrink_rows<Path, T, W, 1>(rb, x, a, K, out);
    case 2: return shrink_rows<Path, T, W, 2>(rb, x, a, K, out);
    case 3: return shrink_rows<Path, T, W, 3>(rb, x, a, K, out);
    case 4: return shrink_rows<Path, T, W, 4>(rb, x, a, K, out);
    default: TORCH_INTERNAL_ASSERT(false, "fleetlm::lora_sgmv: bad token block ", mb);
  }
}

// ncols (1..64) output columns for mb tokens; colscale: Bt's column scales (int8 Bt only)
template <class Path, typename T, typename W>
inline void expand_tokens(int64_t mb, const float* const* h, const W* bt, int64_t ldb, int64_t r,
                          int64_t ncols, const float* colscale, T* const* y) {
  if constexpr (std::is_same_v<W, int8_t>) {
    switch (mb) {
      case 1: return Path::template expand_q8<1>(h, bt, ldb, r, ncols, colscale, y);
      case 2: return Path::template expand_q8<2>(h, bt, ldb, r, ncols, colscale, y);
      case 3: return Path::template expand_q8<3>(h, bt, ldb, r, ncols, colscale, y);
      case 4: return Path::template expand_q8<4>(h, bt, ldb, r, ncols, colscale, y);
      default: break;
    }
  } else {
    switch (mb) {
      case 1: return Path::template expand<1>(h, bt, ldb, r, ncols, y);
      case 2: return Path::template expand<2>(h, bt, ldb, r, ncols, y);
      case 3: return Path::template expand<3>(h, bt, ldb, r, ncols, y);
      case 4: return Path::template expand<4>(h, bt, ldb, r, ncols, y);
      default: break;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "fleetlm::lora_sgmv: bad token block ", mb);
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

// FLEETLM_LORA_PREFETCH=0 turns the software prefetch below off (read once; the results
// are the same either way -- tests/kernels compares them).
inline bool prefetch_off() {
  static const bool off = [] {
    const char* v = std::getenv("FLEETLM_LORA_PREFETCH");
    return v != nullptr && v[0] == '0';
  }();
  return off;
}

struct Group {
  int64_t slot, start, len;  // tokens order[start : start + len] use `slot`
};

struct Item {
  int32_t group, part;
  int64_t t0, t1;  // token range within the group
  int64_t lo, hi;  // shrink: A rows [lo, hi); expand: output columns [lo, hi)
};

// Runs fn(items[i], next) for every item, split into at most get_num_threads() contiguous
// runs of about equal estimated cost (one parallel region; inline when the work is small);
// next is the item the same thread runs after it (nullptr at the end of its run), whose
// weights fn prefetches while it computes this one.
template <typename F>
void run_items(const std::vector<Item>& items, const std::vector<int64_t>& cost, const F& fn) {
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) return;
  auto run = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) fn(items[i], i + 1 < i1 ? &items[i + 1] : nullptr);
  };
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost[i];
  const int64_t total = prefix[n];
  const int64_t chunks = std::min<int64_t>(
      {static_cast<int64_t>(at::get_num_threads()), n, std::max<int64_t>(1, total / kMinCostPerThread)});
  if (chunks <= 1) {
    run(0, n);
    return;
  }
  std::vector<int64_t> bounds(chunks + 1, n);
  bounds[0] = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = total * c / chunks;
    bounds[c] = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) run(bounds[c], bounds[c + 1]);
  });
}

// Software prefetch (into L2: into L1 measured slower, it evicts what the current item
// reads) of `rows` runs of `bytes` bytes, `stride` elements apart. Each item's weights are
// a few KiB at a place the hardware prefetchers cannot guess (the next adapter's slot);
// asking for the next item's while this one computes keeps the memory busy instead of
// waiting on each new run of rows. On Zen 4, SmolLM2-135M's 120 projections with 32
// tokens on ~25 of 64 rank-16 slots: bfloat16 19 -> 15 ms a step, float32 26 -> 24.5 ms.
template <typename W>
inline void prefetch_rows(const W* p, int64_t rows, int64_t stride, int64_t bytes) {
  if (prefetch_off()) return;
  for (int64_t r = 0; r < rows; ++r) {
    const char* q = reinterpret_cast<const char*>(p + r * stride);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(q + b, 0, 2);
  }
}

// h [T, P, R] fp32, per calling thread and reused across calls: a large fresh allocation
// would be mmap'd and page-faulted in again on every prefill call.
inline float* scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// W: the weights' type (T, or int8_t with a_scale [S, P, R] per A row and bt_scale [S, N]
// per Bt column; both nullptr otherwise)
template <class Path, typename T, typename W>
void lora_sgmv_impl(const T* x, int64_t T_, int64_t K, const W* a, const float* a_scale,
                    const W* bt, const float* bt_scale, int64_t P, int64_t R, int64_t N,
                    const int32_t* ranks, const float* scales, const int64_t* offsets,
                    const int64_t* slots, int64_t S, T* y) {
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
  run_items(items, cost, [&](const Item& it, const Item* next) {
    if (next != nullptr) {
      const int64_t ns = groups[next->group].slot;
      prefetch_rows(a + ((ns * P + next->part) * R + next->lo) * K, 1, 0,
                    (next->hi - next->lo) * K * static_cast<int64_t>(sizeof(W)));
    }
    const Group& G = groups[it.group];
    const int64_t s = G.slot, p = it.part;
    const float scale = scales[s * P + p];
    const W* ap = a + ((s * P + p) * R) * K;
    const float* row_scale = a_scale != nullptr ? a_scale + (s * P + p) * R : nullptr;
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
        shrink_tokens<Path, T, W>(mb, rb, xp, ap + k * K, K, out);
        for (int64_t m = 0; m < mb; ++m)
          for (int64_t j = 0; j < rb; ++j)
            hp[m][k + j] = (row_scale != nullptr ? scale * row_scale[k + j] : scale) *
                           out[m * rb + j];
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
  run_items(items, cost, [&](const Item& it, const Item* next) {
    if (next != nullptr) {
      const int64_t ns = groups[next->group].slot;
      prefetch_rows(bt + ns * R * N + next->lo, ranks[ns * P + next->part], N,
                    (next->hi - next->lo) * static_cast<int64_t>(sizeof(W)));
    }
    const Group& G = groups[it.group];
    const int64_t s = G.slot, p = it.part;
    const int64_t r = ranks[s * P + p];
    const W* bp = bt + s * R * N;
    const float* col_scale = bt_scale != nullptr ? bt_scale + s * N : nullptr;
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
        expand_tokens<Path, T, W>(mb, hp, bp + c, N, r, ncols,
                                  col_scale != nullptr ? col_scale + c : nullptr, yc);
      }
    }
  });
}

// Checks both ops share (all but the weights' dtype and the q8 scales); the weights'
// dtype is `wdtype` (x's, or int8).
void check_args(const char* op, const at::Tensor& x_in, const at::Tensor& a,
                const at::Tensor& bt, at::ScalarType wdtype, const at::Tensor& ranks_in,
                const at::Tensor& scales_in, const at::Tensor& offsets_in,
                const at::Tensor& slots_in) {
  for (const at::Tensor* t : {&x_in, &a, &bt, &ranks_in, &scales_in, &offsets_in, &slots_in})
    TORCH_CHECK(t->device().is_cpu(), op, "all tensors must be on CPU, got one on ", t->device());
  TORCH_CHECK(x_in.dim() == 2, op, "x must be 2-D [T, in], got shape ", x_in.sizes());
  TORCH_CHECK(a.dim() == 4, op, "a must be 4-D [S, P, R, in], got shape ", a.sizes());
  TORCH_CHECK(bt.dim() == 3, op, "bt must be 3-D [S, R, out], got shape ", bt.sizes());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op,
              "x must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(a.scalar_type() == wdtype && bt.scalar_type() == wdtype, op,
              wdtype == dtype ? "a and bt must have x's dtype (" : "a and bt must be int8 (", wdtype,
              "), got a ", a.scalar_type(), ", bt ", bt.scalar_type());
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
  const at::Tensor ranks = ranks_in.contiguous(), offsets = offsets_in.contiguous();
  const at::Tensor slots = slots_in.contiguous();
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
}

// The delta on the path in use, after check_args; kQ8 (int8 A and Bt) needs a_scale and
// bt_scale, else the weights have x's dtype.
template <bool kQ8>
at::Tensor run_checked(const at::Tensor& x_in, const at::Tensor& a, const float* a_scale,
                       const at::Tensor& bt, const float* bt_scale, const at::Tensor& ranks_in,
                       const at::Tensor& scales_in, const at::Tensor& offsets_in,
                       const at::Tensor& slots_in) {
  const int64_t T_ = x_in.size(0), K = x_in.size(1);
  const int64_t S = a.size(0), P = a.size(1), R = a.size(2), N = bt.size(2);
  auto y = at::empty({T_, N}, x_in.options());
  if (T_ == 0 || N == 0) return y;
  if (K == 0 || R == 0 || S == 0) return y.zero_();
  const at::Tensor x = x_in.contiguous(), ranks = ranks_in.contiguous();
  const at::Tensor scales = scales_in.contiguous(), offsets = offsets_in.contiguous();
  const at::Tensor slots = slots_in.contiguous();
  const int32_t* rp = ranks.data_ptr<int32_t>();
  const float* sc = scales.data_ptr<float>();
  const int64_t* op_ = offsets.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const auto run = [&](auto path) {
    using Path = decltype(path);
    if (x.scalar_type() == at::kFloat) {
      using Wt = std::conditional_t<kQ8, int8_t, float>;
      lora_sgmv_impl<Path, float, Wt>(x.data_ptr<float>(), T_, K, a.data_ptr<Wt>(), a_scale,
                                      bt.data_ptr<Wt>(), bt_scale, P, R, N, rp, sc, op_, sp, S,
                                      y.data_ptr<float>());
    } else {
      using Wt = std::conditional_t<kQ8, int8_t, bf16>;
      lora_sgmv_impl<Path, bf16, Wt>(x.data_ptr<bf16>(), T_, K, a.data_ptr<Wt>(), a_scale,
                                     bt.data_ptr<Wt>(), bt_scale, P, R, N, rp, sc, op_, sp, S,
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

at::Tensor lora_sgmv_cpu(const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
                         const at::Tensor& ranks, const at::Tensor& scales,
                         const at::Tensor& offsets, const at::Tensor& slots) {
  check_args("fleetlm::lora_sgmv: ", x, a, bt, x.scalar_type(), ranks, scales, offsets, slots);
  return run_checked<false>(x, a, nullptr, bt, nullptr, ranks, scales, offsets, slots);
}

// int8 A and Bt: a_scale [S, P, R] float32 per A row, bt_scale [S, out] float32 per Bt
// column (of each slot: over its R rows); delta = scale * ((x @ (A * a_scale).T) @ Bt) *
// bt_scale, computed as the products of the int8 values, scaled after each sum.
at::Tensor lora_sgmv_q8_cpu(const at::Tensor& x, const at::Tensor& a, const at::Tensor& a_scale,
                            const at::Tensor& bt, const at::Tensor& bt_scale,
                            const at::Tensor& ranks, const at::Tensor& scales,
                            const at::Tensor& offsets, const at::Tensor& slots) {
  const char* op = "fleetlm::lora_sgmv_q8: ";
  check_args(op, x, a, bt, at::kChar, ranks, scales, offsets, slots);
  const int64_t S = a.size(0), P = a.size(1), R = a.size(2), N = bt.size(2);
  TORCH_CHECK(a_scale.device().is_cpu() && bt_scale.device().is_cpu(), op,
              "a_scale and bt_scale must be on CPU");
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && a_scale.dim() == 3 &&
                  a_scale.size(0) == S && a_scale.size(1) == P && a_scale.size(2) == R &&
                  a_scale.is_contiguous(),
              op, "a_scale must be contiguous float32 [S, P, R] = [", S, ", ", P, ", ", R,
              "], got ", a_scale.scalar_type(), " ", a_scale.sizes());
  TORCH_CHECK(bt_scale.scalar_type() == at::kFloat && bt_scale.dim() == 2 &&
                  bt_scale.size(0) == S && bt_scale.size(1) == N && bt_scale.is_contiguous(),
              op, "bt_scale must be contiguous float32 [S, out] = [", S, ", ", N, "], got ",
              bt_scale.scalar_type(), " ", bt_scale.sizes());
  return run_checked<true>(x, a, a_scale.data_ptr<float>(), bt, bt_scale.data_ptr<float>(),
                             ranks, scales, offsets, slots);
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
  m.def(
      "lora_sgmv_q8(Tensor x, Tensor a, Tensor a_scale, Tensor bt, Tensor bt_scale, "
      "Tensor ranks, Tensor scales, Tensor offsets, Tensor token_slots) -> Tensor");
  m.def("lora_sgmv_isa() -> str", &fleetlm::lora_sgmv_isa);
  m.def("lora_sgmv_set_isa(str isa) -> str", &fleetlm::lora_sgmv_set_isa);
}

TORCH_LIBRARY_IMPL(fleetlm, CPU, m) {
  m.impl("lora_sgmv", &fleetlm::lora_sgmv_cpu);
  m.impl("lora_sgmv_q8", &fleetlm::lora_sgmv_q8_cpu);
}
