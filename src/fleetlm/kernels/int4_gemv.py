"""Weight-only 4-bit group-wise GEMV for CPU decode: the ``fleetlm::int4_linear`` custom op.

The format (asymmetric 4-bit, one float32 scale and one float32 min per group of ``G``
consecutive weights along K, ``G`` a multiple of 32 that divides K; default 32)::

    W[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G]      q in 0..15

    packed  uint8   [N, K // 2]  two codes per byte. Every run of 32 weights
                                 k0 .. k0 + 31 (k0 % 32 == 0) is 16 bytes; byte j of it
                                 holds q[k0 + j] (low nibble) and q[k0 + 16 + j] (high
                                 nibble), so one 16-byte load + AND / shift yields 16
                                 consecutive codes each (the order of llama.cpp's Q4 blocks)
    scales  float32 [N, K // G]
    mins    float32 [N, K // G]

With G = 32 a weight costs 0.75 byte (16 bytes of codes + 8 of scale/min per 32), against
1 (+ 4/K) for int8 and 4 for float32. :func:`quantize` picks each group's scale and min by
round-to-nearest on [min, max] followed by a few least-squares refits (scale and min
re-solved for the chosen codes, codes re-rounded), which lowers the weight error ~15-20%
against plain min/max rounding.

``int4_linear(x, packed, scales, mins, group_size)`` computes ``x @ W.T`` with x [M, K]
float32 or bfloat16 (fp32 accumulation; the result has x's dtype). The C++ source
(``csrc/int4_gemv.cpp``) is built on first use like ``int8_gemv`` (``fleetlm.kernels._build``);
``FLEETLM_INT4_KERNEL=0`` disables it and callers fall back to :func:`dequantize` +
``F.linear``. It holds AVX-512, AVX2+FMA, NEON and scalar paths picked at run time
(``FLEETLM_CPU_ISA``, ``fleetlm.kernels.cpu.set_kernel_isa``; ``fleetlm::int4_linear_isa()``
reports the path in use). Below 8 rows of x the AVX-512 and AVX2 paths quantise x to
int8 per run of 32 (scale max |x| / 127, as llama.cpp's Q8 blocks) and multiply it with
the 4-bit codes in integer arithmetic (AVX512-VNNI's vpdpbusd where present);
:func:`reference_int8_activations` is their slow twin, :func:`activation_rows` and
:func:`activation_path` say when and how the current path does it, and
``FLEETLM_INT4_ACTIVATIONS=float`` (or :func:`set_activations`) keeps x in fp32. A fake kernel is registered so the op traces under
``torch.compile(fullgraph=True)`` with a dynamic M.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fleetlm.kernels._build import CSRC, NativeKernel

ENV_VAR = "FLEETLM_INT4_KERNEL"
GROUP_SIZE = 32  # default group size (weights per scale/min pair along K)
_REFITS = 4  # least-squares refits in quantize()


def check_group_size(k: int, group_size: int) -> None:
    """Raise ValueError unless ``group_size`` is a positive multiple of 32 dividing ``k``."""
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"int4: group_size must be a positive multiple of 32, got {group_size}")
    if k % group_size:
        raise ValueError(f"int4: K ({k}) must be a multiple of group_size ({group_size}); "
                         "keep such layers in int8 or float")


def quantize(w: Tensor, group_size: int = GROUP_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """Float weight [N, K] -> (packed uint8 [N, K/2], scales, mins float32 [N, K/G])."""
    n, k = w.shape
    check_group_size(k, group_size)
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    lo = wg.amin(-1)
    hi = wg.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)
    for _ in range(_REFITS):
        # least squares for (scale, min) given the codes: w ~ q * scale + min
        qm = q.mean(-1)
        wm = wg.mean(-1)
        var = (q * q).mean(-1) - qm * qm
        cov = (q * wg).mean(-1) - qm * wm
        flat = var < 1e-12  # all codes equal: keep the min/max fit
        new_scale = torch.where(flat, scale, cov / var.clamp(min=1e-12)).clamp(min=1e-10)
        new_min = torch.where(flat, lo, wm - new_scale * qm)
        q_new = torch.round((wg - new_min[..., None]) / new_scale[..., None]).clamp(0, 15)
        old_err = (q * scale[..., None] + lo[..., None] - wg).pow(2).sum(-1)
        new_err = (q_new * new_scale[..., None] + new_min[..., None] - wg).pow(2).sum(-1)
        better = new_err < old_err
        scale = torch.where(better, new_scale, scale)
        lo = torch.where(better, new_min, lo)
        q = torch.where(better[..., None], q_new, q)
    return pack(q.reshape(n, k).to(torch.uint8)), scale.contiguous(), lo.contiguous()


def pack(q: Tensor) -> Tensor:
    """Codes uint8 [N, K] (0..15, K % 32 == 0) -> packed [N, K/2] in the kernel's order."""
    n, k = q.shape
    blocks = q.reshape(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack(packed: Tensor) -> Tensor:
    """packed [N, K/2] -> codes uint8 [N, K] (inverse of :func:`pack`)."""
    n, k2 = packed.shape
    b = packed.reshape(n, k2 // 16, 16)
    return torch.stack((b & 0x0F, b >> 4), dim=2).reshape(n, k2 * 2)


def dequantize(packed: Tensor, scales: Tensor, mins: Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight [N, K] the packed format stands for (the kernel's reference)."""
    q = unpack(packed).float()
    n, k = q.shape
    w = q.reshape(n, k // group_size, group_size) * scales[..., None] + mins[..., None]
    return w.reshape(n, k).to(dtype)


def _fake_int4_linear(x: Tensor, packed: Tensor, scales: Tensor, mins: Tensor,
                      group_size: int) -> Tensor:
    torch._check(x.dim() == 2, lambda: f"fleetlm::int4_linear: x must be 2-D, got {x.dim()}-D")
    torch._check(packed.dim() == 2,
                 lambda: f"fleetlm::int4_linear: packed must be 2-D, got {packed.dim()}-D")
    torch._check(
        x.shape[1] == packed.shape[1] * 2,
        lambda: f"fleetlm::int4_linear: shape mismatch, x {tuple(x.shape)} "
                f"packed {tuple(packed.shape)}",
    )
    return x.new_empty((x.shape[0], packed.shape[0]))


def _register_fake() -> None:
    torch.library.register_fake("fleetlm::int4_linear")(_fake_int4_linear)


_kernel = NativeKernel("fleetlm_int4_gemv", CSRC / "int4_gemv.cpp", ENV_VAR, _register_fake,
                       fallback="dequantise + F.linear")


def load() -> bool:
    """Build/load the kernel once per process; True when ``fleetlm::int4_linear`` is usable."""
    return _kernel.load()


def is_loaded() -> bool:
    """True when ``load()`` has already succeeded (never triggers a build)."""
    return _kernel.is_loaded()


def int4_linear(x: Tensor, packed: Tensor, scales: Tensor, mins: Tensor,
                group_size: int = GROUP_SIZE) -> Tensor:
    """``x @ dequantize(packed, scales, mins, group_size).T`` -> [M, N] in x's dtype.

    Call ``load()`` first. x: [M, K] float32/bfloat16; packed: [N, K/2] uint8; scales,
    mins: [N, K/group_size] float32; all contiguous.
    """
    return torch.ops.fleetlm.int4_linear(x, packed, scales, mins, group_size)


def activation_rows() -> int:
    """Rows of x below which the current path quantises x to int8 (0: never). Call
    ``load()`` first."""
    return int(torch.ops.fleetlm.int4_linear_activation_rows())


def activation_path() -> str:
    """What the current path does with x below :func:`activation_rows` rows:
    ``"avx512-vnni"``, ``"avx512-bw"`` or ``"avx2"`` (int8, by instruction set), or
    ``"float"``."""
    return str(torch.ops.fleetlm.int4_linear_activation_path())


def set_activations(mode: str) -> str:
    """``"int8"`` (the default: VNNI where the CPU has it), ``"int8-novnni"`` (AVX-512
    without VNNI, for tests) or ``"float"``; returns :func:`activation_path` afterwards."""
    return str(torch.ops.fleetlm.int4_linear_set_activations(mode))


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (int8 codes [M, K], float32 scales [M, K/32]): per run of 32, scale
    max |x| / 127, codes round(x * 127 / max |x|) (half to even), as the kernel does."""
    m, k = x.shape
    xr = x.float().reshape(m, k // 32, 32)
    amax = xr.abs().amax(-1)
    # a true division (``127.0 / amax`` would be reciprocal * 127, an ulp off the kernel's)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    codes = torch.round(xr * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(m, k), amax / 127.0


def reference_int8_activations(x: Tensor, packed: Tensor, scales: Tensor, mins: Tensor,
                               group_size: int = GROUP_SIZE) -> Tensor:
    """The int8-activation paths' result, computed slowly (float64): for every run of 32,
    scale_w * scale_x * sum(code_w * code_x), plus min * (the exact sum of x) per group."""
    m, k = x.shape
    n = packed.shape[0]
    xq, xs = quantize_activations(x)
    q = unpack(packed).double().reshape(n, k // 32, 32)
    dots = torch.einsum("nbj,mbj->mnb", q, xq.double().reshape(m, k // 32, 32))
    sw = scales.double().repeat_interleave(group_size // 32, dim=1)  # [N, K/32]
    y = (dots * sw[None] * xs.double()[:, None, :]).sum(-1)
    gsum = x.double().reshape(m, k // group_size, group_size).sum(-1)  # [M, K/G]
    y += gsum @ mins.double().T
    return y.to(x.dtype)
