"""A base model with a LoRA adapter folded into its weights, as a Hugging Face folder.

    state, cfg = merged_state(base_folder, adapter_folder)   # HF names, float32
    write_hf_folder(base_folder, state, out_dir, provenance)  # config, weights, tokenizer

Merging is ``W += scale * B @ A`` for every module the adapter targets (PEFT's
``merge_and_unload`` for plain LoRA, the only kind the adapter store accepts), in float32
whatever the base's dtype. The folder is written under a temporary name beside ``out_dir``
and renamed into place: a crash leaves no half-written model that looks complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fleetlm.models.config import LlamaConfig

# a model folder's files that are copied as they are (weights are written anew)
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
           "added_tokens.json", "chat_template.jinja", "chat_template.json")


def merged_state(base: Path, adapter: Path | None, *, max_rank: int = 256,
                 ) -> tuple[dict[str, torch.Tensor], LlamaConfig]:
    """The base folder's weights (Hugging Face names, float32) with ``adapter`` merged in;
    the adapter is checked against the base's shapes first (its errors name the fix)."""
    from fleetlm.adapters.peft_format import load_folder
    from fleetlm.models.loader import read_config, read_state_dict

    cfg = read_config(base)
    state = {k: v.to(torch.float32) for k, v in read_state_dict(base).items()}
    if adapter is not None:
        loaded = load_folder(adapter.name, adapter, cfg, max_rank, dtype=torch.float32)
        for module, m in loaded.modules.items():
            key = f"{module}.weight"
            state[key] = state[key] + m.scale * (m.b @ m.a)
    return state, cfg


def write_hf_folder(base: Path, state: dict[str, torch.Tensor], out_dir: Path,
                    provenance: dict[str, Any], config: dict[str, Any] | None = None) -> Path:
    """``out_dir`` as a Hugging Face folder: the base's config (with ``config``'s keys
    replaced: a pruned model's new sizes) and tokenizer files, the weights in ``state`` (a
    tied head is left out, as transformers saves it), and ``fleetlm_export.json`` with
    ``provenance``. An existing ``out_dir`` is replaced."""
    from safetensors.torch import save_file

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name in _COPIED:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        written = {**json.loads((base / "config.json").read_text()), **(config or {})}
        written.pop("quantization_config", None)
        written["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(written, indent=2))
        tied = bool(written.get("tie_word_embeddings", False))
        weights = {k: v.contiguous() for k, v in state.items()
                   if not (tied and k == "lm_head.weight") and not k.endswith("rotary_emb.inv_freq")}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "fleetlm_export.json").write_text(json.dumps(provenance, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
