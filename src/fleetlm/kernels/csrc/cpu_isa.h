// Run-time choice of the SIMD code path for fleetlm's CPU kernels.
//
// The kernels are compiled for the baseline of the target architecture (no -march=native):
// every SIMD path lives in functions compiled for their own ISA with GCC's
// `#pragma GCC target(...)` (x86) -- or plain NEON on aarch64, where it is baseline -- and
// one of them is chosen when an op runs, from what the CPU reports
// (`__builtin_cpu_supports`) and what was asked for:
//
//   FLEETLM_CPU_ISA = auto (default) | avx512 | avx2 | neon | scalar
//
// read the first time a kernel runs, or later `set_isa()` (the ops
// `fleetlm::<op>_set_isa(str) -> str`). The paths are ranked scalar < neon < avx2 < avx512;
// asking for one the CPU lacks gives the best supported path ranked below it (avx512 on
// an AVX2-only CPU -> avx2, neon on x86 -> scalar, avx2 on aarch64 -> neon), and the op
// `fleetlm::<op>_isa() -> str` reports the path in use. Each library (.so) that includes
// this header keeps its own choice (internal linkage).

#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#define FLEETLM_X86 1
#endif

namespace fleetlm {
namespace {
namespace cpu {

enum class Isa : int { kScalar = 0, kNeon = 1, kAvx2 = 2, kAvx512 = 3 };
constexpr int kAuto = -1;

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kNeon: return "neon";
    default: return "scalar";
  }
}

// True when this CPU (and OS: libgcc checks XCR0) can run the path.
inline bool supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kNeon:
#if defined(__aarch64__)
      return true;  // Advanced SIMD is part of the aarch64 baseline
#else
      return false;
#endif
    case Isa::kAvx2:
#if defined(FLEETLM_X86)
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
#else
      return false;
#endif
    case Isa::kAvx512:
#if defined(FLEETLM_X86)
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
#else
      return false;
#endif
  }
  return false;
}

// x86 only: AVX512_BF16 (vcvtne2ps2bf16), used by lora_sgmv's avx512 path when present.
inline bool has_avx512_bf16() {
#if defined(FLEETLM_X86)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// x86 only: AVX512_VNNI (vpdpbusd), used by int4_linear's int8-activation avx512 path.
inline bool has_avx512_vnni() {
#if defined(FLEETLM_X86)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// The requested path, or the best supported one ranked below it.
inline Isa resolve(int requested) {
  int i = requested == kAuto ? static_cast<int>(Isa::kAvx512) : requested;
  for (; i > 0; --i)
    if (supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::kScalar;
}

// "auto" -> kAuto, a path name -> its Isa value; -2 for anything else.
inline int parse(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (s.empty() || s == "auto") return kAuto;
  for (int i = 0; i <= static_cast<int>(Isa::kAvx512); ++i)
    if (s == isa_name(static_cast<Isa>(i))) return i;
  return -2;
}

inline std::atomic<int>& chosen() {  // the resolved path; -1 until first use
  static std::atomic<int> value{-1};
  return value;
}

// The path in use (first call: from FLEETLM_CPU_ISA, default auto).
inline Isa current() {
  int v = chosen().load(std::memory_order_relaxed);
  if (v >= 0) return static_cast<Isa>(v);
  const char* env = std::getenv("FLEETLM_CPU_ISA");
  int req = parse(env == nullptr ? "" : env);
  if (req == -2) {
    TORCH_WARN("FLEETLM_CPU_ISA=", env,
               " is not one of auto, avx512, avx2, neon, scalar; using auto");
    req = kAuto;
  }
  v = static_cast<int>(resolve(req));
  chosen().store(v, std::memory_order_relaxed);
  return static_cast<Isa>(v);
}

// Ask for a path ("auto" or a name); returns the name of the path now in use.
inline std::string set_isa(const std::string& name) {
  const int req = parse(name);
  TORCH_CHECK(req != -2, "fleetlm: unknown CPU ISA '", name,
              "' (expected auto, avx512, avx2, neon or scalar)");
  const Isa isa = resolve(req);
  chosen().store(static_cast<int>(isa), std::memory_order_relaxed);
  return isa_name(isa);
}

}  // namespace cpu
}  // namespace
}  // namespace fleetlm
