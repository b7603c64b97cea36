"""``fleetlm tune``: raw data to a served adapter, by :class:`fleetlm.tune.pipeline.Pipeline`;
this module reads the options and prints the metrics and where the adapter went."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleetlm.cli.options import fail
from fleetlm.errors import FleetLMError

app = typer.Typer()


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="The tune config (YAML); see examples/banking77.yaml.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue training from the last checkpoint.")] = False,
    serve_url: Annotated[str | None, typer.Option(help="A running `fleetlm serve` to load the adapter into.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Run folder (default: the config's output_dir or runs/NAME).")] = None,
    device: Annotated[str, typer.Option(help="cpu, or cuda when a GPU is there.")] = "cpu",
) -> None:
    """Raw data to a served adapter: prepare, synthesise, filter, LoRA-tune, evaluate, publish."""
    from fleetlm.tune.config import load_config
    from fleetlm.tune.pipeline import Pipeline

    try:
        cfg = load_config(config)
        if output_dir is not None:
            cfg = cfg.model_copy(update={"output_dir": output_dir})
        result = Pipeline(cfg, resume=resume, serve_url=serve_url, device=device).run()
    except FleetLMError as e:
        fail(e)
    m = result.summary.get("metrics", {})
    for name, r in m.items():
        typer.echo(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "rows"))
    typer.echo(f"adapter: {result.adapter_dir}\nrun folder: {result.run_dir} "
               f"({result.summary['wall_seconds']:.0f} s)")
