"""The tune pipeline's Reporter off a terminal: plain progress lines at the interval of
FLEETLM_PROGRESS_INTERVAL, a line where a stage stopped, messages between them, and
nothing at all when quiet. (The whole pipeline's lines: test_pipeline.py.)"""

from __future__ import annotations

import io
import re

import pytest

from fleetlm.tune.pipeline import Reporter

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d tune: (?P<stage>\w+) (?P<where>\S+)")


def run_stage(steps: int, total: int, *, quiet: bool = False) -> tuple[list[str], str]:
    out = io.StringIO()  # not a terminal
    rep = Reporter(quiet, stream=out)
    with rep.live():
        update = rep.bar("train")
        for step in range(1, steps + 1):
            update(step, total, f"loss {1 / step:.3f}")
        rep.say("train: done")
    text = out.getvalue()
    return [f"{m['stage']} {m['where']}" for m in map(LINE.match, text.splitlines()) if m], text


def test_a_long_interval_prints_only_the_start_and_the_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLM_PROGRESS_INTERVAL", "3600")
    lines, text = run_stage(50, 50)
    assert lines == ["train 0", "train 50/50"]
    assert "| loss 0.020" in text and "train: done" in text


def test_interval_zero_prints_every_update(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLM_PROGRESS_INTERVAL", "0")
    lines, _ = run_stage(5, 5)
    assert lines == ["train 0"] + [f"train {i}/5" for i in range(1, 6)]


def test_a_stage_cut_short_says_where_it_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLM_PROGRESS_INTERVAL", "3600")
    lines, text = run_stage(7, 40)  # early stopping at step 7 of 40
    assert lines == ["train 0", "train 7/40"]
    last = [t for t in text.splitlines() if LINE.match(t)][-1]
    assert re.search(r"7/40 17\.5% [\d.]+/s elapsed \w+ eta \w+ \| loss 0\.143$", last), last


def test_messages_between_the_lines_and_quiet_prints_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLM_PROGRESS_INTERVAL", "0")
    _, text = run_stage(2, 2)
    assert text.splitlines()[-1] == "train: done"
    lines, text = run_stage(3, 3, quiet=True)
    assert lines == [] and text == ""
