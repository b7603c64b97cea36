"""The Llama family, written for serving: Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3,
and Gemma 3's text model.

One forward for prefill, chunked prefill and batched decode: the batch is a
rectangle of B rows by S tokens (S=1 when decoding), each row a sequence in its own
KV-cache slot, each token with its own absolute position. New keys and values are
written into the preallocated cache at (slot, position); queries attend over the
first ``kv_len`` cache positions with a mask ``key_pos <= query_pos`` (and the
sliding window where the model has one). Padding at the end of a short row is
harmless: its keys land past the row's last real position and are overwritten by the
row's next real tokens before any query can see them.

Variants are config flags, not subclasses: q/k/v bias (Qwen2), q/k RMSNorm (Qwen3),
llama3/linear RoPE scaling, sliding window (Mistral), tied embeddings (SmolLM2); Gemma 3's
scaled embeddings, sandwich norms, GELU-tanh and its two kinds of layer (sliding-window
layers with a local RoPE base, global layers with the long one). Two kinds travel through
the stack without new arguments: the RoPE tables are the global one and the local one side
by side (``cos [B, S, 1, 2 * head_dim]``) and the mask has one plane per kind (``[B, 2,
rep*S, kv_len]``); each attention layer takes its half and its plane. Gemma's RMSNorm
weights (applied as ``1 + w``) get their 1 added when loaded (``loader.load_weights``).
Module names follow Hugging Face (``model.layers.N.self_attn.q_proj``) so checkpoints
and PEFT adapters map one to one. Multi-LoRA arrives as an explicit argument, a
:class:`~fleetlm.models.lora_hook.LoraHook` (the engine's ``LoraContext``: each token's
adapter slot and the stacked adapter weights); each projection adds its per-token delta
to its output. The cache layout is :mod:`fleetlm.models.kv_cache`'s. The model knows
nothing about tokenizers, sampling, scheduling or how adapters are stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fleetlm.models.compiled_decode import CompiledDecode, compile_disabled, run_layers
from fleetlm.models.config import LlamaConfig
from fleetlm.models.fused_decode import FusedDecode
from fleetlm.models.kv_cache import KVCache
from fleetlm.models.layers import Linear, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from fleetlm.models.lora_hook import LayerLoraHook, LoraHook

# Our fused projections and the Hugging Face projections stacked (along dim 0) to make them.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fused_rows(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Output rows of each part of each fused projection, in stacking order."""
    return {
        "self_attn.qkv_proj": (cfg.q_size, cfg.kv_size, cfg.kv_size),
        "mlp.gate_up_proj": (cfg.intermediate_size, cfg.intermediate_size),
    }


