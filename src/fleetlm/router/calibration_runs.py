"""Calibrating a route's threshold from a sample (``fleetlm route calibrate``): the sample is
an outcomes file (scored by a trained router, or carrying the scores a policy recorded) or
the scores the ledger recorded for one route; the threshold file is written with what was
reached.

The quantile arithmetic is :mod:`fleetlm.router.calibrate`'s; this module picks the sample
and the policy, and phrases the result. It knows nothing of the command line (the settings
arrive checked, as :class:`fleetlm.router.options.CalibrateSettings`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetlm.errors import FleetLMError

if TYPE_CHECKING:
    from fleetlm.router.calibrate import Calibration
    from fleetlm.router.options import CalibrateSettings


@dataclass
class CalibrationRun:
    """A threshold written to ``written``, for ``policy``, from ``source``;
    ``acc_levels`` (always-small, always-large accuracy) when the sample has outcomes."""

    cal: Calibration
    policy: str
    source: str
    acc_levels: tuple[float, float] | None
    written: Path

    def lines(self, settings: CalibrateSettings) -> list[str]:
        cal, acc_levels = self.cal, self.acc_levels
        goal = (f"target {settings.target_escalation:.1%}"
                if settings.target_escalation is not None else
                "least escalation reaching the quality target")
        out = [f"threshold {cal.threshold:.4f} for policy {self.policy} (n={cal.n}, "
               f"{self.source})",
               f"  escalates {cal.share_escalated:.1%} of the sample ({goal})"]
        if cal.accuracy is not None and acc_levels is not None:
            if "accuracy_goal" in cal.target:
                out.append(f"  quality goal {cal.target['accuracy_goal']:.1%}"
                           + (f" ({settings.target_quality:.0%} of always-large)"
                              if settings.relative_to_large else ""))
            out.append(f"  hybrid accuracy {cal.accuracy:.1%} (always-small "
                       f"{acc_levels[0]:.1%}, always-large {acc_levels[1]:.1%})")
        out.append(f"wrote {self.written}; a route with policy: {self.policy} takes it as "
                   f"threshold: {self.written}")
        return out


def calibrate(out: Path, s: CalibrateSettings, *, warn: Callable[[str], None]
              ) -> CalibrationRun:
    """Choose the threshold on the ledger's scores for ``s.route`` or on ``s.data``, and
    write it to ``out``. ``s`` comes checked (:meth:`CalibrateSettings.check`)."""
    from fleetlm.router.calibrate import calibration_meta, write_threshold

    acc_levels: tuple[float, float] | None
    if s.route is not None:
        cal, policy_used, source, acc_levels = calibrate_on_ledger(
            s.route, s.ledger, s.since, s.policy, s.target_escalation or 0.0)
    else:
        assert s.data is not None
        cal, policy_used, source, acc_levels = calibrate_on_outcomes(
            s.data, s.router, s.policy, s.scores_key, s.target_escalation, s.target_quality,
            s.relative_to_large, warn=warn)
    extra: dict[str, Any] = {"route": s.route} if s.route is not None else {}
    if s.router is not None:
        extra["router"] = str(s.router)
    if acc_levels is not None:
        extra["acc_small"], extra["acc_large"] = acc_levels
    written = write_threshold(out, cal.threshold,
                              calibration_meta(cal, policy_used, source, extra))
    return CalibrationRun(cal, policy_used, source, acc_levels, written)


def calibrate_on_outcomes(data: Path, router: Path | None, policy: str | None, scores_key: str,
                          target_escalation: float | None, target_quality: float | None,
                          relative_to_large: bool, *, warn: Callable[[str], None]
                          ) -> tuple[Calibration, str, str, tuple[float, float]]:
    from fleetlm.router.calibrate import (
        load_outcomes,
        outcome_arrays,
        threshold_for_escalation,
        threshold_for_quality,
    )
    from fleetlm.router.outcome_scores import recorded_scores, trained_router_scores

    prompts, small, large = outcome_arrays(load_outcomes(data))
    if router is not None:
        scores = trained_router_scores(router, data, prompts, warn=warn,
                                       label="route calibrate")[1]
        policy = "classifier"
    else:
        scores = recorded_scores(data, scores_key)
    assert policy is not None
    if target_quality is not None:
        cal = threshold_for_quality(scores, small, large, target_quality,
                                    relative_to="large" if relative_to_large else "absolute")
    else:
        assert target_escalation is not None
        cal = threshold_for_escalation(scores, target_escalation, small, large)
    return cal, policy, str(data), (float(small.mean()), float(large.mean()))


def calibrate_on_ledger(route: str, ledger: Path | None, since: str | None, policy: str | None,
                        target: float) -> tuple[Calibration, str, str, None]:
    from fleetlm.router.calibrate import threshold_for_escalation
    from fleetlm.router.ledger import open_readonly
    from fleetlm.router.report import parse_since

    since_ts = parse_since(since) if since is not None else None
    with open_readonly(ledger) as led:
        rows = led.query(since_ts, route=route)
        routes = sorted(led.savings(since_ts)["by_route"]) if not rows else []
    window = f" since {since}" if since is not None else ""
    if not rows:
        raise FleetLMError(f"--route {route}: no requests in {led.path}{window} (routes there: "
                           f"{', '.join(routes) or 'none'})")
    scored = [e for e in rows if e.score is not None]
    by_policy = Counter(e.policy for e in scored)
    if policy is not None:
        scored = [e for e in scored if e.policy == policy]
    if not scored:
        raise FleetLMError(f"--route {route}: none of its {len(rows)} requests{window} carries "
                           "a score" + (f" from policy {policy}" if policy else "")
                           + " (rules and always-* decide without one)")
    if policy is None:
        if len(by_policy) > 1:
            counts = ", ".join(f"{p or '(none)'} {k}" for p, k in by_policy.most_common())
            raise FleetLMError(f"--route {route}: scores from several policies ({counts}); "
                               "pick one with --policy")
        policy = next(iter(by_policy))
        if not policy:
            raise FleetLMError(f"--route {route}: the rows name no policy; give --policy")
    cal = threshold_for_escalation([e.score for e in scored if e.score is not None], target)
    return cal, policy, f"ledger {led.path}, route {route}{window}", None
