// Stand-alone check of the aarch64 NEON micro-kernels of int8_gemv.cpp, int4_gemv.cpp, lora_sgmv.cpp
// and decode_stack.inc
// against double-precision loops, for machines without an ARM CPU: test_neon_emulated.py
// pastes the kernels' `namespace neon` blocks in at NEON_KERNELS, cross-compiles with
// aarch64-linux-gnu-g++ and runs the result under qemu-aarch64-static. (No libtorch: bf16 is
// a stand-in with c10::BFloat16's rounding.)
#include <arm_neon.h>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cmath>
#include <random>
#include <type_traits>
#include <algorithm>
#include <vector>
struct BF {
  uint16_t x;
  BF() = default;
  BF(float f) { uint32_t u; std::memcpy(&u, &f, 4);
    if (std::isnan(f)) { x = 0x7FC0; return; }
    x = uint16_t((u + ((u >> 16) & 1) + 0x7FFF) >> 16); }
  operator float() const { uint32_t u = uint32_t(x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
using bf16 = BF;
namespace c10 { using BFloat16 = BF; }  // decode_stack.inc names it so
// NEON_KERNELS

std::mt19937 rng(1);
float rnd() { return std::uniform_real_distribution<float>(-1, 1)(rng); }
int fails = 0;
void check(bool ok, const char* what, int a, int b, int c) { if (!ok) { ++fails; std::printf("FAIL %s %d %d %d\n", what, a, b, c); } }

template <int R, int MB> void t_dot(int K) {
  std::vector<float> x(MB * K); std::vector<int8_t> w(R * K); float out[R * MB];
  for (auto& v : x) v = rnd();
  for (auto& v : w) v = int8_t(int(rng() % 255) - 127);
  i8neon::dot_block<R, MB>(x.data(), K, w.data(), K, w.data(), nullptr, out);
  for (int m = 0; m < MB; ++m) for (int r = 0; r < R; ++r) {
    double s = 0; for (int k = 0; k < K; ++k) s += double(x[m * K + k]) * w[r * K + k];
    check(std::fabs(out[m * R + r] - s) <= 1e-4 * (1 + std::fabs(s)) + 1e-3, "int8 dot", R, MB, K); }
}
// int4_gemv.cpp's format: per 32 weights 16 bytes, byte j = q[j] | q[j + 16] << 4
template <int R, int MB> void t_i4dot(int K, int G) {
  const int ng = K / G; std::vector<float> x(MB * K), sc(R * ng), mn(R * ng); float out[R * MB];
  std::vector<uint8_t> q(R * K), w(R * K / 2);
  for (auto& v : x) v = rnd();
  for (auto& v : q) v = uint8_t(rng() % 16);
  for (auto& v : sc) v = 0.01f + 0.05f * std::fabs(rnd());
  for (auto& v : mn) v = -0.3f * std::fabs(rnd());
  for (int r = 0; r < R; ++r) for (int k0 = 0; k0 < K; k0 += 32) for (int j = 0; j < 16; ++j)
    w[r * K / 2 + k0 / 2 + j] = uint8_t(q[r * K + k0 + j] | (q[r * K + k0 + 16 + j] << 4));
  i4neon::dot_block<R, MB>(x.data(), K, w.data(), sc.data(), mn.data(), K, G, w.data(), out);
  for (int m = 0; m < MB; ++m) for (int r = 0; r < R; ++r) {
    double s = 0;
    for (int k = 0; k < K; ++k) s += double(x[m * K + k]) * (double(q[r * K + k]) * sc[r * ng + k / G] + mn[r * ng + k / G]);
    check(std::fabs(out[m * R + r] - s) <= 1e-4 * (1 + std::fabs(s)) + 1e-3, "int4 dot", R, MB, K); }
}
template <typename T, int MB, int RB> void t_shrink(int K) {
  std::vector<T> xs(MB * K), a(RB * K); const T* xp[4]; float out[MB * RB];
  for (auto& v : xs) v = T(rnd());
  for (auto& v : a) v = T(rnd());
  for (int m = 0; m < MB; ++m) xp[m] = xs.data() + m * K;
  if constexpr (std::is_same_v<T, float>) neon::shrink_lin<float, float, MB, RB>(xp, a.data(), K, out);
  else neon::shrink_bf16<MB, RB>(xp, a.data(), K, out);
  for (int m = 0; m < MB; ++m) for (int j = 0; j < RB; ++j) {
    double s = 0; for (int k = 0; k < K; ++k) s += double(float(xs[m * K + k])) * float(a[j * K + k]);
    check(std::fabs(out[m * RB + j] - s) <= 1e-5 * (1 + std::fabs(s)) * K, "shrink", MB, RB, K); }
}
template <typename T, int MB> void t_expand(int r, int ncols) {
  const int ldb = ncols + 7; std::vector<T> bt(r * ldb); std::vector<float> h(MB * r);
  std::vector<T> ys(MB * ncols); const float* hp[4]; T* yp[4];
  for (auto& v : bt) v = T(rnd());
  for (auto& v : h) v = rnd();
  for (int m = 0; m < MB; ++m) { hp[m] = h.data() + m * r; yp[m] = ys.data() + m * ncols; }
  if constexpr (std::is_same_v<T, float>) neon::expand_lin<float, float, MB>(hp, bt.data(), ldb, r, ncols, nullptr, yp);
  else neon::expand_bf16<MB>(hp, bt.data(), ldb, r, ncols, yp);
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-2;
  for (int m = 0; m < MB; ++m) for (int c = 0; c < ncols; ++c) {
    double s = 0; for (int k = 0; k < r; ++k) s += double(h[m * r + k]) * float(bt[k * ldb + c]);
    check(std::fabs(float(ys[m * ncols + c]) - s) <= tol * (1 + std::fabs(s)), "expand", MB, r, ncols); }
}
// lora_sgmv_q8's micro-kernels: x (T) against int8 A rows; h against int8 Bt, column-scaled
template <typename T, int MB, int RB> void t_shrink_q8(int K) {
  std::vector<T> xs(MB * K); std::vector<int8_t> a(RB * K); const T* xp[4]; float out[MB * RB];
  for (auto& v : xs) v = T(rnd());
  for (auto& v : a) v = int8_t(int(rng() % 255) - 127);
  for (int m = 0; m < MB; ++m) xp[m] = xs.data() + m * K;
  neon::shrink_lin<T, int8_t, MB, RB>(xp, a.data(), K, out);
  for (int m = 0; m < MB; ++m) for (int j = 0; j < RB; ++j) {
    double s = 0; for (int k = 0; k < K; ++k) s += double(float(xs[m * K + k])) * a[j * K + k];
    check(std::fabs(out[m * RB + j] - s) <= 1e-5 * (1 + std::fabs(s)) * K, "shrink q8", MB, RB, K); }
}
template <typename T, int MB> void t_expand_q8(int r, int ncols) {
  const int ldb = ncols + 7; std::vector<int8_t> bt(r * ldb); std::vector<float> h(MB * r), cs(ncols);
  std::vector<T> ys(MB * ncols); const float* hp[4]; T* yp[4];
  for (auto& v : bt) v = int8_t(int(rng() % 255) - 127);
  for (auto& v : h) v = rnd();
  for (auto& v : cs) v = 0.01f * std::fabs(rnd());
  for (int m = 0; m < MB; ++m) { hp[m] = h.data() + m * r; yp[m] = ys.data() + m * ncols; }
  neon::expand_lin<T, int8_t, MB>(hp, bt.data(), ldb, r, ncols, cs.data(), yp);
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-2;
  for (int m = 0; m < MB; ++m) for (int c = 0; c < ncols; ++c) {
    double s = 0; for (int k = 0; k < r; ++k) s += double(h[m * r + k]) * bt[k * ldb + c];
    s *= cs[c];
    check(std::fabs(float(ys[m * ncols + c]) - s) <= tol * (1 + std::fabs(s)), "expand q8", MB, r, ncols); }
}
// decode_stack.inc's attention helpers: dot(q, key row) and y += a * value row
template <typename C> void t_attn(int n) {
  std::vector<float> q(n), y(n), y0(n); std::vector<C> k(n);
  for (int i = 0; i < n; ++i) { q[i] = rnd(); k[i] = C(rnd()); y[i] = y0[i] = rnd(); }
  double s = 0; for (int i = 0; i < n; ++i) s += double(q[i]) * float(k[i]);
  float got = stneon::dot(q.data(), k.data(), n);
  check(std::fabs(got - s) <= 1e-5 * (1 + std::fabs(s)) + 1e-5, "attn dot", n, sizeof(C), 0);
  stneon::axpy(0.75f, k.data(), y.data(), n);
  for (int i = 0; i < n; ++i)
    check(std::fabs(y[i] - (y0[i] + 0.75f * float(k[i]))) <= 1e-6, "attn axpy", n, i, sizeof(C));
}

int main() {
  for (int n : {1, 3, 4, 7, 8, 16, 33, 64, 65}) { t_attn<float>(n); t_attn<bf16>(n); }
  for (int K : {1, 3, 7, 8, 9, 16, 45, 64, 65, 130, 577}) {
    t_dot<4, 4>(K); t_dot<4, 3>(K); t_dot<4, 2>(K); t_dot<4, 1>(K); t_dot<1, 1>(K); t_dot<1, 4>(K);
    t_shrink<float, 1, 8>(K); t_shrink<float, 4, 4>(K); t_shrink<float, 3, 2>(K);
    t_shrink<bf16, 2, 5>(K); t_shrink<bf16, 4, 1>(K);
    t_shrink_q8<float, 1, 8>(K); t_shrink_q8<float, 4, 4>(K); t_shrink_q8<bf16, 2, 5>(K);
    t_shrink_q8<bf16, 3, 1>(K);
  }
  for (int K : {32, 64, 96, 128, 576}) for (int G : {32, 64, 128}) if (K % G == 0) {
    t_i4dot<4, 4>(K, G); t_i4dot<4, 3>(K, G); t_i4dot<4, 2>(K, G); t_i4dot<4, 1>(K, G);
    t_i4dot<1, 1>(K, G); t_i4dot<1, 4>(K, G); }
  for (int r : {1, 5, 16}) for (int nc = 1; nc <= 64; ++nc) {
    t_expand<float, 1>(r, nc); t_expand<float, 4>(r, nc); t_expand<bf16, 3>(r, nc); t_expand<bf16, 2>(r, nc);
    t_expand_q8<float, 1>(r, nc); t_expand_q8<bf16, 4>(r, nc); }
  std::printf("neon harness: %d failures\n", fails);
  return fails != 0;
}
