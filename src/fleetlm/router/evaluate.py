"""Route evaluation: how much quality a router buys per escalated request (RouteLLM's metrics).

Inputs are per-prompt arrays: the policy's ``scores`` (fleetlm convention, higher = keep on the
small model, see :mod:`fleetlm.router.policies`) and the outcomes ``small_correct`` and
``large_correct`` (did each model answer that prompt correctly). An escalated prompt scores
``large_correct``, a kept one ``small_correct``.

Definitions (following RouteLLM, Ong et al. 2024, arXiv:2406.18665, and its
``routellm/evals/evaluate.py``; fractions here, percent there):

- Curve: sweep the threshold from "escalate nothing" to "escalate everything". At each
  achievable threshold (one per distinct score) record (share escalated, hybrid accuracy).
  Prompts with equal scores move together; between two points the curve is linear, which is
  the expected accuracy when ties are broken at random.
- PGR(s) (performance gap recovered) = (acc(s) - acc_small) / (acc_large - acc_small), where
  acc_small / acc_large are the always-small / always-large accuracies (acc(0) and acc(1)).
- APGR = the area under PGR over share escalated from 0 to 1 (trapezoids over the curve's
  points). Equivalently (AUC - acc_small) / (acc_large - acc_small), RouteLLM's formula. A
  random router's expected curve is the straight line, APGR = 0.5; a perfect router escalates
  exactly the prompts where only the large model is right first and gets close to 1.
  RouteLLM samples only 11 thresholds (10 quantile bins); :func:`resample` reproduces that
  grid, and APGR on it differs from the exact curve's by the trapezoid error (~0.01 or less).
- CPT(x) (call-performance threshold) = the minimum share of calls to the large model needed
  to reach PGR >= x, read off the piecewise-linear curve (RouteLLM interpolates the same
  curve with np.interp, which assumes accuracy rises monotonically). The random router's
  expected CPT(x) is x.

Also the plot: accuracy against share escalated for several routers, with the always-small
and always-large levels, the random line and the oracle. This module computes metrics from
arrays; it does not run models or policies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

CPT_LEVELS = (0.5, 0.8, 0.95)


@dataclass(frozen=True)
class Curve:
    """Hybrid accuracy against share escalated; points sorted by share, from 0 to 1.

    share[i]      fraction of prompts sent to the large model         (k,)
    accuracy[i]   hybrid accuracy at that share                         (k,)
    threshold[i]  a threshold reaching it with ``decide`` (score >= t -> small): midway
                  between the highest escalated and the lowest kept score (k,)
    """

    share: NDArray[np.float64]
    accuracy: NDArray[np.float64]
    threshold: NDArray[np.float64]

    @property
    def acc_small(self) -> float:
        return float(self.accuracy[0])

    @property
    def acc_large(self) -> float:
        return float(self.accuracy[-1])

    def pgr(self) -> NDArray[np.float64]:
        gap = self.acc_large - self.acc_small
        if gap == 0:
            return np.full_like(self.accuracy, np.nan)
        return (self.accuracy - self.acc_small) / gap


def _outcomes(scores: ArrayLike, small_correct: ArrayLike, large_correct: ArrayLike
              ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    a = np.asarray(small_correct, dtype=np.float64).ravel()
    b = np.asarray(large_correct, dtype=np.float64).ravel()
    if not (len(s) == len(a) == len(b)):
        raise ValueError(f"scores, small_correct and large_correct differ in length "
                         f"({len(s)}, {len(a)}, {len(b)})")
    if len(s) == 0:
        raise ValueError("no prompts to evaluate")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s, a, b


def routing_curve(scores: ArrayLike, small_correct: ArrayLike, large_correct: ArrayLike) -> Curve:
    """The exact curve: one point per achievable threshold (O(n log n))."""
    s, a, b = _outcomes(scores, small_correct, large_correct)
    n = len(s)
    order = np.argsort(s, kind="stable")
    s, a, b = s[order], a[order], b[order]
    # escalating the k lowest scores: correct = sum(b[:k]) + sum(a[k:])
    cum_gain = np.concatenate([[0.0], np.cumsum(b - a)])  # (n+1,)
    # achievable k: 0, n, and every boundary between two distinct scores
    ks = np.concatenate([[0], np.flatnonzero(np.diff(s) > 0) + 1, [n]])
    acc = (a.sum() + cum_gain[ks]) / n
    lo = np.concatenate([[0.0], s])[ks]  # highest escalated score (0 when none)
    hi = np.concatenate([s, [1.0]])[ks]  # lowest kept score (1 when none)
    thr = np.clip((lo + hi) / 2.0, 0.0, 1.0)
    return Curve(share=ks / n, accuracy=acc, threshold=thr)


def resample(curve: Curve, shares: ArrayLike) -> Curve:
    """The curve read at the given shares (linear between points); thresholds from the
    nearest point at or above each share. ``resample(c, np.linspace(0, 1, 11))`` is
    RouteLLM's 10-bin grid."""
    x = np.asarray(shares, dtype=np.float64)
    acc = np.interp(x, curve.share, curve.accuracy)
    idx = np.clip(np.searchsorted(curve.share, x, side="left"), 0, len(curve.share) - 1)
    return Curve(share=x, accuracy=acc, threshold=curve.threshold[idx])


