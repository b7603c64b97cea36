"""Multi-LoRA deltas for a packed batch where every token may use a different adapter.

For a projection ``y = x W^T`` and the adapter of each token, LoRA adds
``scale * (x A^T) B^T``. Our projections are fused -- ``qkv_proj`` is q|k|v stacked along
the output rows (3 parts), ``gate_up_proj`` gate|up (2), ``o_proj``/``down_proj`` one --
and each part has its own A/B, rank and scale (an adapter may leave a part out: rank 0).
A :class:`StackedLora` holds one fused projection of one layer for S hot adapter slots;
which slot each token uses arrives as an explicit :class:`LoraBatch`, built once per
forward and shared by every projection -- never through module state.

Implementations of the same delta, fastest first:

- the native op ``fleetlm::lora_sgmv`` (:mod:`fleetlm.kernels.lora_sgmv`): groups tokens
  by slot inside the kernel, reads each adapter's first-r rows once, both threads;
- :func:`lora_delta_torch`: tokens grouped by slot, two matmuls per part per adapter
  present -- the fallback, and the faster path for prefill-sized batches (see
  :func:`lora_delta`);
- :func:`lora_delta_reference`: a per-token Python loop, obviously correct, for tests.

This module knows nothing about which adapter is loaded where (the adapter store does)
nor about PEFT files; it only owns the stacked layout and the arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from fleetlm.kernels import lora_sgmv

NO_ADAPTER = -1
# From this many tokens of one adapter on, torch's GEMM beats the native kernel on
# shrink-heavy projections (see lora_delta for the measurements).
TORCH_MIN_TOKENS = 1024


@dataclass(frozen=True, eq=False)  # eq on tensors would be elementwise; identity is enough
class LoraBatch:
    """Adapter assignment of a packed batch of T tokens (the same for every projection).

    token_slots: [T] int64, the stacked-buffer slot of each token's adapter, or NO_ADAPTER;
                 tokens in the row-major order of the activations ([B, S] -> B * S).
    The grouping the torch path needs (``order``, ``segments``) is computed on first use,
    so a batch served by the native kernel never pays for it.
    """

    token_slots: Tensor

    @classmethod
    def from_slots(cls, token_slots: Tensor | Sequence[int]) -> LoraBatch:
        slots = torch.as_tensor(token_slots)
        if slots.numel() == 0:
            slots = slots.to(torch.long)
        if slots.is_floating_point() or slots.is_complex() or slots.dtype == torch.bool:
            raise ValueError(f"token_slots must be integer slot ids, got dtype {slots.dtype}")
        return cls(slots.reshape(-1).to(torch.long).contiguous())

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.shape[0])

    @cached_property
    def _grouping(self) -> tuple[Tensor, tuple[tuple[int, int, int], ...]]:
        has = (self.token_slots != NO_ADAPTER).nonzero().flatten()
        slots = self.token_slots[has]
        perm = torch.argsort(slots, stable=True)
        uniq, counts = torch.unique_consecutive(slots[perm], return_counts=True)
        segments, start = [], 0
        for s, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            segments.append((int(s), start, start + int(c)))
            start += int(c)
        return has[perm], tuple(segments)

    @property
    def order(self) -> Tensor:
        """[T'] int64: indices of the tokens that have an adapter, grouped by slot."""
        return self._grouping[0]

    @property
    def segments(self) -> tuple[tuple[int, int, int], ...]:
        """(slot, start, end) into ``order`` for each adapter present, in slot order."""
        return self._grouping[1]

    @property
    def empty(self) -> bool:
        return not self.segments


@dataclass
class StackedLora:
    """One fused projection of one layer: P parts for S hot adapter slots.

    Only the first ``ranks[s, p]`` rows of A and of Bt are ever read; the rest is kept
    zero by :meth:`set`/:meth:`clear`. No padding in the out dimension: a slot costs
    R * (P * in + out_total) elements.

    int8 buffers (``allocate(..., dtype=torch.int8)``) hold each A row and each Bt column
    of a slot quantised symmetrically (round to nearest, [-127, 127]) with its own float32
    scale: A row k of part p is ``a[s, p, k] * a_scale[s, p, k]``, Bt column c is
    ``bt[s, :, c] * bt_scale[s, c]`` (see :meth:`dequantized`).
    """

    a: Tensor  # [S, P, R, in]      A of part p of slot s in a[s, p, :r]
    bt: Tensor  # [S, R, out_total]  B transposed; part p's columns [offsets[p], offsets[p+1])
    ranks: Tensor  # [S, P] int32       rank of part p in slot s (0: part absent / empty slot)
    scales: Tensor  # [S, P] float32
    offsets: Tensor  # [P+1] int64, offsets[-1] == out_total
    a_scale: Tensor | None = None  # [S, P, R] float32, int8 buffers only
    bt_scale: Tensor | None = None  # [S, out_total] float32, int8 buffers only

    @classmethod
    def allocate(cls, num_slots: int, max_rank: int, in_features: int,
                 part_sizes: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> StackedLora:
        problems = [f"{name} must be positive, got {v}" for name, v in
                    [("num_slots", num_slots), ("max_rank", max_rank),
                     ("in_features", in_features)] if v <= 0]
        if not part_sizes or any(n <= 0 for n in part_sizes):
            problems.append(f"part_sizes must be one or more positive sizes, got {part_sizes}")
        if problems:
            raise ValueError("StackedLora.allocate: " + "; ".join(problems))
        offsets = torch.tensor([0, *part_sizes], dtype=torch.long).cumsum(0)
        p, out = len(part_sizes), int(offsets[-1])
        q8 = dtype == torch.int8
        return cls(
            a=torch.zeros(num_slots, p, max_rank, in_features, dtype=dtype, device=device),
            bt=torch.zeros(num_slots, max_rank, out, dtype=dtype, device=device),
            ranks=torch.zeros(num_slots, p, dtype=torch.int32, device=device),
            scales=torch.zeros(num_slots, p, dtype=torch.float32, device=device),
            offsets=offsets.to(device),
            a_scale=(torch.zeros(num_slots, p, max_rank, dtype=torch.float32, device=device)
                     if q8 else None),
            bt_scale=torch.zeros(num_slots, out, dtype=torch.float32, device=device) if q8 else None,
        )

    @property
    def quantized(self) -> bool:
        """int8 buffers with per-row (A) and per-column (Bt) scales."""
        return self.a_scale is not None

    @property
    def num_slots(self) -> int:
        return int(self.a.shape[0])

    @property
    def num_parts(self) -> int:
        return int(self.a.shape[1])

    @property
    def max_rank(self) -> int:
        return int(self.a.shape[2])

    @property
    def in_features(self) -> int:
        return int(self.a.shape[3])

    @property
    def out_features(self) -> int:
        return int(self.bt.shape[2])

    @property
    def part_sizes(self) -> list[int]:
        return torch.diff(self.offsets).tolist()

    def set(self, slot: int, parts: Sequence[tuple[Tensor, Tensor, float] | None]) -> None:
        """Write one adapter into ``slot``: ``parts[p]`` = (A [r, in], B [out_p, r], scale),
        or None where the adapter leaves part p out. Everything else in the slot is zeroed,
        so nothing of the previous occupant survives. Nothing is written on error."""
        problems = []
        if not 0 <= slot < self.num_slots:
            problems.append(f"slot {slot} is outside [0, {self.num_slots})")
        if len(parts) != self.num_parts:
            problems.append(f"got {len(parts)} parts, this projection has {self.num_parts} "
                            f"(sizes {self.part_sizes}); pass None for a part the adapter lacks")
        for p, (part, out_p) in enumerate(zip(parts, self.part_sizes, strict=False)):
            if part is None:
                continue
            a, b, _ = part
            if a.dim() != 2 or a.shape[1] != self.in_features:
                problems.append(f"part {p}: A must be [r, {self.in_features}], got {tuple(a.shape)}")
            elif a.shape[0] > self.max_rank:
                problems.append(f"part {p}: rank {a.shape[0]} exceeds max_rank {self.max_rank}; "
                                f"allocate the stack with a larger max_rank")
            if b.dim() != 2 or b.shape[0] != out_p or (a.dim() == 2 and b.shape[1] != a.shape[0]):
                problems.append(f"part {p}: B must be [{out_p}, r] with r = A.shape[0] = "
                                f"{a.shape[0] if a.dim() == 2 else '?'}, got {tuple(b.shape)}")
        if problems:
            raise ValueError(f"StackedLora.set: {'; '.join(problems)}")
        self.clear(slot)
        offsets = self.offsets.tolist()
        for p, part in enumerate(parts):
            if part is None or part[0].shape[0] == 0:
                continue
            a, b, scale = part
            r = a.shape[0]
            cols = slice(offsets[p], offsets[p + 1])
            if self.a_scale is not None and self.bt_scale is not None:
                self.a[slot, p, :r], self.a_scale[slot, p, :r] = quantize_rows(a)
                b_q, self.bt_scale[slot, cols] = quantize_rows(b)  # B's rows: Bt's columns
                self.bt[slot, :r, cols] = b_q.T
            else:
                self.a[slot, p, :r] = a.to(self.a.dtype)
                self.bt[slot, :r, cols] = b.T.to(self.bt.dtype)
            self.ranks[slot, p] = r
            self.scales[slot, p] = float(scale)

    def clear(self, slot: int) -> None:
        for t in (self.a, self.bt, self.ranks, self.scales, self.a_scale, self.bt_scale):
            if t is not None:
                t[slot].zero_()

    def _tensors(self) -> tuple[Tensor, ...]:
        extra = () if self.a_scale is None or self.bt_scale is None else (self.a_scale, self.bt_scale)
        return (self.a, self.bt, self.ranks, self.scales, self.offsets, *extra)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def a_rows(self, slot: int, part: int, r: int) -> Tensor:
        """A of ``part`` in ``slot``, [r, in]: the buffer's rows, dequantised to float32
        for int8 buffers."""
        a = self.a[slot, part, :r]
        return a if self.a_scale is None else a.float() * self.a_scale[slot, part, :r, None]

    def bt_block(self, slot: int, r: int, c0: int, c1: int) -> Tensor:
        """Bt[slot, :r, c0:c1], dequantised to float32 for int8 buffers."""
        bt = self.bt[slot, :r, c0:c1]
        return bt if self.bt_scale is None else bt.float() * self.bt_scale[slot, c0:c1]

    def dequantized(self) -> StackedLora:
        """The same adapters in float32 buffers (what an int8 stack computes with)."""
        if self.a_scale is None or self.bt_scale is None:
            return StackedLora(self.a.float(), self.bt.float(), self.ranks, self.scales,
                               self.offsets)
        return StackedLora(self.a.float() * self.a_scale[..., None],
                           self.bt.float() * self.bt_scale[:, None, :], self.ranks,
                           self.scales, self.offsets)


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of w [n, k]: (q [n, k] int8, scale [n] float32) with
    w ~= q * scale[:, None], q = round(w / scale) in [-127, 127]; an all-zero row has
    scale 0."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
    return q.clamp_(-127, 127).to(torch.int8), scale


def lora_delta_reference(x: Tensor, lora: StackedLora, batch: LoraBatch) -> Tensor:
    """Per-token, per-part loop in float32 -> [..., out_total] in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.zeros(x2.shape[0], lora.out_features, dtype=torch.float32)
    offsets = lora.offsets.tolist()
    for t, s in enumerate(batch.token_slots.tolist()):
        if s == NO_ADAPTER:
            continue
        for p in range(lora.num_parts):
            r = int(lora.ranks[s, p])
            if r == 0:
                continue
            xa = x2[t].float() @ lora.a_rows(s, p, r).float().T  # [r]
            part = xa @ lora.bt_block(s, r, offsets[p], offsets[p + 1]).float()
            out[t, offsets[p]:offsets[p + 1]] = float(lora.scales[s, p]) * part
    return out.to(x.dtype).reshape(*x.shape[:-1], lora.out_features)


def lora_delta_torch(x: Tensor, lora: StackedLora, batch: LoraBatch) -> Tensor:
    """Pure PyTorch, x [T, in] -> [T, out_total]: per adapter present, per part, two
    matmuls over its tokens (each adapter's weights read once, first r rows only)."""
    out = x.new_zeros(x.shape[0], lora.out_features)
    if batch.empty:
        return out
    ranks, scales, offsets = lora.ranks.tolist(), lora.scales.tolist(), lora.offsets.tolist()
    whole = len(batch.segments) == 1 and batch.segments[0][2] == x.shape[0]
    for slot, start, end in batch.segments:
        idx = batch.order[start:end]
        xs = x if whole else x.index_select(0, idx)
        delta = out if whole else x.new_zeros(end - start, lora.out_features)
        for p in range(lora.num_parts):
            r = ranks[slot][p]
            if r == 0:
                continue
            xa = (xs @ lora.a_rows(slot, p, r).to(x.dtype).T) * scales[slot][p]  # [n, r]
            bt = lora.bt_block(slot, r, offsets[p], offsets[p + 1]).to(x.dtype)
            delta[:, offsets[p]:offsets[p + 1]] = xa @ bt
        if not whole:
            out.index_copy_(0, idx, delta)
    return out


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _use_kernel(x: Tensor, lora: StackedLora, batch: LoraBatch) -> bool:
    if not x.is_cpu or x.dtype not in _KERNEL_DTYPES:
        return False
    if torch.compiler.is_compiling():
        # never build, nor look at the batch's grouping, inside a traced graph: that would
        # bake one batch's adapter mix into it
        return lora_sgmv.is_loaded()
    if not lora_sgmv.load():
        return False
    n = x.shape[0]
    if n < TORCH_MIN_TOKENS or lora.a.shape[3] <= lora.bt.shape[2]:
        return True
    # one adapter for the whole (prefill) batch of a shrink-heavy projection: torch's GEMM
    segments = batch.segments
    return not (len(segments) == 1 and segments[0][2] - segments[0][1] == n)


def _bf16_under_f32(x: Tensor, lora: StackedLora) -> bool:
    """bfloat16 buffers under float32 activations (``EngineConfig.lora_dtype``)."""
    return x.dtype == torch.float32 and lora.a.dtype == torch.bfloat16


def _dtypes_fit(x: Tensor, lora: StackedLora) -> bool:
    if lora.quantized:
        return x.dtype in _KERNEL_DTYPES
    return x.dtype == lora.a.dtype or _bf16_under_f32(x, lora)


def _mismatch(x: Tensor, lora: StackedLora, batch: LoraBatch) -> ValueError:
    problems = []
    if x.shape[-1] != lora.in_features:
        problems.append(f"x has {x.shape[-1]} features, the adapters expect {lora.in_features}")
    tokens = x.numel() // max(1, x.shape[-1])
    if tokens != batch.num_tokens:
        problems.append(f"x has {tokens} tokens but the LoraBatch has {batch.num_tokens}")
    if not _dtypes_fit(x, lora):
        problems.append(f"x is {x.dtype} but the adapter buffers are {lora.a.dtype}; "
                        "allocate the StackedLora in the model's dtype (or bfloat16 under "
                        "float32, or int8 under either)")
    return ValueError("lora_delta: " + "; ".join(problems))


def lora_delta(x: Tensor, lora: StackedLora, batch: LoraBatch) -> Tensor:
    """Batched delta [..., out_total] for x [..., in] (tokens in row-major order).

    Uses ``fleetlm::lora_sgmv`` on CPU when it built (``FLEETLM_LORA_KERNEL=0`` disables
    it), else :func:`lora_delta_torch`. Under ``torch.compile`` the choice depends on
    nothing but whether the kernel is loaded, so one graph serves every adapter mix.

    The one case handed to torch even with the kernel loaded was decided by measurement
    (bf16, 2 threads, SmolLM2-135M shapes, R=16, 64 slots; median us per call, kernel /
    this module's torch path)::

        tokens/adapters      32/1     32/32      512/1     512/8     2048/1     2048/4
        qkv 576->3 parts   20/187   41/4595    198/295  208/1925    789/793   881/2015
        o 576->576         13/68    20/2131     92/113   98/753     356/352   393/989
        gate_up 576->2x    25/146   74/4302    324/469  332/1935  1327/1553  1336/3787
        down 1536->576     17/75    29/2237    153/146  164/818     660/458   683/1328

    The kernel's dot-product shrink is its weaker half, and torch pays per adapter segment:
    torch wins only when one adapter covers a prefill batch of at least TORCH_MIN_TOKENS
    tokens and the projection is shrink-heavy (in > out, i.e. down_proj: 260 vs 323 us at
    1024 tokens, 458 vs 660 at 2048).

    bfloat16 buffers under float32 activations (``EngineConfig.lora_dtype``: half the
    memory and the bytes a step reads per adapter) compute in bfloat16: x is rounded to
    bfloat16 for the delta alone, and the delta comes back as float32.

    int8 buffers (``lora_dtype="int8"``: half bfloat16's bytes) serve float32 and bfloat16
    activations alike through ``fleetlm::lora_sgmv_q8``; the torch path dequantises.
    """
    shape = x.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])
    mixed = _bf16_under_f32(x, lora)
    if (shape[-1] != lora.a.shape[3] or x2.shape[0] != batch.token_slots.shape[0]
            or not _dtypes_fit(x, lora)):
        raise _mismatch(x, lora, batch)
    if mixed:
        x2 = x2.to(torch.bfloat16)
    if _use_kernel(x2, lora, batch):
        if lora.a_scale is not None and lora.bt_scale is not None:
            out = torch.ops.fleetlm.lora_sgmv_q8(x2, lora.a, lora.a_scale, lora.bt,
                                                 lora.bt_scale, lora.ranks, lora.scales,
                                                 lora.offsets, batch.token_slots)
        else:
            out = torch.ops.fleetlm.lora_sgmv(x2, lora.a, lora.bt, lora.ranks, lora.scales,
                                              lora.offsets, batch.token_slots)
    else:
        out = lora_delta_torch(x2, lora, batch)
    if mixed:
        out = out.to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*shape[:-1], out.shape[-1])
