"""Options and error handling shared by the ``fleetlm`` commands: the model, dtype and
quantization options, the cost ledger's --ledger and --since, and :func:`fail`, the one way
a command turns a FleetLMError into ``error: ...`` on stderr and exit code 2.

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
    none = "none"
    int8 = "int8"


ModelOpt = Annotated[str, typer.Option("--model", "-m",
                                       help="Embedded name (smollm2-135m), HF folder, .gguf file or hub id.")]
DTypeArg = Annotated[DTypeOpt, typer.Option("--dtype", help="auto picks bfloat16 where the CPU supports it.")]
QuantArg = Annotated[QuantOpt, typer.Option("--quantize", help="Weight-only int8 for the projections.")]
AdaptersDirArg = Annotated[Path | None, typer.Option(help="The adapter store (default: the user data folder).")]

LedgerOpt = Annotated[Path | None, typer.Option(
    "--ledger", help="The cost ledger (SQLite); default: $FLEETLM_HOME/ledger.sqlite3, else "
                     "$XDG_DATA_HOME/fleetlm/ledger.sqlite3 or "
                     "~/.local/share/fleetlm/ledger.sqlite3.")]
SinceOpt = Annotated[str | None, typer.Option(
    "--since", help="Only requests since: a duration (7d, 12h, 30m) or an ISO date or "
                    "date-time (2026-11-01, 2026-11-01T09:00:00Z; local time without an "
                    "offset).")]


def fail(e: Exception) -> NoReturn:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def warn(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.YELLOW, err=True)
