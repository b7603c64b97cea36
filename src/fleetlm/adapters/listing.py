"""The adapter store as ``fleetlm adapters list|add|remove`` sees it: the store opened for a
base model named as on the command line (an embedded name, a folder, a GGUF file or a hub
id: only its config is read, never its weights), and the store's contents described as JSON
or as a table.

This module knows the store and where a base model's config lives; it knows nothing of the
engine, of serving or of typer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleetlm.adapters.errors import AdapterError
    from fleetlm.adapters.store import AdapterInfo, AdapterStore
    from fleetlm.models.config import LlamaConfig


def open_store(adapters_dir: Path | None, model: str | None, max_rank: int = 64,
               url: str | None = None) -> AdapterStore:
    """The store at ``adapters_dir`` (default: the user data folder's), validating against
    ``model``'s config (none: no shape checks, e.g. to remove an adapter). With ``url`` (an
    object store, fleetlm.adapters.mirror) ``adapters_dir`` holds the local copies."""
    from fleetlm.adapters.mirror import open_adapter_store

    base = base_model_config(model) if model is not None else None
    return open_adapter_store(adapters_dir, url, base, max_rank=max_rank)


def base_model_config(model: str) -> LlamaConfig:
    """The base model's LlamaConfig without its weights: a folder's config.json, the cached
    conversion of a GGUF or embedded model (converted once, as serving would), or a hub
    repo's config.json alone."""
    from fleetlm.errors import ModelLoadError
    from fleetlm.models.loader import read_config, resolve_source
    from fleetlm.models.registry import EMBEDDED_MODELS

    local = model in EMBEDDED_MODELS or Path(model).expanduser().exists()
    if not local and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model):
        try:
            from huggingface_hub import hf_hub_download

            return read_config(Path(hf_hub_download(model, "config.json")).parent)
        except Exception as e:
            raise ModelLoadError(f"{model}: could not fetch config.json from the Hugging Face hub "
                                 f"({type(e).__name__}: {e}); pass a local model folder") from e
    return read_config(resolve_source(model))


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def listing_json(root: Path, good: Sequence[AdapterInfo], bad: Sequence[AdapterError]) -> str:
    return json.dumps({
        "adapters_dir": str(root),
        "adapters": [{"name": a.name, "path": str(a.path), "rank": a.rank, "alpha": a.alpha,
                      "target_modules": list(a.target_modules), "base_model": a.base_model,
                      "size_bytes": a.size_bytes} for a in good],
        "invalid": [{"name": err.adapter, "error": str(err)} for err in bad],
    }, indent=2)


def listing_table(root: Path, good: Sequence[AdapterInfo]) -> Any:
    """A rich Table of the valid adapters."""
    from rich.table import Table

    table = Table(title=f"adapters in {root}")
    for col in ("name", "rank", "alpha", "targets", "size", "base model"):
        table.add_column(col, justify="right" if col in ("rank", "alpha", "size") else "left")
    for a in good:
        table.add_row(a.name, str(a.rank), f"{a.alpha:g}", ",".join(a.target_modules),
                      human_bytes(a.size_bytes), a.base_model or "-")
    return table


def describe(info: AdapterInfo) -> str:
    """One line: rank, alpha, targets, size and where it lives."""
    return (f"adapter {info.name!r} (rank {info.rank}, alpha {info.alpha:g}, "
            f"{','.join(info.target_modules)}, {human_bytes(info.size_bytes)}) at {info.path}")
