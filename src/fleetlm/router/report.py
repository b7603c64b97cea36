"""The savings report's helpers (``fleetlm report savings``): reading ``--since`` and plotting
cumulative cost over time, actual against the all-large baseline.

The numbers come from :meth:`fleetlm.router.ledger.Ledger.savings` and
:meth:`~fleetlm.router.ledger.Ledger.cost_over_time`; this module only parses and draws.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

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
