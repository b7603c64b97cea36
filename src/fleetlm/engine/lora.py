"""Multi-LoRA deltas for a packed batch where every token may use a different adapter.

For a projection ``y = x W^T`` and the adapter ``i`` of each token, LoRA adds
``scale_i * (x A_i^T) B_i^T``. Adapters of different ranks share stacked buffers padded
with zeros to the largest rank (zero rows/columns add exactly nothing), so one batch can
mix ranks. Which adapter each token uses arrives as an explicit :class:`LoraBatch` --
never through module state -- built once per forward and shared by every projection.

Two batched implementations and their slow, obviously correct twin:

- :func:`lora_delta_segments` (SGMV-style): tokens grouped by adapter, two small GEMMs
  per adapter present in the batch. Reads each adapter's weights once.
- :func:`lora_delta_gather` (BGMV-style): every token gathers its adapter's A and B and
  does batched matrix-vector products. One kernel for any mix, but it copies r*(in+out)
  weights per token.
- :func:`lora_delta_reference`: a per-token Python loop, used by the tests.

:func:`lora_delta` picks between the batched ones (see ``GATHER_MAX_TOKENS``).
This module knows nothing about which adapter is loaded where; the adapter store does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

NO_ADAPTER = -1
# Gather wins only for small batches spread over many adapters; see lora_delta.
GATHER_MAX_TOKENS = 32


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoraBatch:
    """Adapter assignment of a packed batch of T tokens (the same for every projection).

    token_slots: [T] int64, the stacked-buffer slot of each token's adapter, or -1.
    order:       [T'] int64, indices of the tokens that have an adapter, grouped by slot.
    segments:    (slot, start, end) into ``order`` for each adapter present.
    """

    token_slots: Tensor
    order: Tensor
    segments: tuple[tuple[int, int, int], ...]

    @classmethod
    def from_slots(cls, token_slots: Tensor) -> LoraBatch:
        token_slots = token_slots.to(torch.long)
        has = (token_slots != NO_ADAPTER).nonzero().flatten()
        slots = token_slots[has]
        perm = torch.argsort(slots, stable=True)
        order = has[perm]
        uniq, counts = torch.unique_consecutive(slots[perm], return_counts=True)
        segments, start = [], 0
        for s, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            segments.append((int(s), start, start + int(c)))
            start += int(c)
        return cls(token_slots, order, tuple(segments))

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.shape[0])

    @property
    def empty(self) -> bool:
        return not self.segments


@dataclass
class StackedLora:
    """One projection's adapters: slot s holds A [r_max, in], B [out, r_max], scale."""

    a: Tensor  # [S, r_max, in]
    b: Tensor  # [S, out, r_max]
    scale: Tensor  # [S] float32 (0 for an empty slot)

    @classmethod
    def allocate(cls, num_slots: int, max_rank: int, in_features: int, out_features: int,
                 dtype: torch.dtype = torch.float32) -> StackedLora:
        return cls(torch.zeros(num_slots, max_rank, in_features, dtype=dtype),
                   torch.zeros(num_slots, out_features, max_rank, dtype=dtype),
                   torch.zeros(num_slots, dtype=torch.float32))

    def set(self, slot: int, a: Tensor, b: Tensor, scale: float) -> None:
        """Write an adapter (A [r, in], B [out, r]) into ``slot``, zero-padding to r_max."""
        r = a.shape[0]
        if r > self.a.shape[1] or b.shape[1] != r:
            raise ValueError(f"rank {r} (B has {b.shape[1]}) exceeds max_rank {self.a.shape[1]}")
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :r] = a.to(self.a.dtype)
        self.b[slot, :, :r] = b.to(self.b.dtype)
        self.scale[slot] = scale

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.scale[slot] = 0.0


def lora_delta_reference(x: Tensor, lora: StackedLora, batch: LoraBatch) -> Tensor:
    """Per-token loop: delta[t] = scale_s * (x[t] A_s^T) B_s^T for the token's slot s."""
    out = torch.zeros(x.shape[0], lora.b.shape[1], dtype=x.dtype)
    for t, s in enumerate(batch.token_slots.tolist()):
        if s == NO_ADAPTER:
            continue
        xa = x[t].float() @ lora.a[s].float().T
        out[t] = (float(lora.scale[s]) * (xa @ lora.b[s].float().T)).to(x.dtype)
    return out


def lora_delta_segments(x: Tensor, lora: StackedLora, batch: LoraBatch) -> Tensor:
    """SGMV-style: for each adapter present, two GEMMs over its tokens."""
    out = x.new_zeros(x.shape[0], lora.b.shape[1])
    for slot, start, end in batch.segments:
        idx = batch.order[start:end]
        xa = x.index_select(0, idx) @ lora.a[slot].T  # [n, r]
        delta = (xa @ lora.b[slot].T) * lora.scale[slot].to(x.dtype)
        out.index_copy_(0, idx, delta)
    return out


def lora_delta_gather(x: Tensor, lora: StackedLora, batch: LoraBatch) -> Tensor:
    """BGMV-style: gather each token's A and B, batched matrix-vector products."""
    slots = batch.token_slots.clamp(min=0)
    keep = (batch.token_slots != NO_ADAPTER).to(x.dtype)
    xa = torch.bmm(x[:, None, :], lora.a[slots].transpose(1, 2))  # [T, 1, r]
    delta = torch.bmm(xa, lora.b[slots].transpose(1, 2))[:, 0]  # [T, out]
    return delta * (lora.scale[slots].to(x.dtype) * keep)[:, None]


def lora_delta(x: Tensor, lora: StackedLora, batch: LoraBatch) -> Tensor:
    """Batched delta [T, out] for x [T, in]; picks the faster implementation.

    Measured on the development CPU (one 576->3072 rank-16 projection, 256 slots):
    segments read each adapter's weights once and win whenever tokens share adapters
    (T=32 over 1 adapter: 128 us vs 639 us gathered, bf16) and for prefill (T=512: 0.8 ms
    vs 21 ms); gathering wins when a small batch is spread over as many adapters as
    tokens (T=32 over 32: 664 us vs 2161 us, bf16), because it is one kernel instead of
    two small GEMMs per adapter.
    """
    n = batch.num_tokens
    if n <= GATHER_MAX_TOKENS and 2 * len(batch.segments) > n:
        return lora_delta_gather(x, lora, batch)
    return lora_delta_segments(x, lora, batch)
