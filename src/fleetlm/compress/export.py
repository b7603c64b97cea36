"""``fleetlm export``: a base model with an adapter merged, as files other tools serve.

    result = export(ExportSettings(model="smollm2-135m", adapter="banking77",
                                   out=Path("exported/banking77")))

writes, under ``out``::

    hf/                         Hugging Face folder: config.json, model.safetensors (float32),
                                tokenizer files, fleetlm_export.json (what was merged)
    <name>-f16.gguf, ...        one GGUF per type in ``gguf`` (llama.cpp, Ollama, LM Studio)
    export.json                 the files, their sizes and sha256

Each file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from fleetlm.config import StrictModel
from fleetlm.errors import ConfigError


class ExportSettings(StrictModel):
    model: str = "smollm2-135m"  # embedded name, HF folder or .gguf file
    adapter: str | None = None  # a folder, or a name in adapters_dir; None: the base alone
    adapters_dir: Path | None = None
    out: Path
    name: str | None = None  # the files' stem and the GGUF's general.name
    hf: bool = True
    gguf: list[str] = Field(default_factory=lambda: ["f16", "q8_0", "q4_0"])

    @field_validator("gguf")
    @classmethod
    def _types(cls, v: list[str]) -> list[str]:
        from fleetlm.compress.gguf_write import GGUF_TYPES

        bad = [t for t in v if t not in GGUF_TYPES]
        if bad:
            raise ValueError(f"{', '.join(bad)}: not a GGUF type; choose from "
                             f"{', '.join(GGUF_TYPES)} (or none)")
        return list(dict.fromkeys(v))


@dataclass
class ExportResult:
    out: Path
    files: list[dict[str, Any]] = field(default_factory=list)  # path, kind, bytes, sha256
    seconds: float = 0.0


def resolve_adapter(spec: str, adapters_dir: Path | None) -> Path:
    """A folder holding adapter_config.json, or the adapter of that name in the store."""
    from fleetlm.adapters.peft_format import CONFIG_FILE, valid_adapter_name
    from fleetlm.paths import default_adapters_dir

    path = Path(spec).expanduser()
    if (path / CONFIG_FILE).is_file():
        return path
    root = adapters_dir or default_adapters_dir()
    if valid_adapter_name(spec) and (root / spec / CONFIG_FILE).is_file():
        return root / spec
    raise ConfigError(f"adapter {spec!r}: neither a folder with {CONFIG_FILE} nor an adapter in "
                      f"{root} (`fleetlm adapters list` shows them; --adapters-dir picks "
                      "another store)", param="adapter")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export(s: ExportSettings, say: Callable[[str], None] = print) -> ExportResult:
    """Merge, then write the Hugging Face folder and each GGUF type (see the module)."""
    from fleetlm.compress.gguf_write import tokenizer_fields, write_gguf
    from fleetlm.compress.merge import merged_state, write_hf_folder
    from fleetlm.models.loader import resolve_source

    if not s.hf and not s.gguf:
        raise ConfigError("nothing to export: --no-hf with --gguf none; keep one",
                          param="gguf")
    t0 = time.perf_counter()
    base = resolve_source(s.model)
    adapter = resolve_adapter(s.adapter, s.adapters_dir) if s.adapter else None
    name = s.name or (adapter.name if adapter else base.name)
    state, cfg = merged_state(base, adapter)
    # refusals (architecture, tokenizer) come before anything is written
    tokenizer = tokenizer_fields(base, cfg) if s.gguf else None
    say(f"merged {adapter if adapter else '(no adapter)'} into {s.model}: "
        f"{sum(t.numel() for t in state.values()) / 1e6:.1f}M parameters")
    s.out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(out=s.out)
    provenance = {"model": s.model, "base_folder": str(base),
                  "adapter": str(adapter) if adapter else None, "name": name}
    written: list[tuple[Path, str]] = []
    if s.hf:
        folder = write_hf_folder(base, state, s.out / "hf", provenance)
        written.append((folder / "model.safetensors", "hf"))
        say(f"wrote {folder}")
    for qtype in s.gguf:
        path = write_gguf(base, state, cfg, s.out / f"{name}-{qtype}.gguf", qtype, name=name,
                          tokenizer=tokenizer)
        written.append((path, f"gguf {qtype}"))
        say(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    result.files = [{"path": str(p), "kind": kind, "bytes": p.stat().st_size,
                     "sha256": _sha256(p)} for p, kind in written]
    result.seconds = time.perf_counter() - t0
    (s.out / "export.json").write_text(json.dumps(
        {**provenance, "files": result.files, "seconds": round(result.seconds, 2)}, indent=2))
    return result
