"""The engine's hot adapters: stacked LoRA buffers for every fused projection of every layer.

Slot ``s`` of every :class:`~fleetlm.engine.lora.StackedLora` holds the same adapter.
The scheduler decides which adapter sits in which slot; this module only copies an
adapter's tensors in (mapping Hugging Face module names such as
``model.layers.3.self_attn.k_proj`` onto part 1 of our fused ``qkv_proj``) and hands the
forward pass a :class:`LoraContext` -- the batch's per-token slots plus these buffers --
as an explicit argument (it satisfies the model's
:class:`~fleetlm.models.lora_hook.LoraHook`). Buffers are allocated once, at engine start, so loading an
adapter never allocates and the hot tier's memory is known up front.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from fleetlm.engine.lora import LoraBatch, StackedLora, lora_delta
from fleetlm.models.config import LlamaConfig
from fleetlm.models.llama import FUSED_PROJECTIONS, fused_rows

# our projection -> the Hugging Face projections it stacks, in order
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": FUSED_PROJECTIONS["self_attn.qkv_proj"],
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": FUSED_PROJECTIONS["mlp.gate_up_proj"],
    "mlp.down_proj": ("mlp.down_proj",),
}


class _LoraModule(Protocol):
    a: Tensor  # [r, in]
    b: Tensor  # [out, r]
    scale: float


class _Adapter(Protocol):
    name: str
    modules: Mapping[str, Any]  # HF module name -> _LoraModule


def projection_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, tuple[int, ...]]]:
    """(in_features, output rows of each part) of each LoRA-capable projection."""
    rows = fused_rows(cfg)
    return {
        "self_attn.qkv_proj": (cfg.hidden_size, rows["self_attn.qkv_proj"]),
        "self_attn.o_proj": (cfg.q_size, (cfg.hidden_size,)),
        "mlp.gate_up_proj": (cfg.hidden_size, rows["mlp.gate_up_proj"]),
        "mlp.down_proj": (cfg.intermediate_size, (cfg.hidden_size,)),
    }


@dataclass(frozen=True)
class LoraContext:
    """Multi-LoRA input of one forward: which slot each token uses, and the buffers.

    batch:  per-token slots of the B*S tokens of the forward, row-major ([B, S] flattened)
    layers: per layer, our projection name -> its stacked buffers
    """

    batch: LoraBatch
    layers: Sequence[Mapping[str, StackedLora]]

    def delta(self, layer: int, projection: str, x: Tensor) -> Tensor:
        """LoRA output [..., out] to add to ``projection``'s output for x [..., in]."""
        return lora_delta(x, self.layers[layer][projection], self.batch)

    def layer(self, index: int) -> LayerLora:
        """Decoder layer ``index``'s view: the same batch, that layer's buffers."""
        return LayerLora(self.batch, self.layers[index])


@dataclass(frozen=True)
class LayerLora:
    """One layer's multi-LoRA input (what :class:`LoraContext.layer` hands the model)."""

    batch: LoraBatch
    buffers: Mapping[str, StackedLora]

    def delta(self, projection: str, x: Tensor) -> Tensor:
        return lora_delta(x, self.buffers[projection], self.batch)


class MultiLoraBuffers:
    def __init__(self, cfg: LlamaConfig, num_slots: int, max_rank: int, dtype: torch.dtype) -> None:
        self.config = cfg
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype
        shapes = projection_shapes(cfg)
        self.layers: list[dict[str, StackedLora]] = [
            {
                name: StackedLora.allocate(num_slots, max_rank, in_f, parts, dtype)
                for name, (in_f, parts) in shapes.items()
            }
            for _ in range(cfg.num_layers)
        ]
        self.slot_adapter: list[str | None] = [None] * num_slots

    def nbytes(self) -> int:
        return sum(s.nbytes() for layer in self.layers for s in layer.values())

    def load(self, slot: int, adapter: _Adapter) -> None:
        """Copy ``adapter`` into ``slot`` of every projection (projections it does not
        target get rank 0 there)."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} outside [0, {self.num_slots})")
        mods = adapter.modules
        for i, layer in enumerate(self.layers):
            for proj, stacked in layer.items():
                parts = []
                for hf in PROJECTIONS[proj]:
                    m = mods.get(f"model.layers.{i}.{hf}")
                    parts.append(None if m is None else (m.a, m.b, float(m.scale)))
                stacked.set(slot, parts)
        self.slot_adapter[slot] = adapter.name

    def clear(self, slot: int) -> None:
        for layer in self.layers:
            for stacked in layer.values():
                stacked.clear(slot)
        self.slot_adapter[slot] = None

    def context(self, token_slots: Tensor) -> LoraContext:
        """The forward's LoRA input for per-token slots [T] (-1: no adapter)."""
        return LoraContext(LoraBatch.from_slots(token_slots), self.layers)
