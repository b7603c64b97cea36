"""One-row decode steps in one native call: ``fleetlm::decode_stack_int8``.

Single-stream decoding (one row, no adapters) of an int8 model runs the whole decoder
stack in C++ (``kernels/csrc/decode_stack.inc``): one OpenMP parallel region a step, the
threads splitting each projection's rows and the attention heads, instead of ~10 compiled
kernels and fork/joins a layer. The result matches the model's own forward (its slow twin,
compiled or eager) to float32 rounding; with bfloat16 weights it is more precise than the
eager model, which rounds to bfloat16 after every op.

Used when every projection of every layer is an :class:`~fleetlm.models.layers.Int8Linear`
on fleetlm's int8 kernel, the norms and scales have the activations' dtype (float32 or
bfloat16) and the KV cache too; anything else (4-bit weights, adapters, several rows, an
MLP bias) takes the usual path. ``FLEETLM_FUSED_DECODE=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fleetlm.models.kv_cache import KVCache

log = logging.getLogger(__name__)

ENV_VAR = "FLEETLM_FUSED_DECODE"
_FALSE = {"0", "false", "no", "off"}


def fused_decode_disabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() in _FALSE


# The model is a fleetlm.models.llama.LlamaForCausalLM (not imported: llama imports this
# module); its decoder layers are read by attribute.
def _layers(lm: Any) -> list[Any]:
    return list(lm.model.layers)


def _empty(dtype: torch.dtype) -> Tensor:
    return torch.empty(0, dtype=dtype)


class FusedDecode:
    """The weights of every layer, in ``decode_stack_int8``'s order, for one model."""

    def __init__(self, lm: Any, weights: list[Tensor]) -> None:
        cfg = lm.config
        self.weights = weights
        self.dtype = lm.dtype
        self.rope_cos = lm.rope_cos
        self.rope_sin = lm.rope_sin
        self.eps = float(cfg.rms_norm_eps)
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.window = cfg.sliding_window or 0

    @classmethod
    def build(cls, lm: Any) -> FusedDecode | None:
        """The fused step for ``lm``, or None (and why, at debug level) when it does not
        apply to this model."""
        why = cls._unsupported(lm)
        if why:
            log.debug("fused one-row decode not used: %s", why)
            return None
        from fleetlm.models.layers import Int8Linear

        dtype = lm.dtype
        weights: list[Tensor] = []
        for layer in _layers(lm):
            attn = layer.self_attn
            qkv, o = cast(Int8Linear, attn.qkv_proj), cast(Int8Linear, attn.o_proj)
            gu, down = cast(Int8Linear, layer.mlp.gate_up_proj), cast(Int8Linear, layer.mlp.down_proj)
            weights += [
                layer.input_layernorm.weight.detach(),
                qkv.weight, qkv.scales, qkv.bias if qkv.bias is not None else _empty(dtype),
                attn.q_norm.weight.detach() if attn.q_norm is not None else _empty(dtype),
                attn.k_norm.weight.detach() if attn.k_norm is not None else _empty(dtype),
                o.weight, o.scales,
                layer.post_attention_layernorm.weight.detach(),
                gu.weight, gu.scales, down.weight, down.scales,
            ]
        return cls(lm, weights)

    @staticmethod
    def _unsupported(lm: Any) -> str:
        from fleetlm.kernels import int8_gemv
        from fleetlm.models.layers import Int8Linear

        if fused_decode_disabled():
            return f"{ENV_VAR}=0"
        dtype = lm.dtype
        if dtype not in (torch.float32, torch.bfloat16):
            return f"dtype {dtype}"
        if lm.model.embed_tokens.weight.device.type != "cpu":
            return "not on the CPU"
        for i, layer in enumerate(_layers(lm)):
            projections = {
                "qkv_proj": layer.self_attn.qkv_proj, "o_proj": layer.self_attn.o_proj,
                "gate_up_proj": layer.mlp.gate_up_proj, "down_proj": layer.mlp.down_proj,
            }
            for name, p in projections.items():
                if not isinstance(p, Int8Linear) or not p.use_kernel:
                    return f"layer {i} {name} is not int8 on fleetlm's kernel"
                if p.scales.dtype != dtype or not p.weight.is_contiguous():
                    return f"layer {i} {name}: scales in {p.scales.dtype}, model in {dtype}"
                if name != "qkv_proj" and p.bias is not None:
                    return f"layer {i} {name} has a bias"
            norms = [layer.input_layernorm, layer.post_attention_layernorm,
                     layer.self_attn.q_norm, layer.self_attn.k_norm]
            if any(n is not None and n.weight.dtype != dtype for n in norms):
                return f"layer {i}: a norm's weight is not in {dtype}"
        if not int8_gemv.load():
            return "the int8 kernel did not build"
        return ""

    def supports(self, cache: KVCache) -> bool:
        return cache.k[0].dtype == self.dtype

    def __call__(self, x: Tensor, position: int, cache: KVCache) -> Tensor:
        """x [1, 1, hidden] (the embedded token) -> the last layer's output [1, 1, hidden];
        writes the token's keys and values at ``position`` of cache slot 0."""
        y = torch.ops.fleetlm.decode_stack_int8(
            x.view(1, -1), self.weights, cache.k, cache.v, self.rope_cos[position],
            self.rope_sin[position], position, self.window, self.eps, self.num_heads,
            self.num_kv_heads)
        return y.view(1, 1, -1)
