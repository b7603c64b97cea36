"""Multi-LoRA deltas on CPU in one native call: the ``fleetlm::lora_sgmv`` custom op.

``lora_sgmv(x, a, bt, ranks, scales, offsets, token_slots)`` returns delta [T, out] in x's
dtype with, for every token t of slot s = token_slots[t] (-1: a row of zeros) and every
part p of a fused projection (q|k|v, gate|up) with rank r = ranks[s, p]::

    delta[t, offsets[p]:offsets[p+1]] =
        scales[s, p] * (x[t] @ a[s, p, :r].T) @ bt[s, :r, offsets[p]:offsets[p+1]]

x: [T, in] float32/bfloat16; a: [S, P, R, in] and bt: [S, R, out], x's dtype, contiguous;
ranks: [S, P] int32; scales: [S, P] float32; offsets: [P+1] int64; token_slots: [T] int64.
Accumulation is float32. The kernel groups tokens by slot, so each adapter's weights are
read once per call, and reads only the first r rows of A and Bt (``csrc/lora_sgmv.cpp``).

``lora_sgmv_q8(x, a, a_scale, bt, bt_scale, ranks, scales, offsets, token_slots)`` is the
same with int8 A and Bt (a quarter of float32's bytes, half of bfloat16's): a_scale [S, P, R]
float32 scales each A row, bt_scale [S, out] float32 each Bt column of a slot, so the
delta is ``scales * ((x @ (a * a_scale).T) @ bt) * bt_scale``, computed on the int8 values
and scaled after each sum (x and the result float32 or bfloat16).

Built on first ``load()`` like every fleetlm kernel (see ``fleetlm.kernels._build``);
``FLEETLM_LORA_KERNEL=0`` disables it, and a failed build logs one warning and returns
False. Callers (``fleetlm.engine.lora.lora_delta``) then use the pure-PyTorch path. This
module knows nothing about adapters or slots beyond the tensors it is given.

The library is built without ``-march=native`` and holds AVX-512 (with AVX512_BF16
rounding when the CPU has it), AVX2+FMA, NEON (aarch64) and scalar micro-kernels; the
best one this CPU supports is picked at run time (``FLEETLM_CPU_ISA`` or
``fleetlm.kernels.cpu.set_kernel_isa`` force another; ``fleetlm::lora_sgmv_isa()`` reports
the one in use -- see ``fleetlm.kernels.cpu``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fleetlm.kernels._build import CSRC, NativeKernel

ENV_VAR = "FLEETLM_LORA_KERNEL"
OP = "fleetlm::lora_sgmv"
OP_Q8 = "fleetlm::lora_sgmv_q8"


def _check_shapes(op: str, x: Tensor, a: Tensor, bt: Tensor, token_slots: Tensor) -> None:
    torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D [T, in], got {x.dim()}-D")
    torch._check(a.dim() == 4, lambda: f"{op}: a must be 4-D [S, P, R, in], got {a.dim()}-D")
    torch._check(bt.dim() == 3, lambda: f"{op}: bt must be 3-D [S, R, out], got {bt.dim()}-D")
    torch._check(x.dtype in (torch.float32, torch.bfloat16),
                 lambda: f"{op}: x must be float32 or bfloat16, got {x.dtype}")
    torch._check(x.shape[1] == a.shape[3],
                 lambda: f"{op}: x has {x.shape[1]} features but a is {tuple(a.shape)}")
    torch._check(token_slots.dim() == 1 and token_slots.shape[0] == x.shape[0],
                 lambda: f"{op}: token_slots must be [T] = [{x.shape[0]}]")


def _fake_lora_sgmv(x: Tensor, a: Tensor, bt: Tensor, ranks: Tensor, scales: Tensor,
                    offsets: Tensor, token_slots: Tensor) -> Tensor:
    _check_shapes(OP, x, a, bt, token_slots)
    torch._check(a.dtype == x.dtype and bt.dtype == x.dtype,
                 lambda: f"{OP}: a and bt must have x's dtype ({x.dtype}), got {a.dtype}, {bt.dtype}")
    return x.new_empty((x.shape[0], bt.shape[2]))


def _fake_lora_sgmv_q8(x: Tensor, a: Tensor, a_scale: Tensor, bt: Tensor, bt_scale: Tensor,
                       ranks: Tensor, scales: Tensor, offsets: Tensor,
                       token_slots: Tensor) -> Tensor:
    _check_shapes(OP_Q8, x, a, bt, token_slots)
    torch._check(a.dtype == torch.int8 and bt.dtype == torch.int8,
                 lambda: f"{OP_Q8}: a and bt must be int8, got {a.dtype}, {bt.dtype}")
    torch._check(a_scale.dtype == torch.float32 and bt_scale.dtype == torch.float32,
                 lambda: f"{OP_Q8}: a_scale and bt_scale must be float32")
    return x.new_empty((x.shape[0], bt.shape[2]))


def _register_fake() -> None:
    torch.library.register_fake(OP)(_fake_lora_sgmv)
    torch.library.register_fake(OP_Q8)(_fake_lora_sgmv_q8)


_kernel = NativeKernel("fleetlm_lora_sgmv", CSRC / "lora_sgmv.cpp", ENV_VAR, _register_fake,
                       fallback="the PyTorch multi-LoRA path")


def load() -> bool:
    """Build/load the kernel once per process; True when ``fleetlm::lora_sgmv`` is usable."""
    return _kernel.load()


def is_loaded() -> bool:
    """True when ``load()`` has already succeeded (never triggers a build)."""
    return _kernel.is_loaded()


def lora_sgmv(x: Tensor, a: Tensor, bt: Tensor, ranks: Tensor, scales: Tensor,
              offsets: Tensor, token_slots: Tensor) -> Tensor:
    """delta [T, out] in x's dtype (see the module docstring); call ``load()`` first."""
    return torch.ops.fleetlm.lora_sgmv(x, a, bt, ranks, scales, offsets, token_slots)


def lora_sgmv_q8(x: Tensor, a: Tensor, a_scale: Tensor, bt: Tensor, bt_scale: Tensor,
                 ranks: Tensor, scales: Tensor, offsets: Tensor, token_slots: Tensor) -> Tensor:
    """delta [T, out] for int8 A and Bt (see the module docstring); call ``load()`` first."""
    return torch.ops.fleetlm.lora_sgmv_q8(x, a, a_scale, bt, bt_scale, ranks, scales, offsets,
                                          token_slots)
