"""`fleetlm bench pii` end to end on tiny data sets (the real presidio + spaCy detector):
the JSON has every field for every set, the table and progress lines come out, and bad
options exit 2 before anything loads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

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


def rows(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        template, slots = TEMPLATES[i % len(TEMPLATES)]
        text = template
        spans: list[dict[str, Any]] = []
        for slot, (etype, value) in slots.items():
            start = text.index("{" + slot + "}")
            text = text.replace("{" + slot + "}", value, 1)
            spans.append({"entity_type": etype, "entity_value": value,
                          "start_position": start, "end_position": start + len(value)})
        for s in spans:
            assert text[s["start_position"]:s["end_position"]] == s["entity_value"]
        out.append({"full_text": text, "masked": "", "spans": spans, "template_id": i,
                    "metadata": None})
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pii") / "tiny.json"
    path.write_text(json.dumps(rows(10)))
    return path


SET_KEYS = {"data", "selection", "examples", "words", "detect_s", "examples_per_s", "typed",
            "any_type", "in_clear", "key_recall", "per_gold_type", "undetectable_gold",
            "latency_100_words_ms", "chat_round_trip_ms", "targets_met"}
PRF = {"gold", "predicted", "gold_found", "predicted_correct", "precision", "recall", "f2"}
MS = {"n", "p50", "p99", "mean", "max"}


def test_bench_pii_writes_every_field_for_every_set(dataset: Path, tmp_path: Path):
    out = tmp_path / "pii.json"
    r = CliRunner().invoke(app, ["bench", "pii", "--data", str(dataset), "--data", "support-v1",
                                 "--limit", "10", "--latency-messages", "4",
                                 "--chat-requests", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert set(data) == {"benchmark", "rules", "targets", "key_types", "config",
                         "gold_to_presidio", "load_s", "learned_model", "sets", "environment"}
    assert set(data["rules"]) == {"typed", "typed_overlap", "any_type", "in_clear", "overall",
                                  "f2"}
    assert "cover" in data["rules"]["typed"] and "cpu" in data["environment"]
    assert data["learned_model"]["layers"] == 3 and data["learned_model"]["precision"] == "int8"
    assert data["config"]["data"] == [str(dataset), "support-v1"]
    assert data["config"]["pii"]["entities"][0] == "PERSON"
    assert list(data["sets"]) == ["tiny", "support-v1"]
    for name, s in data["sets"].items():
        assert set(s) == SET_KEYS, name
        assert s["examples"] == 10
        assert set(s["typed"]) == {"per_type", "overall", "overall_all_gold"}
        assert PRF | {"gold_overlapped", "recall_overlap"} == set(s["typed"]["overall"])
        assert all(set(row) == PRF | {"gold_overlapped", "recall_overlap"}
                   for row in s["typed"]["per_type"].values())
        assert set(s["any_type"]) == PRF
        assert set(s["in_clear"]) == {"gold", "in_clear", "share", "detectable_gold",
                                      "detectable_in_clear", "detectable_share"}
        assert set(s["key_recall"]) == {"types", "min", "gold"}
        assert set(s["targets_met"]) == {"f2", "key_recall", "in_clear", "latency_p50",
                                         "latency_p99"}
        lat = s["latency_100_words_ms"]
        assert set(lat) == MS | {"cpu", "words", "how"} and set(lat["cpu"]) == MS and lat["n"] == 4 and lat["words"] == 100
        assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
        rt = s["chat_round_trip_ms"]
        assert set(rt) == {"total", "redact", "restore", "total_cpu", "words_p50",
                           "restored_exactly", "how"}
        assert set(rt["total"]) == MS and rt["total"]["n"] == 3
        assert rt["restored_exactly"] == 3  # restore gives back exactly what was redacted
    tiny = data["sets"]["tiny"]
    assert tiny["typed"]["per_type"]["EMAIL_ADDRESS"]["recall"] == 1.0
    assert tiny["typed"]["per_type"]["CREDIT_CARD"]["recall"] == 1.0
    assert tiny["typed"]["per_type"]["AGE"]["recall"] == 1.0  # fleetlm.privacy.patterns
    assert tiny["undetectable_gold"] == {}
    assert tiny["per_gold_type"]["AGE"]["in_clear"] == 0
    assert "PERSON" in r.output and "F2" in r.output and "in the clear" in r.output
    assert "round trip" in r.output and "targets" in r.output


def test_bench_pii_prints_plain_progress_lines_per_set(dataset: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLEETLM_PROGRESS_INTERVAL", "0")
    r = CliRunner().invoke(app, ["bench", "pii", "--data", str(dataset), "--limit", "5",
                                 "--latency-messages", "1", "--chat-requests", "1"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if "bench pii: detecting PII in tiny" in ln]
    assert [re.search(r"(\d+)/5 ", ln)[1] for ln in lines] == ["0", "1", "2", "3", "4", "5"]  # type: ignore[index]
    assert "5/5 100.0%" in lines[-1]
    assert "detecting PII" not in r.stdout and "F2" in r.stdout


def test_bench_pii_bad_options_exit_2_naming_the_option(tmp_path: Path):
    r = CliRunner().invoke(app, ["bench", "pii", "--data", str(tmp_path / "nope.json"),
                                 "--limit", "0"])
    assert r.exit_code == 2
    assert "--data" in r.output and "no such file" in r.output and "--limit=0" in r.output
    typo = tmp_path / "pii.yaml"
    typo.write_text("score_treshold: 0.5\n")
    r = CliRunner().invoke(app, ["bench", "pii", "--pii-config", str(typo)])
    assert r.exit_code == 2 and "score_treshold: unknown key" in r.output
