"""The LoRA hook the forward pass calls: what a multi-LoRA batch must offer the model.

:class:`~fleetlm.models.llama.LlamaForCausalLM` takes an optional ``lora=`` argument; each
decoder layer ``i`` gets ``lora.layer(i)`` and, after each LoRA-capable projection, adds
``hook.delta(projection, x)`` to that projection's output. The projection names are ours
(fused): ``self_attn.qkv_proj``, ``self_attn.o_proj``, ``mlp.gate_up_proj``,
``mlp.down_proj``. A layer sees only its own hook (not its index), so one compiled layer
graph serves every layer.

This module knows only the shape of the call. Which adapter each token uses, where the
adapters' weights live and how the delta is computed are the engine's business
(:class:`fleetlm.engine.multi_lora.LoraContext` satisfies this protocol).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class LayerLoraHook(Protocol):
    """One decoder layer's per-token LoRA deltas."""

    def delta(self, projection: str, x: Tensor) -> Tensor:
        """The delta [B, S, out] to add to ``projection``'s output, for that projection's
        input x [B, S, in]."""
        ...


class LoraHook(Protocol):
    """Per-token LoRA deltas for one forward of B*S tokens (row-major, [B, S] flattened)."""

    def layer(self, index: int) -> LayerLoraHook:
        """The hook of decoder layer ``index``."""
        ...