def apgr(curve: Curve) -> float:
    """Average performance gap recovered: the area under PGR(share) over [0, 1]."""
    pgr = curve.pgr()
    width = float(curve.share[-1] - curve.share[0])
    if width <= 0 or np.isnan(pgr).any():
        return float("nan")
    area = float(np.sum((pgr[1:] + pgr[:-1]) / 2.0 * np.diff(curve.share)))
    return area / width


def cpt(curve: Curve, level: float) -> float:
    """Call-performance threshold: the least share escalated with PGR >= level (NaN if never)."""
    pgr = curve.pgr()
    if np.isnan(pgr).any():
        return float("nan")
    hit = np.flatnonzero(pgr >= level - 1e-12)
    if len(hit) == 0:
        return float("nan")
    i = int(hit[0])
    if i == 0:
        return float(curve.share[0])
    # crossing inside the segment (i-1, i): pgr[i-1] < level <= pgr[i]
    x0, x1, y0, y1 = curve.share[i - 1], curve.share[i], pgr[i - 1], pgr[i]
    return float(x0 + (level - y0) * (x1 - x0) / (y1 - y0))


def oracle_curve(small_correct: ArrayLike, large_correct: ArrayLike) -> Curve:
    """The best any router can do: escalate first the prompts only the large model gets
    right, then those where escalating changes nothing, and last those only the small gets."""
    a = np.asarray(small_correct, dtype=np.float64).ravel()
    b = np.asarray(large_correct, dtype=np.float64).ravel()
    gain = b - a  # +1 escalation helps, 0 neutral, -1 hurts
    return routing_curve(-gain + 1e-9 * np.arange(len(a)) / max(len(a), 1), a, b)


@dataclass
class RouterReport:
    name: str
    n: int
    acc_small: float
    acc_large: float
    apgr: float
    cpt: dict[float, float]  # level -> share escalated
    curve: Curve = field(repr=False)

    def as_dict(self, points: int | None = 21) -> dict[str, Any]:
        """JSON-ready; ``points`` resamples the curve to that many evenly spaced shares."""
        c = self.curve if points is None else resample(self.curve, np.linspace(0, 1, points))
        return {
            "name": self.name, "n": self.n, "acc_small": self.acc_small,
            "acc_large": self.acc_large, "apgr": _finite(self.apgr),
            # RouteLLM samples 11 thresholds (10 quantile bins); the same curve on that grid
            "apgr_11_points": _finite(apgr(resample(self.curve, np.linspace(0, 1, 11)))),
            "cpt": {f"{int(round(k * 100))}%": _finite(v) for k, v in self.cpt.items()},
            "curve": {"share": c.share.tolist(), "accuracy": c.accuracy.tolist(),
                      "threshold": c.threshold.tolist()},
        }


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def report_from_curve(name: str, curve: Curve, n: int,
                      levels: Sequence[float] = CPT_LEVELS) -> RouterReport:
    return RouterReport(name=name, n=n, acc_small=curve.acc_small, acc_large=curve.acc_large,
                        apgr=apgr(curve), cpt={lv: cpt(curve, lv) for lv in levels},
                        curve=curve)


def evaluate_scores(name: str, scores: ArrayLike, small_correct: ArrayLike,
                    large_correct: ArrayLike, levels: Sequence[float] = CPT_LEVELS
                    ) -> RouterReport:
    """APGR and CPTs of one router's scores on labelled prompts."""
    curve = routing_curve(scores, small_correct, large_correct)
    return report_from_curve(name, curve, int(np.asarray(scores).size), levels)


def format_report(reports: Sequence[RouterReport]) -> str:
    """A RouteLLM-style table: one row per router."""
    if not reports:
        return "(no routers)"
    levels = list(reports[0].cpt)
    head = ["router", "APGR"] + [f"CPT({int(round(lv * 100))}%)" for lv in levels]
    rows = [head]
    for r in reports:
        rows.append([r.name, _fmt(r.apgr, "{:.3f}")]
                    + [_fmt(r.cpt[lv], "{:.1%}") for lv in levels])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in rows]
    r0 = reports[0]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"n={r0.n}  always-small accuracy {r0.acc_small:.1%}  "
                 f"always-large accuracy {r0.acc_large:.1%}")
    return "\n".join(lines)


def _fmt(x: float, spec: str) -> str:
    return "n/a" if math.isnan(x) else spec.format(x)


def plot_curves(curves: Mapping[str, Curve], path: str | Path, title: str = "Routing",
                oracle: Curve | None = None, small_label: str = "always small",
                large_label: str = "always large") -> Path:
    """PNG of accuracy against share escalated: one line per router, the always-small and
    always-large levels, the random router's expected line, and the oracle when given."""
    from fleetlm.plots import png

    if not curves:
        raise ValueError("plot_curves needs at least one curve")
    first = next(iter(curves.values()))
    with png(path, (8, 5)) as (_, ax):
        for name, c in curves.items():
            ax.plot(c.share * 100, c.accuracy * 100, label=name, linewidth=1.6)
        ax.plot([0, 100], [first.acc_small * 100, first.acc_large * 100], color="grey",
                linestyle=":", label="random (expected)")
        ax.axhline(first.acc_small * 100, color="grey", linestyle="--", label=small_label)
        ax.axhline(first.acc_large * 100, color="red", linestyle="--", label=large_label)
        if oracle is not None:
            ax.plot(oracle.share * 100, oracle.accuracy * 100, color="black", linewidth=0.8,
                    label="oracle")
        ax.set_xlabel("Calls escalated to the large model (%)")
        ax.set_ylabel("Accuracy (%)")
        ax.set_title(title)
        ax.set_xlim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return Path(path)
