"""The savings report (``fleetlm report savings``): reading ``--since``, gathering the
ledger's savings for a window and route, the table per route, its notes, and the plot of
cumulative cost over time, actual against the all-large baseline.

The numbers come from :meth:`fleetlm.router.ledger.Ledger.savings` and
:meth:`~fleetlm.router.ledger.Ledger.cost_over_time`; this module only parses, lays out and
draws. It knows nothing of the command line.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """Unix seconds from ``7d`` / ``12h`` / ``30m`` / ``2w`` / ``90s`` (that long before
    ``now``), an ISO date ``2026-11-01`` (local midnight) or an ISO date-time
    ``2026-11-01T09:00:00`` (local time unless it carries an offset or ``Z``)."""
    t = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", t)
    if m:
        return (time.time() if now is None else now) - float(m[1]) * _UNITS[m[2]]
    try:
        return datetime.fromisoformat(t).timestamp()
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration (7d, 12h, 30m, 2w) or an ISO date "
                         "or date-time (2026-11-01, 2026-11-01T09:00:00Z)") from None


def plot_cost_over_time(series: Sequence[tuple[float, float, float]], path: str | Path,
                        title: str = "Cost over time") -> Path:
    """PNG of cumulative USD against time: the actual cost and the all-large baseline.
    ``series``: ``(ts, actual, baseline)`` per time bucket, oldest first (as
    ``Ledger.cost_over_time`` returns)."""
    import matplotlib.dates as mdates
    import numpy as np

    from fleetlm.plots import png

    if not series:
        raise ValueError("plot_cost_over_time needs at least one point")
    # local wall-clock time, as the user reads --since
    ts = np.array([datetime.fromtimestamp(t) for t, _, _ in series], dtype="datetime64[ms]")
    actual = np.cumsum([a for _, a, _ in series])
    baseline = np.cumsum([b for _, _, b in series])
    with png(path, (8, 5)) as (_, ax):
        ax.plot(ts, baseline, color="red", linestyle="--", label="all-large baseline")
        ax.plot(ts, actual, color="tab:blue", linewidth=1.8, label="actual (local + upstream)")
        ax.fill_between(ts, actual, baseline, color="tab:green", alpha=0.15, label="saved")
        ax.set_ylabel("Cumulative cost (USD)")
        ax.set_title(title)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    return Path(path)


@dataclass
class Savings:
    """What :meth:`Ledger.savings` returned for the window (``summary``), where the ledger
    is (its file, or the store's masked URL), and the plot written (None without one, or
    without rows)."""

    summary: dict[str, Any]
    ledger: Path | str
    plot: Path | None


def savings(ledger: Path | None, since: str | None, route: str | None,
            plot: Path | None, state_db: str | None = None) -> Savings:
    """The savings in the ledger file ``ledger``, else in the state store ``state_db``
    (default: $FLEETLM_STATE_DB, else the data folder's state.db) since ``since`` for
    ``route`` (all when None); with ``plot``, the cost-over-time PNG there."""
    from fleetlm.router.ledger import open_readonly

    since_ts = parse_since(since) if since is not None else None
    with open_readonly(ledger, state_db) as led:
        s = led.savings(since_ts, route=route)
        series = led.cost_over_time(since_ts, route=route) if plot is not None else []
        path = led.path
    plot_path = None
    if series:
        assert plot is not None
        plot_path = plot_cost_over_time(series, plot, title="Cost over time" + (
            f": route {route}" if route else ""))
    return Savings(s, path, plot_path)


def usd(x: float) -> str:
    return f"${x:,.2f}" if abs(x) >= 100 else f"${x:.4f}"


def savings_table(s: dict[str, Any], title: str) -> Any:
    """A rich Table: one row per route (and a total when there are several), decisions as
    shares, tokens and costs."""
    from rich.table import Table

    span = " to ".join(datetime.fromtimestamp(s[k]).strftime("%Y-%m-%d %H:%M")
                       for k in ("first_ts", "last_ts"))
    table = Table(title=f"{title} ({span})")
    for col in ("route", "requests", "small", "large", "fallback", "blocked", "tokens in",
                "tokens out", "local", "upstream", "actual", "all-large", "saved", "saved %"):
        table.add_column(col, justify="left" if col == "route" else "right")

    def row(name: str, a: dict[str, Any]) -> list[str]:
        n = a["requests"]
        frac = a["saved_fraction"]
        return ([name, f"{n:,}"] + [f"{a['decisions'][d] / n:.1%}" for d in
                                    ("small", "large", "fallback", "blocked")]
                + [f"{a['prompt_tokens']:,}", f"{a['completion_tokens']:,}"]
                + [usd(a[k]) for k in ("local_cost_usd", "upstream_cost_usd", "actual_cost_usd",
                                       "baseline_cost_usd", "saved_usd")]
                + ["n/a" if frac is None else f"{frac:.1%}"])

    for name, agg in sorted(s["by_route"].items()):
        table.add_row(*row(name, agg))
    if len(s["by_route"]) > 1:
        table.add_row(*row("total", s), style="bold")
    return table


def savings_notes(s: dict[str, Any], plot: Path | None, plot_path: Path | None) -> list[str]:
    """What the table's figures mean and leave out."""
    notes = ["local cost charges each request the whole machine for its wall time, so under "
             "batched load the savings shown are a lower bound"]
    if s["rows_without_baseline"]:
        notes.append(f"{s['rows_without_baseline']} request(s) had no all-large baseline (no "
                     "upstream, or blocked): counted at their actual cost")
    if s["usage_estimated"]:
        notes.append(f"{s['usage_estimated']} request(s) with estimated token counts")
    if plot is not None:
        notes.append(f"plot: {plot_path}")
    return notes
