"""``fleetlm prune``: calibration-data pruning (:mod:`fleetlm.compress.prune`); this module
reads the options and prints the report as JSON (per-layer lists left out)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fleetlm.cli.options import fail
from fleetlm.errors import FleetLMError

app = typer.Typer()


@app.command()
def prune(
    model: Annotated[str, typer.Option("--model", "-m", help="The model to prune: embedded name, HF folder (e.g. `fleetlm export`'s hf/) or .gguf file.")],
    data: Annotated[Path, typer.Option(help="Calibration rows: .txt (a row per line) or .jsonl (text, messages, or prompt + completion).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pruned model (Hugging Face) and prune.json.")],
    unstructured: Annotated[float, typer.Option(help="Zero this fraction of every projection row by Wanda's score (shapes kept).")] = 0.0,
    two_four: Annotated[bool, typer.Option("--two-four", help="Zero 2 of every 4 consecutive weights by Wanda's score (2:4 sparsity).")] = False,
    mlp: Annotated[float, typer.Option(help="Remove this fraction of every layer's MLP channels.")] = 0.0,
    kv_groups: Annotated[int, typer.Option(help="Remove this many grouped-query groups (a KV head and its query heads) from every layer.")] = 0,
    layers: Annotated[int, typer.Option(help="Remove this many whole decoder layers (least block influence).")] = 0,
    calibration_rows: Annotated[int, typer.Option(help="Rows of --data used for the scores.")] = 128,
    max_len: Annotated[int, typer.Option(help="Tokens per calibration row.")] = 128,
) -> None:
    """Prune with calibration data: Wanda zeros (unstructured or 2:4), or structured removal
    of MLP channels, attention groups and whole layers, so the model gets smaller and faster
    (docs/compress.md). Follow it with `fleetlm distill`."""
    from pydantic import ValidationError

    from fleetlm.compress.prune import PruneSettings
    from fleetlm.compress.prune import prune as run
    from fleetlm.config import format_errors

    try:
        s = PruneSettings(model=model, data=data, out=out, unstructured=unstructured,
                          two_four=two_four, mlp=mlp, kv_groups=kv_groups, layers=layers,
                          calibration_rows=calibration_rows, max_len=max_len)
        report = run(s, say=lambda m: typer.echo(m, err=True))
    except ValidationError as e:
        fail(ValueError("; ".join(format_errors(e, "docs/compress.md"))))
    except FleetLMError as e:
        fail(e)
    brief = {k: v for k, v in report.items() if not k.endswith("_removed") or k == "layers_removed"}
    typer.echo(json.dumps(brief, indent=2))
