"""Which SIMD code path fleetlm's native CPU kernels run, and what this CPU offers.

The kernels (``int8_gemv``, ``int4_gemv``, ``lora_sgmv``) are compiled for the architecture's baseline --
never ``-march=native`` -- with every SIMD path inside (x86: AVX-512, AVX2+FMA, scalar;
aarch64: NEON, scalar), each in functions compiled for its own ISA. The path is chosen
when an op runs, from what the CPU reports (``__builtin_cpu_supports``; see
``csrc/cpu_isa.h``):

    FLEETLM_CPU_ISA = auto (default) | avx512 | avx2 | neon | scalar

is read the first time each kernel runs; :func:`set_kernel_isa` switches the loaded kernels
at any time (no rebuild: one library holds every path). Paths rank
scalar < neon < avx2 < avx512, and asking for one this CPU lacks gives the best supported
path ranked below it (avx512 on an AVX2-only EPYC -> avx2; neon on x86 -> scalar; avx2 on
aarch64 -> neon). :func:`kernel_isa` reports what each loaded kernel actually uses
(``lora_sgmv`` says ``avx512+bf16`` when it also rounds with AVX512_BF16);
:func:`expected_isa` predicts it from ``/proc/cpuinfo`` alone, and :func:`cpu_features`
summarises the CPU for logs and benchmarks. AMX and AVX512_VNNI are reported but not used:
the int8 kernel is weight-only (float activations), so its work is fp32 FMA.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from fleetlm.kernels import int4_gemv, int8_gemv, lora_sgmv

ENV_VAR = "FLEETLM_CPU_ISA"
ISAS = ("auto", "avx512", "avx2", "neon", "scalar")
RANKED = ("scalar", "neon", "avx2", "avx512")  # lowest first
# /proc/cpuinfo flags each x86 path needs (the C++ side checks the same with cpuid)
NEEDS = {"avx2": {"avx2", "fma", "f16c"},
         "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}}
# flags worth reporting (x86 names, then aarch64 names)
REPORTED = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
            "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
            "amx_int8", "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo; flags come from ``Features`` on aarch64."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model or platform.processor() or platform.machine(), flags


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as the kernel reports them (``/proc/cpuinfo``)."""
    return _cpuinfo()[1]


def _is_arm() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def isa_supported(isa: str, flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU (or one with ``flags``) can run the path ``isa``."""
    flags = cpu_flags() if flags is None else flags
    if isa == "scalar":
        return True
    if isa == "neon":
        return _is_arm()
    return not _is_arm() and NEEDS[isa] <= flags


def expected_isa(requested: str = "auto", flags: frozenset[str] | None = None) -> str:
    """The path the kernels should pick for ``requested``: itself when supported, else
    the best supported path ranked below it (``auto``: the best of all)."""
    _check(requested)
    top = len(RANKED) - 1 if requested == "auto" else RANKED.index(requested)
    return next(isa for isa in reversed(RANKED[: top + 1]) if isa_supported(isa, flags))


def cpu_features() -> dict[str, object]:
    """A summary of this CPU for logs and benchmarks: model, architecture, PyTorch's own
    capability (``torch.backends.cpu.get_cpu_capability()``), the relevant flags, the
    best kernel path and the paths it can run."""
    model, flags = _cpuinfo()
    return {
        "model": model,
        "machine": platform.machine(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [f for f in REPORTED if f in flags],
        "best_isa": expected_isa("auto", flags),
        "supported_isas": [isa for isa in reversed(RANKED) if isa_supported(isa, flags)],
        "requested": os.environ.get(ENV_VAR, "auto"),
    }


def _loaded() -> dict[str, tuple[str, str]]:
    """kernel -> (report op, set op), for the kernels already loaded in this process."""
    ops = {}
    if int8_gemv.is_loaded():
        ops["int8_linear"] = ("int8_linear_isa", "int8_linear_set_isa")
    if int4_gemv.is_loaded():
        ops["int4_linear"] = ("int4_linear_isa", "int4_linear_set_isa")
    if lora_sgmv.is_loaded():
        ops["lora_sgmv"] = ("lora_sgmv_isa", "lora_sgmv_set_isa")
    return ops


def kernel_isa() -> dict[str, str]:
    """kernel name -> the path it uses now, for each loaded kernel (none are built here)."""
    return {name: getattr(torch.ops.fleetlm, report)() for name, (report, _) in _loaded().items()}


def _check(isa: str) -> None:
    if isa not in ISAS:
        raise ValueError(f"unknown CPU ISA {isa!r}; expected one of {', '.join(ISAS)}")


def set_kernel_isa(isa: str) -> dict[str, str]:
    """Ask every loaded kernel for the path ``isa`` (one of :data:`ISAS`); returns what
    each now uses (a fallback where this CPU lacks ``isa``). Kernels loaded later still
    start from ``FLEETLM_CPU_ISA``."""
    _check(isa)
    return {name: getattr(torch.ops.fleetlm, setter)(isa)
            for name, (_, setter) in _loaded().items()}


@contextmanager
def forced_isa(isa: str) -> Iterator[dict[str, str]]:
    """``with forced_isa("avx2") as used:`` -- run the loaded kernels on ``isa`` (``used``:
    what each really runs), restoring each kernel's previous path afterwards."""
    before = kernel_isa()
    try:
        yield set_kernel_isa(isa)
    finally:
        for name, (_, setter) in _loaded().items():
            if name in before:
                getattr(torch.ops.fleetlm, setter)(before[name].split("+")[0])