def hf_sources(cfg: LlamaConfig, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face tensor name, expected shape) of each part of our parameter ``name``
    of shape ``shape``, in stacking order."""
    rows = fused_rows(cfg)
    for fused, parts in FUSED_PROJECTIONS.items():
        marker = f".{fused}."
        if marker in name:
            prefix, suffix = name.split(marker)
            return [(f"{prefix}.{p}.{suffix}", (r, *shape[1:]))
                    for p, r in zip(parts, rows[fused], strict=True)]
    return [(name, shape)]


def rope_tables(cfg: LlamaConfig, positions: int) -> tuple[Tensor, Tensor]:
    """cos and sin [positions, head_dim] float32; with two kinds of layer (Gemma 3) the
    global layers' table and the local ones' side by side, [positions, 2 * head_dim]."""
    cos, sin = rope_cos_sin(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                            positions)
    if cfg.two_kinds:
        local = rope_inv_freq(cfg.head_dim, cfg.rope_local_theta or cfg.rope_theta, None)
        lcos, lsin = rope_cos_sin(local, positions)
        cos, sin = torch.cat([cos, lcos], dim=-1), torch.cat([sin, lsin], dim=-1)
    return cos, sin


class Attention(nn.Module):
    kind_index: Tensor  # [1] long: 0 global, 1 sliding window (two kinds of layer only)

    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.rep = cfg.num_heads // cfg.num_kv_heads
        self.sliding_window = cfg.sliding_window
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5
        # two kinds of layer (Gemma 3): which half of the RoPE tables and which mask plane
        # (0: global, 1: sliding window), as a tensor: an int attribute would be a guard of
        # the compiled layer graph, one graph per kind and shape, past torch's recompile limit
        self.kind = cfg.sliding_layers[layer_idx] if cfg.sliding_layers is not None else None
        self.two_kinds = self.kind is not None
        self.register_buffer("kind_index", torch.tensor([int(self.kind or 0)]),
                             persistent=False)
        h = cfg.hidden_size
        self.split = list(fused_rows(cfg)["self_attn.qkv_proj"])
        # q, k and v in one matmul (rows q | k | v): one weight read, one kernel launch
        self.qkv_proj = Linear(h, sum(self.split), bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, h, bias=False)
        if cfg.qk_norm:
            self.q_norm: RMSNorm | None = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm: RMSNorm | None = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: Tensor,  # [B, S, hidden]
        cos: Tensor,  # [B, S, 1, D]
        sin: Tensor,
        positions: Tensor,  # [B, S]
        mask: Tensor,  # [B, 1, rep*S, kv_len] bool: attend over cache positions [0, kv_len)
        k_cache: Tensor,  # this layer's cache [slots, Hkv, max_len, D]
        v_cache: Tensor,
        slots: Tensor | None,  # [B]; None = rows 0..B-1 are slots 0..B-1 (no gather)
        lora: LayerLoraHook | None = None,
    ) -> Tensor:
        B, S, _ = x.shape
        kv_len = mask.shape[-1]  # from a tensor: a compiled graph keeps it symbolic
        D, Hkv, rep = self.head_dim, self.num_kv_heads, self.rep
        if self.two_kinds:  # this layer's half of cos/sin [.., 2D] and plane of the mask
            cos = cos.unflatten(-1, (2, D)).index_select(-2, self.kind_index).squeeze(-2)
            sin = sin.unflatten(-1, (2, D)).index_select(-2, self.kind_index).squeeze(-2)
            mask = mask.index_select(1, self.kind_index)
        qkv = self.qkv_proj(x)
        if lora is not None:
            qkv = qkv + lora.delta("self_attn.qkv_proj", x)
        q, k, v = qkv.split(self.split, dim=-1)
        q = q.reshape(B, S, self.num_heads, D)
        k = k.reshape(B, S, Hkv, D)
        v = v.reshape(B, S, Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        # rows are slots 0..B-1 when slots is None. Written in place into the whole cache
        # tensor (never through a slice of it: under torch.compile a write into a view of
        # an input copies the input back, the whole cache, every layer, every step)
        rows = torch.arange(B, device=x.device) if slots is None else slots
        # advanced indices [B,S] around a slice -> the written block is [B, S, Hkv, D]
        row = rows[:, None].expand(B, S)
        k_cache[row, :, positions] = k.to(k_cache.dtype)
        v_cache[row, :, positions] = v.to(v_cache.dtype)
        if slots is None:
            # [B, Hkv, L, D] views; narrow (not [:B]) so a compiled graph's sizes are
            # exactly B and kv_len, not min(B, rows), which would specialise the graph
            keys = k_cache.narrow(0, 0, B).narrow(2, 0, kv_len)
            values = v_cache.narrow(0, 0, B).narrow(2, 0, kv_len)
        else:
            keys, values = k_cache[slots, :, :kv_len], v_cache[slots, :, :kv_len]  # gathered copy

        # Grouped-query attention without copying K/V: fold the `rep` query heads that
        # share a KV head into the query-length dim -> [B, Hkv, rep*S, D].
        q = q.view(B, S, Hkv, rep, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, rep * S, D)
        if S == 1 and torch.compiler.is_compiling():
            # compiled decode: written as multiply + reduce rather than matmuls so inductor
            # fuses it into a few loops over the cache (no transposed copy of K, no
            # per-call setup of the SDPA kernel -- both measured slower for one query).
            # Eagerly, the same code would materialise [B, Hkv, rep, L, D] float32 temporaries.
            scores = (q[:, :, :, None, :] * keys[:, :, None]).float().sum(-1) * self.scale
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # [B, Hkv, rep, L]
            out = (probs[..., None] * values[:, :, None].float()).sum(-2).to(values.dtype)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        out = out.view(B, Hkv, rep, S, D).permute(0, 3, 1, 2, 4).reshape(B, S, -1)
        y = self.o_proj(out)
        if lora is not None:
            y = y + lora.delta("self_attn.o_proj", out)
        return y


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = Linear(h, sum(fused_rows(cfg)["mlp.gate_up_proj"]), bias=cfg.mlp_bias)
        self.down_proj = Linear(i, h, bias=cfg.mlp_bias)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: Tensor, lora: LayerLoraHook | None = None) -> Tensor:
        gu = self.gate_up_proj(x)
        if lora is not None:
            gu = gu + lora.delta("mlp.gate_up_proj", x)
        gate, up = gu.chunk(2, dim=-1)
        h = (F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * up
        y = self.down_proj(h)
        if lora is not None:
            y = y + lora.delta("mlp.down_proj", h)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer_idx)
        # Gemma 3: post_attention_layernorm normalises the attention's output, and the MLP
        # has a norm before and after it (Hugging Face's names)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        positions: Tensor,
        mask: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        slots: Tensor | None,
        lora: LayerLoraHook | None = None,
    ) -> Tensor:
        a = self.self_attn(
            self.input_layernorm(x), cos, sin, positions, mask, k_cache, v_cache, slots, lora
        )
        if self.sandwich:
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(
                self.mlp(self.pre_feedforward_layernorm(x), lora))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class Backbone(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over an explicit :class:`KVCache`."""

    rope_cos: Tensor  # [max_positions, head_dim] float32
    rope_sin: Tensor

    def __init__(self, cfg: LlamaConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # type: ignore[assignment]
        cos, sin = rope_tables(cfg, max_positions or cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)  # [n, D] (2D: two kinds) float32
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def allocate_cache(self, num_slots: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        return KVCache.allocate(
            c.num_layers, num_slots, c.num_kv_heads, max_len, c.head_dim,
            dtype or self.dtype, self.model.embed_tokens.weight.device,
        )

    def attention_mask(self, positions: Tensor, kv_len: int) -> Tensor:
        """Bool mask [B, 1, rep*S, kv_len]: True where a query may see a key."""
        B, S = positions.shape
        key_pos = torch.arange(kv_len, device=positions.device)
        q_pos = positions[:, None, :, None]  # [B, 1, S, 1]
        mask = key_pos <= q_pos
        c = self.config
        if c.sliding_window is not None and c.two_kinds:  # [B, 2, S, kv_len]: global, local
            mask = torch.cat([mask, mask & (key_pos > q_pos - c.sliding_window)], dim=1)
        elif c.sliding_window is not None:
            mask = mask & (key_pos > q_pos - c.sliding_window)
        elif c.two_kinds:
            mask = torch.cat([mask, mask], dim=1)
        rep = c.num_heads // c.num_kv_heads
        n = mask.shape[1]
        return mask[:, :, None].expand(B, n, rep, S, kv_len).reshape(B, n, rep * S, kv_len)

    _compiled: CompiledDecode | None = None
    _fused: FusedDecode | None = None
    _fused_checked = False

    def fused_decode(self) -> FusedDecode | None:
        """The native stack for a few tokens of one sequence
        (:mod:`fleetlm.models.fused_decode`) when it applies to this model; decided on
        first use (after any quantisation)."""
        if not self._fused_checked:
            self._fused = FusedDecode.build(self)
            self._fused_checked = True
        return self._fused

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        # .to() / .float() / .cpu() make new tensors: the native stack's list of the old
        # ones is dropped and rebuilt on first use
        self._fused, self._fused_checked = None, False
        return super()._apply(fn, *args, **kwargs)

    def compile_decode(self) -> bool:
        """Compile decode steps from now on (:mod:`fleetlm.models.compiled_decode`); the
        graphs are built on the first step of each kind. False when ``FLEETLM_COMPILE=0``."""
        if compile_disabled():
            return False
        self._compiled = CompiledDecode(self.model.layers)
        return True

    @property
    def decode_compiled(self) -> bool:
        """True while decode steps run compiled (False before, and after a failure)."""
        return self._compiled is not None and not self._compiled.failed

    def _layers(self, x: Tensor, positions: Tensor, cache: KVCache, slots: Tensor | None,
                kv_len: int, lora: LoraHook | None) -> Tensor:
        """The decoder stack in PyTorch: the compiled decode graphs where they apply, else
        eagerly."""
        cos = self.rope_cos[positions].to(x.dtype)[:, :, None, :]
        sin = self.rope_sin[positions].to(x.dtype)[:, :, None, :]
        mask = self.attention_mask(positions, kv_len)
        out = None
        if self._compiled is not None and x.shape[1] == 1 and slots is None:
            out = self._compiled(x, cos, sin, positions, mask, cache, lora)
        return out if out is not None else run_layers(
            list(self.model.layers), x, cos, sin, positions, mask, cache, slots, lora)

    def forward(
        self,
        input_ids: Tensor,  # [B, S] int64
        positions: Tensor,  # [B, S] int64, absolute position of each token
        cache: KVCache,
        slots: Tensor | None,  # [B] int64 cache slot of each row; None = slots 0..B-1
        kv_len: int,  # attend over cache positions [0, kv_len); >= max(positions) + 1
        # [B] index in S whose logits to return; or (rows [N], positions [N]): those tokens'
        # logits [N, vocab]; None = all
        logits_index: Tensor | tuple[Tensor, Tensor] | None = None,
        lora: LoraHook | None = None,  # per-token adapters of the B*S tokens (row-major)
        return_hidden: bool = False,  # the final-norm hidden states instead of the logits
        prompt: bool = False,  # a prompt's chunk: never the native stack (see below)
    ) -> Tensor:
        """Logits [B, vocab] at ``logits_index`` (or [B, S, vocab] for all tokens), float32.

        ``return_hidden``: the final RMSNorm's output at the same tokens ([B, hidden] or
        [B, S, hidden]), in the model's dtype, without the LM head (prompt embeddings)."""
        x = self.model.embed_tokens(input_ids)
        if self.config.embed_scale:  # Gemma: sqrt(hidden) rounded to the model's dtype first
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        # one sequence, a few tokens, no adapter: the native stack (fleetlm.models.fused_decode).
        # Not for a prompt's chunks: their result must not depend on how the prompt was
        # chunked (the prefix cache computes only a prompt's tail), and the native stack
        # rounds differently from PyTorch's path in bfloat16
        fused = None
        if (input_ids.shape[0] == 1 and lora is None and not prompt
                and not torch.compiler.is_compiling()):
            fused = self.fused_decode()
        if fused is not None and fused.applies(input_ids, positions, cache):
            x = fused(x, positions, 0 if slots is None else int(slots[0]), cache)
        else:
            x = self._layers(x, positions, cache, slots, kv_len, lora)
        if isinstance(logits_index, tuple):
            x = x[logits_index[0], logits_index[1]]
        elif logits_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_index]
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x).float()
