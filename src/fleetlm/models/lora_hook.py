"""The LoRA hook the forward pass calls: what a multi-LoRA batch must offer the model.

:class:`~fleetlm.models.llama.LlamaForCausalLM` takes an optional ``lora=`` argument and,
after each LoRA-capable projection, adds ``lora.delta(layer, projection, x)`` to that
projection's output. The projection names are ours (fused): ``self_attn.qkv_proj``,
``self_attn.o_proj``, ``mlp.gate_up_proj``, ``mlp.down_proj``.

This module knows only the shape of the call. Which adapter each token uses, where the
adapters' weights live and how the delta is computed are the engine's business
(:class:`fleetlm.engine.multi_lora.LoraContext` satisfies this protocol).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class LoraHook(Protocol):
    """Per-token LoRA deltas for one forward of B*S tokens (row-major, [B, S] flattened)."""

    def delta(self, layer: int, projection: str, x: Tensor) -> Tensor:
        """The delta [B, S, out] to add to ``projection``'s output in decoder layer
        ``layer``, for that projection's input x [B, S, in]."""
        ...
