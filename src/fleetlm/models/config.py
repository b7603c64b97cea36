"""Typed configuration of a Llama-family model, read from a Hugging Face ``config.json``.

Covers Llama 2/3 (incl. llama3 RoPE scaling), SmolLM2, Mistral (sliding window),
Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm) and Gemma 3's text model (``gemma3_text``:
scaled embeddings, RMSNorm weights applied as ``1 + w``, a norm before and after each
block, GELU-tanh, sliding-window layers with their own RoPE base). Anything else is
rejected with an error naming the architecture, so a wrong model fails at load time, not
mid-request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetlm.errors import ModelLoadError

# model_type -> (q/k/v bias default, q/k norm)
SUPPORTED_MODEL_TYPES: dict[str, tuple[bool, bool]] = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
    "gemma3_text": (False, True),
}
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (Qwen2) -- o_proj never has one
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # --- Gemma 3 (all off for the Llama family)
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh": the MLP's act(gate) * up
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), rounded to the dtype
    norm_plus_one: bool = False  # checkpoints store RMSNorm weights w, applied as 1 + w
    sandwich_norms: bool = False  # a norm after attention and after the MLP too
    attn_scale: float | None = None  # query scaling (None: head_dim ** -0.5)
    # per layer, whether it is a sliding-window layer; None: every layer is like the
    # first (``sliding_window`` everywhere, or nowhere)
    sliding_layers: tuple[bool, ...] | None = None
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers

    @property
    def two_kinds(self) -> bool:
        """Sliding-window and global layers with their own masks and RoPE tables."""
        return self.sliding_layers is not None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """Build from a Hugging Face config dict; ``source`` names the file in errors."""
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"{source}: unsupported architecture model_type={model_type!r} "
                f"(architectures={archs}). fleetlm serves the Llama family: "
                f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}."
            )
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads")
            if k not in cfg
        ]
        if missing:
            raise ModelLoadError(f"{source}: missing required keys {missing}")
        gemma = model_type == "gemma3_text"
        act = (cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu") if gemma \
            else cfg.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS or (act != "silu" and not gemma):
            raise ModelLoadError(f"{source}: hidden_act={act!r} is not supported (only 'silu'"
                                 f"{', or gelu_pytorch_tanh for gemma3_text' if gemma else ''})")
        bias_default, qk_norm = SUPPORTED_MODEL_TYPES[model_type]
        num_heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        sliding = cfg.get("sliding_window")
        if model_type == "qwen2" or model_type == "qwen3":
            # Qwen ships sliding_window in every config but only uses it when asked to.
            if not cfg.get("use_sliding_window", False):
                sliding = None
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 layout
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_scaling or rope_params
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise ModelLoadError(
                    f"{source}: rope_scaling type {kind!r} is not supported "
                    "(supported: default, linear, llama3)"
                )
        extra = _gemma3_fields(cfg, source, int(cfg["num_hidden_layers"]), rope_theta) \
            if gemma else {}
        if gemma:
            rope_theta = extra.pop("rope_theta")
            rope_scaling = extra.pop("rope_scaling", rope_scaling)
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", bias_default)),
            qk_norm=qk_norm,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hidden_act=act,
            **extra,
        )


def _gemma3_fields(cfg: dict[str, Any], source: str, layers: int,
                   rope_theta: Any) -> dict[str, Any]:
    """Gemma 3's settings from its config.json (transformers 4.5x and 5.x layouts)."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ModelLoadError(f"{source}: {key}={cfg[key]} is not supported (Gemma 3 "
                                 "checkpoints leave it null)")
    if cfg.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{source}: use_bidirectional_attention is not supported "
                             "(an embedding model, not a causal LM)")
    kinds = cfg.get("layer_types")
    if kinds is None:
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        kinds = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(layers)]
    if len(kinds) != layers or not set(kinds) <= {"full_attention", "sliding_attention"}:
        raise ModelLoadError(f"{source}: layer_types must list full_attention or "
                             f"sliding_attention for each of the {layers} layers")
    # transformers >= 5: rope_parameters per layer kind; before: rope_theta and
    # rope_local_base_freq (and rope_scaling for the global layers)
    params = cfg.get("rope_parameters")
    full = params.get("full_attention") if isinstance(params, dict) else None
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    scaling = cfg.get("rope_scaling") or None
    if isinstance(full, dict):
        rope_theta = full.get("rope_theta", rope_theta)
        if full.get("rope_type", "default") != "default":
            scaling = full
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in ("default", "linear"):
        raise ModelLoadError(f"{source}: rope scaling {kind!r} of the global layers is not "
                             "supported (default or linear)")
    local_theta = (local or {}).get("rope_theta") or cfg.get("rope_local_base_freq") or 10000.0
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    return {
        "embed_scale": True, "norm_plus_one": True, "sandwich_norms": True,
        "attn_scale": float(cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        "sliding_layers": tuple(k == "sliding_attention" for k in kinds),
        "rope_local_theta": float(local_theta),
        "rope_theta": float(rope_theta or 1_000_000.0), "rope_scaling": scaling,
    }
