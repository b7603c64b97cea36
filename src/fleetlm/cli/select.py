"""``fleetlm select``: candidate bases tuned and served alike, compared, one recommended
(:mod:`fleetlm.tune.select`); this module reads the options and prints the table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fleetlm.cli.options import fail
from fleetlm.errors import FleetLMError

app = typer.Typer()


@app.command()
def select(
    config: Annotated[Path, typer.Argument(help="The select config (YAML); see examples/select-banking77.yaml.")],
    out: Annotated[Path | None, typer.Option(help="Also write the results as JSON here.")] = None,
) -> None:
    """Tune one task on several bases with the same budget, measure each served, and
    recommend one: quality, latency, memory and cost per 1M requests side by side."""
    from rich.console import Console

    from fleetlm.tune.select import load_select_config, run_select

    console = Console(stderr=True)
    try:
        cfg, tune = load_select_config(config)
        report = run_select(cfg, tune, say=console.print)
    except FleetLMError as e:
        fail(e)
    print_table(report)
    if out is not None:
        import json

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = report["metric"]
    table = Table(title=f"fleetlm select: {report['task']}")
    for col in ("base", f"validation {metric}", "latency p50 / p90 (ms)", "requests/s",
                "memory (MiB)", "cost per 1M requests", "train tok/s"):
        table.add_column(col, justify="left" if col == "base" else "right")
    for r in report["candidates"]:
        table.add_row(r["base"], f"{r['quality']:.3f}",
                      f"{r['latency_ms_p50']:.0f} / {r['latency_ms_p90']:.0f}",
                      f"{r['requests_per_s']:.2f}", f"{r['memory_bytes'] / 2**20:.0f}",
                      f"{r['cost_per_1m_requests']:.3f}",
                      f"{r['train_tokens_per_s'] or 0:.0f}")
    console = Console(width=max(140, Console().width))
    console.print(table)
    console.print(f"[bold]recommended: {report['recommendation']}[/]")
    for line in report["reasons"]:
        console.print(f"  {line}")
    console.print(f"plot: {report['plot']}")
