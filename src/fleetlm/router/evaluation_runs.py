"""Evaluating routers on an outcomes file (``fleetlm route eval``): a trained router's scores
and/or the scores recorded in the file, against random and the oracle; the RouteLLM-style
report, the accuracy-against-share-escalated plot and the JSON.

The metrics are :mod:`fleetlm.router.evaluate`'s; this module gathers the scores and writes
the files. It knows nothing of the command line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetlm.router.evaluate import RouterReport


@dataclass
class EvalRun:
    reports: list[RouterReport]
    plot: Path
    json_out: Path | None

    def lines(self) -> list[str]:
        from fleetlm.router.evaluate import format_report

        return [format_report(self.reports),
                f"plot: {self.plot}" + (f"\njson: {self.json_out}"
                                        if self.json_out is not None else "")]


def evaluate_outcomes(data: Path, *, router: Path | None, scores_key: str | None,
                      plot: Path | None, json_out: Path | None, seed: int,
                      warn: Callable[[str], None]) -> EvalRun:
    """Reports for ``router`` (when given) and the recorded ``scores_key`` (default
    ``score`` without a router), random and the oracle. The plot goes to ``plot``, else
    beside ``json_out``, else ./route-eval.png."""
    from fleetlm.router.calibrate import load_outcomes, outcome_arrays
    from fleetlm.router.evaluate import (
        evaluate_scores,
        oracle_curve,
        plot_curves,
        report_from_curve,
    )
    from fleetlm.router.outcome_scores import recorded_scores, trained_router_scores
    from fleetlm.router.policies import RandomPolicy, RouteContext

    prompts, small, large = outcome_arrays(load_outcomes(data))
    reports = []
    if router is not None:
        trained, scores = trained_router_scores(router, data, prompts, warn=warn,
                                                label="route eval")
        reports.append(evaluate_scores(f"classifier [{trained.embedding_model}]", scores,
                                       small, large))
    if router is None or scores_key is not None:
        key = scores_key or "score"
        reports.append(evaluate_scores(f"scores [{key}]", recorded_scores(data, key),
                                       small, large))
    rnd = RandomPolicy(seed)
    reports.append(evaluate_scores("random", [rnd.score(RouteContext(p)) for p in prompts],
                                   small, large))
    oracle = report_from_curve("oracle", oracle_curve(small, large), len(prompts))
    reports.append(oracle)
    plot_path = plot if plot is not None else (
        json_out.with_suffix(".png") if json_out is not None else Path("route-eval.png"))
    plot_curves({r.name: r.curve for r in reports if r is not oracle}, plot_path,
                title=f"Routing on {data.name} ({len(prompts)} prompts)",
                oracle=oracle.curve)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({
            "data": str(data), "n": len(prompts), "acc_small": oracle.acc_small,
            "acc_large": oracle.acc_large, "routers": [r.as_dict() for r in reports],
            "router": str(router) if router is not None else None, "seed": seed,
            "plot": str(plot_path)}, indent=2) + "\n", encoding="utf-8")
    return EvalRun(reports, plot_path, json_out)
