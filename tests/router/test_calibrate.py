"""Thresholds from data, and the RouteLLM metrics on hand-made curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fleetlm.router.calibrate import (
    calibration_meta,
    load_outcomes,
    read_threshold,
    threshold_for_escalation,
    threshold_for_quality,
    write_threshold,
)
from fleetlm.router.evaluate import (
    apgr,
    cpt,
    evaluate_scores,
    format_report,
    oracle_curve,
    plot_curves,
    resample,
    routing_curve,
)
from fleetlm.router.policies import decide


def escalated_share(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean([decide(float(s), threshold) == "large" for s in scores]))


# --- thresholds -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.0, 0.05, 0.2, 0.5, 0.95, 1.0])
def test_threshold_for_escalation_hits_the_share(target: float) -> None:
    scores = np.random.default_rng(0).beta(2, 5, size=1000)  # skewed, like real scores
    cal = threshold_for_escalation(scores, target)
    assert cal.share_escalated == pytest.approx(target, abs=1e-9)
    assert escalated_share(scores, cal.threshold) == pytest.approx(target, abs=1e-9)
    assert 0.0 <= cal.threshold <= 1.0 and cal.accuracy is None


def test_threshold_for_escalation_with_ties_picks_the_closest_achievable() -> None:
    scores = np.array([0.2] * 30 + [0.6] * 40 + [0.9] * 30)
    cal = threshold_for_escalation(scores, 0.25)  # achievable: 0, .3, .7, 1
    assert cal.share_escalated == pytest.approx(0.3)
    assert escalated_share(scores, cal.threshold) == pytest.approx(0.3)


def _toy_outcomes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # 10 prompts; the small model is right on the 6 highest-scored, the large on all but one
    scores = np.linspace(0.05, 0.95, 10)
    small = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], dtype=bool)
    large = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1, 1], dtype=bool)
    return scores, small, large


def test_threshold_for_quality_is_the_least_escalation_reaching_the_target() -> None:
    scores, small, large = _toy_outcomes()
    # accuracy by share escalated: 0:.6 .1:.7 .2:.8 .3:.8 .4:.9 ... 1.0:.9
    cal = threshold_for_quality(scores, small, large, 0.8)
    assert cal.share_escalated == pytest.approx(0.2)
    assert cal.accuracy == pytest.approx(0.8)
    assert escalated_share(scores, cal.threshold) == pytest.approx(0.2)
    cal = threshold_for_quality(scores, small, large, 0.9)
    assert cal.share_escalated == pytest.approx(0.4)
    # relative to the always-large accuracy (0.9): 8/9 of it is 0.8
    rel = threshold_for_quality(scores, small, large, 8 / 9, relative_to="large")
    assert rel.share_escalated == pytest.approx(0.2)
    with pytest.raises(ValueError, match="out of reach"):
        threshold_for_quality(scores, small, large, 0.95)


def test_threshold_file_round_trip(tmp_path: Path) -> None:
    scores, small, large = _toy_outcomes()
    cal = threshold_for_escalation(scores, 0.3, small, large)
    meta = calibration_meta(cal, policy="classifier", data="ledger.jsonl",
                            extra={"embedding_model": "all-MiniLM-L6-v2"})
    path = write_threshold(tmp_path / "t" / "threshold.json", cal.threshold, meta)
    doc = read_threshold(path)
    assert doc["threshold"] == pytest.approx(cal.threshold)
    assert doc["policy"] == "classifier" and doc["target"] == {"escalation": 0.3}
    assert doc["data"] == "ledger.jsonl" and doc["accuracy"] == pytest.approx(cal.accuracy)
    with pytest.raises(ValueError, match="lacks policy"):
        write_threshold(tmp_path / "x.json", 0.5, {"target": {}, "data": "d"})
    (tmp_path / "bad.json").write_text(json.dumps({"threshold": 3}))
    with pytest.raises(ValueError, match="must be a number in"):
        read_threshold(tmp_path / "bad.json")


def test_load_outcomes_reads_both_schemas_and_collects_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"prompt": "a", "small_correct": True, "large_correct": False}) + "\n\n"
        + json.dumps({"prompt": "b", "weak_correct": False, "strong_correct": True,
                      "domain": "law"}) + "\n")
    rows = load_outcomes(good)
    assert [(r.prompt, r.small_correct, r.large_correct, r.domain) for r in rows] == \
        [("a", True, False, None), ("b", False, True, "law")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n{"prompt": "c", "small_correct": "yes", '
                   '"large_correct": true}\n')
    with pytest.raises(ValueError) as e:
        load_outcomes(bad)
    assert "line 1" in str(e.value) and "line 2" in str(e.value) and "line 3" in str(e.value)


# --- metrics --------------------------------------------------------------------------------


def _gap_data(n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    # small right on the first half, large right everywhere: escalating the second half helps
    small = np.arange(n) < n // 2
    large = np.ones(n, dtype=bool)
    return small, large


def test_perfect_router_metrics() -> None:
    small, large = _gap_data()
    perfect = small.astype(float)  # the prompts small gets wrong score lowest
    rep = evaluate_scores("perfect", perfect, small, large)
    # PGR(s) = min(2s, 1): area 0.25 + 0.5
    assert rep.acc_small == pytest.approx(0.5) and rep.acc_large == pytest.approx(1.0)
    assert rep.apgr == pytest.approx(0.75)
    assert rep.cpt[0.5] == pytest.approx(0.25)
    assert rep.cpt[0.8] == pytest.approx(0.40)
    assert rep.cpt[0.95] == pytest.approx(0.475)
    # the oracle is the same curve
    assert apgr(oracle_curve(small, large)) == pytest.approx(0.75, abs=1e-3)


def test_worst_router_and_ties() -> None:
    small, large = _gap_data()
    worst = evaluate_scores("worst", 1.0 - small, small, large)
    assert worst.apgr == pytest.approx(0.25)
    assert worst.cpt[0.5] == pytest.approx(0.75)
    # all scores equal: only the two ends are achievable; the line between them is random
    flat = evaluate_scores("flat", np.full(len(small), 0.5), small, large)
    assert len(flat.curve.share) == 2
    assert flat.apgr == pytest.approx(0.5)
    assert flat.cpt[0.8] == pytest.approx(0.8)


def test_random_router_apgr_is_about_half() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    small = rng.random(n) < 0.6
    large = small | (rng.random(n) < 0.6)
    apgrs = [evaluate_scores("r", rng.random(n), small, large).apgr for _ in range(5)]
    assert np.mean(apgrs) == pytest.approx(0.5, abs=0.02)
    rep = evaluate_scores("r", rng.random(n), small, large)
    for lv in (0.5, 0.8):
        assert rep.cpt[lv] == pytest.approx(lv, abs=0.06)


def test_apgr_matches_routellm_formula_and_resampling() -> None:
    rng = np.random.default_rng(2)
    n = 500
    small = rng.random(n) < 0.5
    large = rng.random(n) < 0.8
    scores = np.clip(small * 0.3 + rng.random(n) * 0.7, 0, 1)
    curve = routing_curve(scores, small, large)
    auc = float(np.sum((curve.accuracy[1:] + curve.accuracy[:-1]) / 2 * np.diff(curve.share)))
    routellm = (auc - curve.acc_small) / (curve.acc_large - curve.acc_small)
    assert apgr(curve) == pytest.approx(routellm)
    coarse = resample(curve, np.linspace(0, 1, 11))  # RouteLLM's 10 bins
    assert len(coarse.share) == 11
    assert apgr(coarse) == pytest.approx(apgr(curve), abs=0.02)
    # curve thresholds reproduce their shares through decide()
    for share, thr in zip(curve.share[::50], curve.threshold[::50], strict=True):
        assert escalated_share(scores, float(thr)) == pytest.approx(share)
    assert cpt(curve, 0.5) <= cpt(curve, 0.8) <= cpt(curve, 0.95)


def test_report_table_and_plot(tmp_path: Path) -> None:
    small, large = _gap_data(200)
    reps = [evaluate_scores("perfect", small.astype(float), small, large),
            evaluate_scores("random", np.random.default_rng(0).random(200), small, large)]
    table = format_report(reps)
    assert "APGR" in table and "CPT(50%)" in table and "perfect" in table and "0.750" in table
    d = reps[0].as_dict(points=11)
    assert d["cpt"]["50%"] == pytest.approx(0.25) and len(d["curve"]["share"]) == 11
    png = plot_curves({r.name: r.curve for r in reps}, tmp_path / "route.png",
                      oracle=oracle_curve(small, large))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
