"""``fleetlm report savings``: what routing saved, read from the cost ledger (the state
store, or a ledger file with --ledger) by
:func:`fleetlm.router.report.savings` and laid out by its table and notes; this module
declares the options and prints (JSON or the table)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fleetlm.cli.options import LedgerOpt, SinceOpt, StateDbOpt, fail
from fleetlm.errors import FleetLMError

app = typer.Typer(help="Reports from the cost ledger.", no_args_is_help=True)


@app.command("savings")
def report_savings(
    since: SinceOpt = None,
    ledger: LedgerOpt = None,
    state_db: StateDbOpt = None,
    route: Annotated[str | None, typer.Option("--route", help="Only this route.")] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Also write a PNG: cumulative cost over time, actual against the "
                       "all-large baseline.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """What routing saved: requests, decisions, tokens and cost per route, against sending
    every request to the route's first large upstream."""
    import json

    try:
        from fleetlm.router.report import savings, savings_notes, savings_table

        run = savings(ledger, since, route, plot, state_db=state_db)
    except (FleetLMError, ValueError) as e:
        fail(e)
    s, path = run.summary, run.ledger
    where = (f" for route {route}" if route else "") + (f" since {since}" if since else "")
    if json_out:
        typer.echo(json.dumps(s | {"ledger": str(path), "route": route,
                                   "plot": str(run.plot) if run.plot else None}, indent=2))
    if s["requests"] == 0:
        typer.echo(f"no requests in {path}{where}", err=True)
        return
    if json_out:
        return
    from rich.console import Console

    table = savings_table(s, title=f"savings in {path}{where}")
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    typer.echo("\n".join(savings_notes(s, plot, run.plot)))
