"""Random LoRA adapters in genuine PEFT format, for tests and benchmarks.

Written with safetensors directly (no model is built), with the config fields and key
names ``PeftModel.save_pretrained`` writes (peft 0.21), so PEFT itself loads the folder
without missing or unexpected keys. Unlike PEFT, which starts B at zero, both A and B
are random, so the adapter changes the model's output.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fleetlm.adapters.peft_format import (
    CONFIG_FILE,
    LORA_TARGETS,
    WEIGHTS_FILE,
    module_names,
    pattern_key,
    projection_dims,
)
from fleetlm.models.config import LlamaConfig


def peft_config(*, rank: int, alpha: float, targets: Sequence[str], use_rslora: bool = False,
                rank_pattern: Mapping[str, int] | None = None,
                alpha_pattern: Mapping[str, float] | None = None,
                base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json of a plain LoRA, with every field peft 0.21 writes."""
    return {
        "alora_invocation_tokens": None, "alpha_pattern": dict(alpha_pattern or {}),
        "arrow_config": None, "auto_mapping": None, "base_model_name_or_path": base_model,
        "bias": "none", "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": alpha, "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16, "r": rank,
        "rank_pattern": dict(rank_pattern or {}), "revision": None,
        "target_modules": list(targets), "target_parameters": None, "task_type": "CAUSAL_LM",
        "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": use_rslora, "velora_config": None,
    }


def make_random_adapter(folder: Path, base_config: LlamaConfig, *, rank: int = 16,
                        alpha: float = 32, targets: Sequence[str] = LORA_TARGETS, seed: int = 0,
                        std: float = 0.02, use_rslora: bool = False,
                        rank_pattern: Mapping[str, int] | None = None,
                        alpha_pattern: Mapping[str, float] | None = None,
                        base_model: str | None = None) -> Path:
    """Write a PEFT LoRA folder for every layer's ``targets`` of ``base_config``; returns it.

    A and B are N(0, std^2) in float32; ``rank_pattern``/``alpha_pattern`` follow PEFT's
    regex-suffix matching (first matching key wins).
    """
    from safetensors.torch import save_file

    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"targets {unknown} are not in {LORA_TARGETS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    dims = projection_dims(base_config)
    pattern = dict(rank_pattern or {})
    tensors: dict[str, torch.Tensor] = {}
    for module in module_names(base_config):
        target = module.rsplit(".", 1)[1]
        if target not in targets:
            continue
        key = pattern_key(pattern, module)
        r = pattern[key] if key is not None else rank
        in_f, out_f = dims[target]
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * std
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * std
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = peft_config(rank=rank, alpha=alpha, targets=[t for t in LORA_TARGETS if t in targets],
                         use_rslora=use_rslora, rank_pattern=rank_pattern,
                         alpha_pattern=alpha_pattern, base_model=base_model)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder
