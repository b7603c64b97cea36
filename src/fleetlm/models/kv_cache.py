"""Preallocated key/value cache: one [slots, kv_heads, max_len, head_dim] tensor per layer,
and the length buckets the forward's ``kv_len`` is rounded up to.

A *slot* holds one sequence's keys and values for its whole life; the cache never
reallocates, so every decode step works on the same storage (static shapes for
``torch.compile``, no allocator churn). Layout puts heads before positions so a
batch's slice ``k[slots, :, :kv_len]`` is directly the [B, Hkv, L, D] operand
attention wants. Attention reads only the first ``kv_len`` positions; callers round
``kv_len`` (and cache lengths) up with :func:`bucket` so a compiled step sees few
distinct shapes.

This module holds storage and its arithmetic only; which sequence owns which slot is
the scheduler's business, and the model (:mod:`fleetlm.models.llama`) decides what is
written where.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Cache lengths and kv_len are multiples of this in single-stream generation (one compiled
# decode graph per bucket) and for the batching runner's cache rows.
KV_BUCKET = 256


def max_kv_len(model: Any, cap: int) -> int:
    """The longest KV row (a multiple of KV_BUCKET, at most ``cap``) the rotary table
    ``model`` was loaded with allows: the engine needs one position past it."""
    positions = int(model.rope_cos.shape[0])
    return min(cap, (positions - 1) // KV_BUCKET * KV_BUCKET)


def bucket(n: int, size: int = KV_BUCKET) -> int:
    """``n`` rounded up to a multiple of ``size``."""
    return -(-n // size) * size


@dataclass
class KVCache:
    k: list[Tensor]  # per layer [num_slots, num_kv_heads, max_len, head_dim]
    v: list[Tensor]

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(k, v)

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
