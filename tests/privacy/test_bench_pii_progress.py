"""`fleetlm bench pii` without a terminal: the detection stage prints plain progress lines
(stage, n/total) on stderr, and the results table stays on stdout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleetlm.cli import app
from tests.privacy.test_bench_pii import _rows


def test_bench_pii_prints_plain_progress_lines(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLM_PROGRESS_INTERVAL", "0")
    data = tmp_path / "synth.json"
    data.write_text(json.dumps(_rows(5)))
    r = CliRunner().invoke(app, ["bench", "pii", "--data", str(data)])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if "bench pii: detecting PII" in ln]
    assert [re.search(r"(\d+)/5 ", ln)[1] for ln in lines] == ["0", "1", "2", "3", "4", "5"]  # type: ignore[index]
    assert "5/5 100.0%" in lines[-1]
    assert "detecting PII" not in r.stdout and "F2" in r.stdout
