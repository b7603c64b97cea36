"""Shared fixtures: tiny random Hugging Face checkpoints of every supported family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama3-rope": ("LlamaConfig", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, "rope_theta": 500000.0}),
    "smollm2-tied": ("LlamaConfig", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "mistral-window": ("MistralConfig", {"sliding_window": 8}),
    "qwen2-bias": ("Qwen2Config", {}),
    "qwen3-qknorm": ("Qwen3Config", {"head_dim": 32}),
    # two sliding-window layers around a global one; head_dim and the query scale differ
    # from hidden / heads so each is seen
    "gemma3": ("Gemma3TextConfig", {
        "num_hidden_layers": 3, "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
}


def make_hf_model(family: str, seed: int = 0) -> Any:
    import transformers

    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**TINY, **extra})
    cfg._attn_implementation = "eager"
    model_cls = {"LlamaConfig": transformers.LlamaForCausalLM,
                 "MistralConfig": transformers.MistralForCausalLM,
                 "Qwen2Config": transformers.Qwen2ForCausalLM,
                 "Qwen3Config": transformers.Qwen3ForCausalLM,
                 "Gemma3TextConfig": transformers.Gemma3ForCausalLM}[cls_name]
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    # random init leaves biases and norms at 0/1; perturb them so the test sees them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> folder with config.json + model.safetensors (no tokenizer)."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        make_hf_model(family).save_pretrained(folder)
        out[family] = folder
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with the embedded model's tokenizer and chat template
    (embeddings drawn wide enough that a tied head can express a confident answer): a base
    model to tune and serve adapters on in seconds. Read-only for its users."""
    import transformers

    from fleetlm.bench.harness import save_tiny_llama
    from fleetlm.models.loader import resolve_source

    tok = transformers.AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-base"), tok,
                           max_position_embeddings=512)


# a real PostgreSQL for the state store's tests (and the server's): see tests/postgres.py
from tests.postgres import postgres_server, postgres_url, state_url  # noqa: E402, F401
