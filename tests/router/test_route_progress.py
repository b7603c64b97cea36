"""`fleetlm route train` without a terminal (CI, nohup, a pipe): the embedding stage prints
plain progress lines on stderr (stage, n/total) instead of a bar that shows nothing, and
stdout keeps only the report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fleetlm.router.classifier as classifier
import fleetlm.router.outcome_scores as outcome_scores
from tests.router.test_cli_route import FAKE, KeywordEmbedder, invoke, keyword_outcomes


@pytest.fixture
def fake_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(classifier, "load_embedder", lambda model_id, **kw: KeywordEmbedder())


def test_route_train_prints_plain_progress_lines_without_a_terminal(
        tmp_path: Path, fake_embedder: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outcome_scores, "EMBED_CHUNK", 10)  # 40 prompts: 4 chunks
    monkeypatch.setenv("FLEETLM_PROGRESS_INTERVAL", "0")  # a line at every update
    data = keyword_outcomes(tmp_path / "o.jsonl")
    r = invoke("route", "train", "--data", data, "--out", tmp_path / "r", "--embedding", FAKE,
               "--C", "10")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if f"route train: embedding ({FAKE})" in ln]
    done = [re.search(r"(\d+)/40 ", ln)[1] for ln in lines]  # type: ignore[index]
    assert done == ["0", "10", "20", "30", "40"], r.stderr
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d route train: embedding", lines[0])
    assert "40/40 100.0%" in lines[-1] and "elapsed" in lines[-1]
    assert "eta" in lines[1]  # rate and time left while it runs
    assert "embedding" not in r.stdout  # the report alone on stdout
    assert "embedded 40 prompts with fake-kw" in r.stdout and "saved" in r.stdout


def test_route_train_few_prompts_print_no_progress(tmp_path: Path, fake_embedder: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLM_PROGRESS_INTERVAL", "0")
    data = keyword_outcomes(tmp_path / "o.jsonl")  # 40 prompts: one chunk of 512
    r = invoke("route", "train", "--data", data, "--out", tmp_path / "r", "--embedding", FAKE)
    assert r.exit_code == 0, r.output
    assert "route train: embedding" not in r.stderr
