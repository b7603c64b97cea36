"""Training a classifier router from past outcomes (``fleetlm route train``): describe the
data, embed the prompts, fit the logistic regression, measure it in-sample, cross-validated
and against random, and save it with the checksum of the data it saw.

Also :func:`cross_val_scores`, the out-of-fold scores that both this command and
``fleetlm bench route`` report.

This module knows outcomes files, embedders and the router's file; it knows nothing of the
command line or of serving. What it has to say goes through the ``echo`` callback, line by
line, in the order the work is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fleetlm.router.classifier import Target, TrainedRouter
    from fleetlm.router.evaluate import RouterReport

HELD_OUT_APGR_WARNING = 0.55  # below this, a held-out APGR is close to a coin's 0.5


def cross_val_scores(x: np.ndarray, small: np.ndarray, large: np.ndarray, folds: int,
                     seed: int, target: Target, C: float, model_id: str) -> np.ndarray:
    """Out-of-fold scores (fleetlm convention) for every row."""
    from sklearn.model_selection import StratifiedKFold

    from fleetlm.router.classifier import fit_router, labels

    y = labels(small, large, target)
    scores = np.zeros(len(y), dtype=np.float64)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        r = fit_router(x[train], small[train], large[train], model_id, target=target, C=C)
        scores[test] = r.scores_from_embeddings(x[test])
    return scores


@dataclass
class TrainRun:
    """A trained and saved router and its reports: in-sample, cross-validated (when it
    ran), random."""

    router: TrainedRouter
    reports: list[RouterReport]
    out: Path

    @property
    def held_out(self) -> RouterReport | None:
        return self.reports[1] if len(self.reports) == 3 else None

    def warning(self) -> str | None:
        """A warning when the held-out figures say the router barely beats a coin."""
        honest = self.held_out
        if honest is None or honest.apgr >= HELD_OUT_APGR_WARNING:
            return None
        return (f"warning: held-out APGR {honest.apgr:.3f} is close to random (0.5): "
                "this router barely beats a coin on unseen prompts; more or cleaner data "
                "may help")

    def next_steps(self) -> str:
        from fleetlm.router.classifier import router_file

        out = self.out
        return (f"saved {router_file(out)}\nuse it in a route: policy: classifier, "
                f"classifier: {out}, threshold: the file of\n  fleetlm route calibrate "
                f"--router {out} --data HELD_OUT.jsonl --target-escalation 0.2 "
                f"--out {out / 'threshold.json'}")


def describe_outcomes(data: Path, small: np.ndarray, large: np.ndarray, y: np.ndarray,
                      target: str) -> list[str]:
    """Who is right how often, and the label's balance."""
    n = len(y)
    return [f"{data}: {n} rows; small model right on {small.mean():.1%}, large model "
            f"on {large.mean():.1%}",
            f"  only large right {int((~small & large).sum())}, only small right "
            f"{int((small & ~large).sum())}, both {int((small & large).sum())}, "
            f"neither {int((~small & ~large).sum())}",
            f"  label {target}: {int(y.sum())} positive ({y.mean():.1%}), "
            f"{n - int(y.sum())} negative"]


def train_from_outcomes(data: Path, out: Path, *, embedding: str, target: Target, C: float,
                        folds: int, seed: int, echo: Callable[[str], Any]) -> TrainRun:
    """Learn a router from the outcomes file ``data`` and save it in ``out``; ``folds`` 0
    skips cross-validation."""
    from fleetlm.router.calibrate import load_outcomes, outcome_arrays
    from fleetlm.router.classifier import fit_router, labels, load_embedder
    from fleetlm.router.evaluate import evaluate_scores, format_report
    from fleetlm.router.outcome_scores import embed_prompts, sha256_file
    from fleetlm.router.policies import RandomPolicy, RouteContext

    prompts, small, large = outcome_arrays(load_outcomes(data))
    n = len(prompts)
    y = labels(small, large, target)
    for line in describe_outcomes(data, small, large, y, target):
        echo(line)

    embedder = load_embedder(embedding)
    t0 = time.perf_counter()
    x = embed_prompts(embedder, prompts, "route train")
    dt = time.perf_counter() - t0
    echo(f"embedded {n} prompts with {embedder.model_id} in {dt:.1f} s "
         f"({1000 * dt / n:.2f} ms a prompt, in batches)")
    router = fit_router(x, small, large, embedder.model_id, target=target, C=C,
                        embedder=embedder)

    reports = [evaluate_scores("in-sample (optimistic)", router.scores_from_embeddings(x),
                               small, large)]
    minority = int(min(y.sum(), n - y.sum()))
    if folds and minority < folds:
        echo(f"cross-validation skipped: {minority} row(s) of the rarer label, "
             f"--folds {folds} needs at least {folds}")
    elif folds:
        cv = cross_val_scores(x, small, large, folds, seed, target, C, embedder.model_id)
        reports.append(evaluate_scores(f"{folds}-fold cross-validated", cv, small, large))
    rnd = RandomPolicy(seed)
    reports.append(evaluate_scores("random", [rnd.score(RouteContext(p)) for p in prompts],
                                   small, large))
    echo(format_report(reports))

    router.meta.update({
        "data": str(data), "data_sha256": sha256_file(data), "seed": seed,
        "in_sample": reports[0].as_dict(points=None) | {"curve": None},
        "cross_validated": (reports[1].as_dict(points=None) | {"curve": None, "folds": folds}
                            if len(reports) == 3 else None),
    })
    router.save(out)
    return TrainRun(router, reports, out)
