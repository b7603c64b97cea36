"""``fleetlm export``: a base model with an adapter merged, as a Hugging Face folder and
GGUF files (:func:`fleetlm.compress.export.export`); this module reads the options and
prints the files it wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleetlm.cli.options import AdaptersDirArg, ModelOpt, fail
from fleetlm.errors import FleetLMError

app = typer.Typer()


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for hf/, the GGUF files and export.json.")],
    model: ModelOpt = "smollm2-135m",
    adapter: Annotated[str | None, typer.Option(help="Adapter to merge: a folder, or a name in the adapter store (default: the base alone).")] = None,
    adapters_dir: AdaptersDirArg = None,
    name: Annotated[str | None, typer.Option(help="Stem of the GGUF files and their general.name (default: the adapter's or the model folder's name).")] = None,
    gguf: Annotated[str, typer.Option(help="Comma-separated GGUF types: f32, f16, q8_0, q4_0; none for no GGUF.")] = "f16,q8_0,q4_0",
    hf: Annotated[bool, typer.Option("--hf/--no-hf", help="Write the Hugging Face folder (out/hf).")] = True,
) -> None:
    """Merge an adapter into its base and write files other tools serve: a Hugging Face
    safetensors folder and GGUF files for llama.cpp (docs/compress.md)."""
    from pydantic import ValidationError

    from fleetlm.compress.export import ExportSettings
    from fleetlm.compress.export import export as run
    from fleetlm.config import format_errors

    types = [] if gguf.strip().lower() == "none" else [t.strip() for t in gguf.split(",") if t.strip()]
    try:
        s = ExportSettings(model=model, adapter=adapter, adapters_dir=adapters_dir, out=out,
                           name=name, hf=hf, gguf=types)
        result = run(s, say=lambda m: typer.echo(m, err=True))
    except ValidationError as e:
        fail(ValueError("; ".join(format_errors(e, "docs/compress.md"))))
    except FleetLMError as e:
        fail(e)
    for f in result.files:
        typer.echo(f"{f['kind']:>10}  {f['bytes'] / 1e6:9.1f} MB  {f['path']}")
    typer.echo(f"done in {result.seconds:.1f} s; {out / 'export.json'} lists the files")
