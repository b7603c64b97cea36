"""PNG figures for reports (tuning, routing, savings): one place that picks the headless
backend, creates the folder, saves and always closes the figure. What is drawn is the
caller's business; this module knows matplotlib and files, nothing of the data."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def png(path: str | Path, figsize: tuple[float, float]) -> Iterator[tuple[Any, Any]]:
    """``with png(path, (8, 5)) as (fig, ax): ...`` draws on a new figure, saved to ``path``
    (its folder created) when the block ends without an error; the figure is closed either
    way. matplotlib is imported here, with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield fig, ax
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
