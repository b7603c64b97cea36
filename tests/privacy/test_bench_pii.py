"""fleetlm bench pii on a 20-row dataset written here (same format as presidio's
synth_dataset_v2_train.json): the command runs and the JSON has the per-type figures;
the scoring rule itself on hand-made spans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleetlm.bench.pii import _Span, score
from fleetlm.cli import app

# (template, {slot: (dataset type, value)}): slots are filled and their offsets recorded
TEMPLATES = [
    ("My name is {p} and my email is {e}.", {"p": ("PERSON", "John Smith"),
                                             "e": ("EMAIL_ADDRESS", "john.smith@example.com")}),
    ("Call {p} on {t}.", {"p": ("PERSON", "Maria Garcia"), "t": ("PHONE_NUMBER", "212-555-0143")}),
    ("Charge card {c} please.", {"c": ("CREDIT_CARD", "4111 1111 1111 1111")}),
    ("She is {a} years old.", {"a": ("AGE", "42")}),
    ("I moved to {g} last year.", {"g": ("GPE", "Chicago")}),
]


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        template, slots = TEMPLATES[i % len(TEMPLATES)]
        text = template
        spans: list[dict[str, Any]] = []
        for slot, (etype, value) in slots.items():
            start = text.index("{" + slot + "}")
            text = text.replace("{" + slot + "}", value, 1)
            spans.append({"entity_type": etype, "entity_value": value,
                          "start_position": start, "end_position": start + len(value)})
        for s in spans:  # later substitutions shift nothing before them; check anyway
            assert text[s["start_position"]:s["end_position"]] == s["entity_value"]
        rows.append({"full_text": text, "masked": "", "spans": spans, "template_id": i,
                     "metadata": None})
    return rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pii") / "synth.json"
    path.write_text(json.dumps(_rows(20)))
    return path


def test_bench_pii_writes_per_type_json(dataset, tmp_path):
    out = tmp_path / "pii.json"
    r = CliRunner().invoke(app, ["bench", "pii", "--data", str(dataset), "--limit", "20",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["sentences"] == 20
    for t in ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "LOCATION"):
        row = data["per_type"][t]
        assert {"gold", "predicted", "precision", "recall", "f2"} <= set(row)
        assert 0.0 <= row["recall"] <= 1.0
    assert data["per_type"]["EMAIL_ADDRESS"]["recall"] == 1.0
    assert data["per_type"]["CREDIT_CARD"] == {
        "gold": 4, "predicted": 4, "gold_found": 4, "predicted_correct": 4,
        "precision": 1.0, "recall": 1.0, "f2": 1.0}
    # AGE has no presidio recognizer: out of the per-type table, counted separately
    assert "AGE" not in data["per_type"] and data["undetectable_gold"] == {"AGE": 4}
    assert data["per_gold_type"]["AGE"]["why_not"] == "no presidio recognizer"
    assert data["overall_with_undetectable"]["gold"] == data["overall"]["gold"] + 4
    assert data["detect_s"] > 0 and "environment" in data
    lat = data["per_request_ms"]
    assert lat["n"] == 20 and 0 < lat["p50"] <= lat["p99"]
    assert "PERSON" in r.output and "F2" in r.output and "per request" in r.output


def test_bench_pii_limit_and_missing_data(dataset, tmp_path):
    out = tmp_path / "pii.json"
    r = CliRunner().invoke(app, ["bench", "pii", "--data", str(dataset), "--limit", "3",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["sentences"] == 3
    r = CliRunner().invoke(app, ["bench", "pii", "--data", str(tmp_path / "nope.json")])
    assert r.exit_code == 2 and "--data" in r.output and "no such file" in r.output


def test_score_overlap_rule():
    rows = [("x" * 60, [_Span(0, 10, "PERSON"), _Span(20, 23, "STREET_ADDRESS"),
                        _Span(24, 30, "STREET_ADDRESS"), _Span(40, 45, "GPE"), _Span(50, 52, "AGE")])]
    preds = [[_Span(5, 12, "PERSON"),  # overlaps the PERSON: a hit both ways
              _Span(20, 30, "LOCATION"),  # one prediction recalls both address pieces
              _Span(40, 45, "PERSON"),  # right place, wrong type
              _Span(55, 58, "LOCATION")]]  # on nothing
    res = score(rows, preds, ("PERSON", "LOCATION"))
    assert res["per_type"]["PERSON"] == {
        "gold": 1, "predicted": 2, "gold_found": 1, "predicted_correct": 1,
        "precision": 0.5, "recall": 1.0, "f2": pytest.approx(5 * 0.5 / (4 * 0.5 + 1))}
    assert res["per_type"]["LOCATION"]["recall"] == pytest.approx(2 / 3)
    assert res["per_type"]["LOCATION"]["precision"] == 0.5
    assert res["undetectable_gold"] == {"AGE": 1}
    assert res["any_type"]["recall"] == pytest.approx(4 / 5)  # all but AGE are covered
    assert res["any_type"]["precision"] == pytest.approx(3 / 4)
