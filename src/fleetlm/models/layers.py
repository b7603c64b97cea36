"""Building blocks shared by model families: projections, RMSNorm, rotary embeddings.

The projections are our own modules (not ``nn.Linear``) because the serving engine
swaps their weights for int8 or 4-bit (``Int8Linear``, ``Int4Linear``) and, later, adds per-token LoRA deltas to their output.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Linear(nn.Module):
    """``y = x W^T (+ b)`` over the last dim; weight is [out, in] as in Hugging Face."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


PREFILL_ROWS = 64  # from this many rows on, Int8Linear/Int4Linear dequantise and use a dense GEMM


def keep_prefill_weights() -> bool:
    """Whether quantised projections keep the float weight they dequantise for prefill.

    Prefill (64+ rows) runs the dense GEMM on the dequantised weight; dequantising every
    projection for every chunk took ~6 ms a layer on SmolLM2-135M (2 cores), more than the
    GEMM itself, and more than doubled the time to first token against float32. Kept, the
    float copy costs its bytes in RAM (4 per weight in float32: ~420 MB for SmolLM2-135M's
    projections) while decoding still reads the quantised weight.
    ``FLEETLM_PREFILL_WEIGHTS=dequantize`` trades that memory back for the slower prefill.
    """
    return os.environ.get("FLEETLM_PREFILL_WEIGHTS", "keep").strip().lower() != "dequantize"


class _PrefillWeight:
    """The float weight a quantised projection's prefill uses: made on first use (in the
    activations' dtype), then kept unless :func:`keep_prefill_weights` says otherwise."""

    def __init__(self) -> None:
        self.weight: Tensor | None = None

    def get(self, dtype: torch.dtype, make: Callable[[torch.dtype], Tensor]) -> Tensor:
        if torch.compiler.is_compiling():
            return make(dtype)  # a traced graph never keeps state of its own
        w = self.weight
        if w is not None and w.dtype == dtype:
            return w
        w = make(dtype)
        self.weight = w if keep_prefill_weights() else None
        return w


class Int8Linear(nn.Module):
    """Weight-only int8 projection: symmetric per-output-channel scales.

    The weight stays 1 byte/element in memory and in memory bandwidth -- the thing that
    bounds single-stream decode on a CPU. Few rows (decode): our AVX-512 GEMV op
    ``fleetlm::int8_linear`` when it built, else ``torch._weight_int8pack_mm``; both
    widen the int8 weight inside the kernel. Many rows (prefill): dequantise once and run
    the dense GEMM.
    """

    weight: Tensor  # [out, in] int8
    scales: Tensor  # [out]
    bias: Tensor | None

    def __init__(self, weight_int8: Tensor, scales: Tensor, bias: Tensor | None,
                 use_kernel: bool = False) -> None:
        super().__init__()
        self.in_features = weight_int8.shape[1]
        self.out_features = weight_int8.shape[0]
        # our AVX-512 GEMV (fleetlm.kernels.int8_gemv) when it built, else ATen's kernel
        self.use_kernel = use_kernel and weight_int8.device.type == "cpu" and scales.dtype in (
            torch.float32, torch.bfloat16)
        self.register_buffer("weight", weight_int8)
        self.register_buffer("scales", scales)  # activation dtype
        self.register_buffer("bias", bias)
        self._prefill = _PrefillWeight()

    @classmethod
    def from_linear(cls, lin: Linear, dtype: torch.dtype, use_kernel: bool = False) -> Int8Linear:
        w = lin.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if lin.bias is None else lin.bias.detach().to(dtype)
        return cls(q.contiguous(), scales.to(dtype), bias, use_kernel)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] >= PREFILL_ROWS:
            # many rows (prefill): the dense GEMM on the dequantised weight, which is far
            # faster than the small-M int8 kernel at this size; decode reads the int8 one
            w = self._prefill.get(x.dtype, lambda t: self.weight.to(t) * self.scales[:, None].to(t))
            y = F.linear(x2, w)
        elif self.use_kernel and x2.dtype == self.scales.dtype:
            y = torch.ops.fleetlm.int8_linear(x2, self.weight, self.scales)
        else:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Weight-only 4-bit group-wise projection (``fleetlm.kernels.int4_gemv`` format).

    ``W[n, k] = q * scales[n, k // G] + mins[n, k // G]`` with 4-bit codes ``q`` packed two
    per byte (``packed`` [out, in/2] uint8) and float32 ``scales`` / ``mins`` [out, in/G]:
    0.75 byte per weight at G = 32. Few rows (decode): ``fleetlm::int4_linear``, which
    unpacks each weight once per step for all rows; without the kernel, and for many rows
    (prefill, >= PREFILL_ROWS), the weight is dequantised and multiplied with ``F.linear``.
    """

    packed: Tensor  # [out, in / 2] uint8
    scales: Tensor  # [out, in / group_size] float32
    mins: Tensor  # [out, in / group_size] float32
    bias: Tensor | None

    def __init__(self, packed: Tensor, scales: Tensor, mins: Tensor, group_size: int,
                 bias: Tensor | None, use_kernel: bool = False) -> None:
        super().__init__()
        self.in_features = packed.shape[1] * 2
        self.out_features = packed.shape[0]
        self.group_size = group_size
        self.use_kernel = use_kernel and packed.device.type == "cpu"
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.register_buffer("bias", bias)
        self._prefill = _PrefillWeight()

    @classmethod
    def from_linear(cls, lin: Linear, dtype: torch.dtype, use_kernel: bool = False,
                    group_size: int = 32) -> Int4Linear:
        """Quantise ``lin``'s weight (ValueError when in_features % group_size != 0)."""
        from fleetlm.kernels.int4_gemv import quantize

        packed, scales, mins = quantize(lin.weight, group_size)
        bias = None if lin.bias is None else lin.bias.detach().to(dtype)
        return cls(packed, scales, mins, group_size, bias, use_kernel)

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The float weight [out, in] this module stands for."""
        from fleetlm.kernels.int4_gemv import dequantize

        return dequantize(self.packed, self.scales, self.mins, self.group_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.use_kernel and x2.shape[0] < PREFILL_ROWS and x2.dtype in (
                torch.float32, torch.bfloat16):
            y = torch.ops.fleetlm.int4_linear(x2, self.packed, self.scales, self.mins,
                                              self.group_size)
        else:
            y = F.linear(x2, self._prefill.get(x.dtype, self.dequantized))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back before the weight (as Llama does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> Tensor:
    """Inverse frequencies [head_dim/2], with linear or llama3 scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: Tensor, max_positions: int) -> tuple[Tensor, Tensor]:
    """cos, sin tables [max_positions, head_dim] in float32 (halves duplicated)."""
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., S, H, D]; cos/sin [..., S, 1, D] -- rotate-half convention of HF weights."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
