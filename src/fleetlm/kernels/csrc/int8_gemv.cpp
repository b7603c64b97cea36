// Weight-only int8 matrix-vector / skinny matrix product for CPU decode.
//
//   y[M, N] = (x[M, K] @ w[N, K].T) * scales[N]      (fp32 accumulation)
//
// x: float32 or bfloat16, w: int8 (row-major [N, K], contiguous), scales: x's dtype.
// Built for small M (single-stream decode, M = 1..8): each weight row is streamed from
// memory once and reused for every row of x (row blocks of R weight rows stay in L1 while
// the M rows of x are walked in chunks of up to 4). The int8 weights are widened in
// registers (int8 -> int32 -> fp32) and FMA'd against x in fp32, so the memory traffic is
// 1 byte per weight -- the bound for decode on a CPU.
//
// Registered as the custom op `fleetlm::int8_linear` (CPU kernel here; the fake/meta
// kernel for torch.compile lives in fleetlm/kernels/int8_gemv.py).

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fleetlm {
namespace {

// Rows of x handled per pass over a weight row block (accumulators = R * MB registers).
constexpr int kMaxMB = 4;  // row_block handles the remainder (1..3) explicitly
// Minimum weight bytes per parallel task: below this the fork/join costs more than it saves.
constexpr int64_t kMinBytesPerTask = 16 * 1024;
// Weight rows per block (all M): 4 rows x up to 4 x-rows = 16 accumulators.
constexpr int kRows = 4;
// Software prefetch: the next row block into L1, and the block about kPrefetchFarBytes
// beyond it into L2. Without it the kernel is only as fast as ATen's; the far L2 prefetch
// adds another ~10-15% on cold weights here.
constexpr int64_t kPrefetchFarBytes = 9 * 1024;

#if defined(__AVX512F__)

// 16 int8 weights -> 16 fp32
static inline __m512 load_w16(const int8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
}

static inline __m512 load_w16_tail(const int8_t* p, int n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
#else
  alignas(16) int8_t buf[16] = {0};
  std::memcpy(buf, p, n);
  return load_w16(buf);
#endif
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

#else  // scalar fallback

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

#endif

// y[m0 .. m0+MB, n0 .. n0+R] from one pass over the weight row block at w[n0 * K].
template <int R, int MB, typename T>
static inline void pass(const float* x, int64_t m0, int64_t K, const int8_t* w, const T* scales,
                        int64_t n0, int64_t N, const int8_t* pf, const int8_t* pf_far, T* y) {
  float out[MB * R];
  dot_block<R, MB>(x + m0 * K, K, w + n0 * K, K, pf, pf_far, out);
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < R; ++r)
      y[(m0 + i) * N + n0 + r] = static_cast<T>(out[i * R + r] * static_cast<float>(scales[n0 + r]));
}

// Rows [n0, n0 + R) of the output, for all M rows of x: the first pass streams the block
// from memory (and prefetches the next ones), later passes find it in L1.
template <int R, typename T>
static inline void row_block(const float* x, int64_t M, int64_t K, const int8_t* w,
                             const T* scales, int64_t n0, int64_t N, const int8_t* pf,
                             const int8_t* pf_far, T* y) {
  int64_t m = 0;
  for (; m + kMaxMB <= M; m += kMaxMB, pf = pf_far = nullptr)
    pass<R, kMaxMB, T>(x, m, K, w, scales, n0, N, pf, pf_far, y);
  switch (M - m) {
    case 3:
      pass<R, 3, T>(x, m, K, w, scales, n0, N, pf, pf_far, y);
      break;
    case 2:
      pass<R, 2, T>(x, m, K, w, scales, n0, N, pf, pf_far, y);
      break;
    case 1:
      pass<R, 1, T>(x, m, K, w, scales, n0, N, pf, pf_far, y);
      break;
    default:
      break;
  }
}

template <int R, typename T>
static void gemv_impl(const float* x, int64_t M, int64_t K, const int8_t* w,
                      const T* scales, int64_t N, T* y) {
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
      row_block<R, T>(x, M, K, w, scales, n0, N, pf, pf_far, y);
    }
  });
  // leftover rows (N % R), one at a time
  for (int64_t n = tail_start; n < N; ++n)
    row_block<1, T>(x, M, K, w, scales, n, N, nullptr, nullptr, y);
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
    gemv_impl<kRows, float>(x.data_ptr<float>(), M, K, wp, s.data_ptr<float>(), N,
                            y.data_ptr<float>());
  } else {
    const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
    std::vector<float> xbuf(static_cast<size_t>(M * K));
    for (int64_t i = 0; i < M * K; ++i) xbuf[i] = static_cast<float>(xb[i]);
    gemv_impl<kRows, c10::BFloat16>(xbuf.data(), M, K, wp, s.data_ptr<c10::BFloat16>(), N,
                                    y.data_ptr<c10::BFloat16>());
  }
  return y;
}

}  // namespace
}  // namespace fleetlm

TORCH_LIBRARY(fleetlm, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(fleetlm, CPU, m) {
  m.impl("int8_linear", &fleetlm::int8_linear_cpu);
}
