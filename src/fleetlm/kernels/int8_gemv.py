"""Weight-only int8 GEMV for CPU decode: the ``fleetlm::int8_linear`` custom op.

``int8_linear(x, w, scales)`` computes ``(x @ w.T) * scales`` with ``x`` [M, K] float32 or
bfloat16, ``w`` [N, K] int8 (contiguous) and ``scales`` [N] in ``x``'s dtype, accumulating
in float32 and returning [M, N] in ``x``'s dtype -- the same contract as
``torch._weight_int8pack_mm``, but 2-3x faster on cold (larger-than-cache) weights for the
small M of single-stream decode.

The C++ source (``csrc/int8_gemv.cpp``) is compiled on first use with
``torch.utils.cpp_extension.load`` (``fleetlm.kernels._build``; needs a C++ compiler and
``ninja``; cached under ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). ``load()`` returns
False -- after logging one warning -- when the build fails, and when the environment
variable ``FLEETLM_INT8_KERNEL=0`` disables the kernel; callers then fall back to
``torch._weight_int8pack_mm``. A fake (meta) kernel is registered so the op traces
under ``torch.compile(fullgraph=True)``.

The library is built without ``-march=native`` and holds an AVX-512, an AVX2+FMA (x86),
a NEON (aarch64) and a scalar path; the best one this CPU supports is picked at run time
(``FLEETLM_CPU_ISA`` or ``fleetlm.kernels.cpu.set_kernel_isa`` force another; the op
``fleetlm::int8_linear_isa()`` reports the one in use -- see ``fleetlm.kernels.cpu``).

For bfloat16 activations from 10 rows on, the AVX-512 path can widen the weights to
bfloat16 and multiply with AVX512_BF16's ``vdpbf16ps`` (``csrc/int8_bf16dot.inc``): 2x the
multiply-adds an instruction, faster on CPUs that issue it as fast as an FMA (AMD Zen 4:
1.36x at 32 rows, 1.5x at 64) and slower on others (Intel Sapphire Rapids), so ``auto``
measures both once (~1 ms). ``FLEETLM_INT8_BF16DOT=auto|on|off`` and
:func:`set_bf16_dot` decide; :func:`bf16_dot` reports it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fleetlm.kernels._build import CSRC, NativeKernel

ENV_VAR = "FLEETLM_INT8_KERNEL"


def _fake_int8_linear(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    torch._check(x.dim() == 2, lambda: f"fleetlm::int8_linear: x must be 2-D, got {x.dim()}-D")
    torch._check(w.dim() == 2, lambda: f"fleetlm::int8_linear: w must be 2-D, got {w.dim()}-D")
    torch._check(
        x.shape[1] == w.shape[1],
        lambda: f"fleetlm::int8_linear: shape mismatch, x {tuple(x.shape)} w {tuple(w.shape)}",
    )
    return x.new_empty((x.shape[0], w.shape[0]))


def _register_fake() -> None:
    torch.library.register_fake("fleetlm::int8_linear")(_fake_int8_linear)


_kernel = NativeKernel("fleetlm_int8_gemv", CSRC / "int8_gemv.cpp", ENV_VAR, _register_fake,
                       fallback="torch._weight_int8pack_mm")


def load() -> bool:
    """Build/load the kernel once per process; True when ``fleetlm::int8_linear`` is usable."""
    return _kernel.load()


def is_loaded() -> bool:
    """True when ``load()`` has already succeeded (never triggers a build)."""
    return _kernel.is_loaded()


def int8_linear(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    """``(x @ w.T) * scales`` -> [M, N] in x's dtype; call ``load()`` first.

    x: [M, K] float32/bfloat16; w: [N, K] int8, contiguous; scales: [N], x's dtype.
    """
    return torch.ops.fleetlm.int8_linear(x, w, scales)


def bf16_dot() -> bool:
    """Whether the batched bfloat16 path multiplies with vdpbf16ps (call ``load()`` first)."""
    return bool(torch.ops.fleetlm.int8_linear_bf16dot())


def set_bf16_dot(how: str) -> bool:
    """``"auto"`` (measure), ``"on"`` or ``"off"``; whether the path is now in use (never
    on a CPU without AVX512_BF16). RuntimeError for anything else."""
    return bool(torch.ops.fleetlm.int8_linear_set_bf16dot(how))
