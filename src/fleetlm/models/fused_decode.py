"""A few tokens of one sequence through the whole decoder stack in one native call:
``fleetlm::decode_stack_int8``.

Single-stream decoding (one row, no adapters) of an int8 model runs the decoder stack in
C++ (``kernels/csrc/decode_stack.inc``): one OpenMP parallel region a step, the threads
splitting each projection's output rows and the attention heads, instead of ~10 compiled
kernels and fork/joins a layer. So does a speculative check of one sequence's drafted
tokens (up to :data:`MAX_TOKENS` tokens; never a prompt's chunk, see the model's forward):
each token's result is bit for bit what the call would give it alone, so speculation never
changes a greedy token. The result matches the model's own forward (its slow twin, compiled or eager) to
float32 rounding; with bfloat16 weights intermediates are rounded where the eager forward
rounds them, to within a few bfloat16 ulps of it.

Used when every projection of every layer is an :class:`~fleetlm.models.layers.Int8Linear`
on fleetlm's int8 kernel, the norms and scales have the activations' dtype (float32 or
bfloat16) and the KV cache too; anything else (4-bit weights, adapters, several sequences,
an MLP bias) takes the usual path. ``FLEETLM_FUSED_DECODE=0`` turns it off.
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
MAX_TOKENS = 8  # tokens a call (csrc/decode_stack.inc's kStackMaxRows)
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
        c = lm.config
        if c.sandwich_norms or c.embed_scale or c.two_kinds or c.hidden_act != "silu" \
                or c.attn_scale is not None:
            return f"{c.model_type}: the native stack is written for the Llama layout"
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
                if p.scales.dtype != dtype:
                    return f"layer {i} {name}: scales in {p.scales.dtype}, model in {dtype}"
                if not p.weight.is_contiguous():
                    return f"layer {i} {name}: the int8 weight is not contiguous"
                if name != "qkv_proj" and p.bias is not None:
                    return f"layer {i} {name} has a bias"
            norms = [layer.input_layernorm, layer.post_attention_layernorm,
                     layer.self_attn.q_norm, layer.self_attn.k_norm]
            if any(n is not None and n.weight.dtype != dtype for n in norms):
                return f"layer {i}: a norm's weight is not in {dtype}"
        if not int8_gemv.load():
            return "the int8 kernel did not build"
        return ""

    def applies(self, input_ids: Tensor, positions: Tensor, cache: KVCache) -> bool:
        """One sequence (one row), 1 to MAX_TOKENS tokens at consecutive positions, a cache
        in the model's dtype."""
        B, S = input_ids.shape
        if B != 1 or S > MAX_TOKENS or cache.k[0].dtype != self.dtype:
            return False
        return S == 1 or int(positions[0, -1]) - int(positions[0, 0]) == S - 1

    def __call__(self, x: Tensor, positions: Tensor, slot: int, cache: KVCache) -> Tensor:
        """x [1, S, hidden] (S <= MAX_TOKENS embedded tokens of one sequence at consecutive
        ``positions`` [1, S]) -> the last layer's output [1, S, hidden]; writes their keys
        and values into cache ``slot``."""
        S = x.shape[1]
        pos0 = int(positions[0, 0])
        y = torch.ops.fleetlm.decode_stack_int8(
            x.view(S, -1), self.weights, cache.k, cache.v, self.rope_cos, self.rope_sin, slot,
            pos0, self.window, self.eps, self.num_heads, self.num_kv_heads)
        return y.view(1, S, -1)
