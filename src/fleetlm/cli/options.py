"""Options and error handling shared by the ``fleetlm`` commands: the model, dtype and
quantization options, the state store's --state-db, the cost ledger's --ledger and --since,
:func:`fail`, the one way a command turns a FleetLMError into ``error: ...`` on stderr and
exit code 2, and :func:`show`, a rich table on stdout.

This module knows typer and the options' words; nothing of what the commands do.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer


class DTypeOpt(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class QuantOpt(StrEnum):
    auto = "auto"
    none = "none"
    int8 = "int8"
    int4 = "int4"


ModelOpt = Annotated[str, typer.Option("--model", "-m",
                                       help="Embedded name (smollm2-135m), HF folder, .gguf file or hub id.")]
DTypeArg = Annotated[DTypeOpt, typer.Option("--dtype", help="auto picks bfloat16 where the CPU supports it.")]
QuantArg = Annotated[QuantOpt, typer.Option("--quantize", help="Weight-only int8 (per channel) for the projections and the LM head, or int4 (4-bit, per group of 32; LM head int8); auto: int8 where this CPU has a vector path for it (docs/engine.md).")]
AdaptersDirArg = Annotated[Path | None, typer.Option(help="The adapter store (default: the user data folder).")]

StateDbOpt = Annotated[str | None, typer.Option(
    "--state-db", help="The state store (keys, tenants, audit log, cost ledger): a SQLite file "
                       "path, or postgresql://USER:PASSWORD@HOST:5432/DB shared by replicas; "
                       "default: $FLEETLM_STATE_DB, else $FLEETLM_HOME/state.db (else "
                       "$XDG_DATA_HOME/fleetlm/state.db or ~/.local/share/fleetlm/state.db).")]
LedgerOpt = Annotated[Path | None, typer.Option(
    "--ledger", help="Read the cost ledger from this SQLite file instead of the state store "
                     "(a routes config's ledger_path, or the ledger.sqlite3 of a fleetlm "
                     "before the state store).")]
SinceOpt = Annotated[str | None, typer.Option(
    "--since", help="Only requests since: a duration (7d, 12h, 30m) or an ISO date or "
                    "date-time (2026-11-01, 2026-11-01T09:00:00Z; local time without an "
                    "offset).")]


def fail(e: Exception) -> NoReturn:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def warn(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.YELLOW, err=True)


def show(table: object) -> None:
    """A rich table on stdout; piped output is not cut to 80 columns (ids stay whole)."""
    import sys

    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 200).print(table)
