"""``fleetlm bench gateway`` end to end with a few requests: the JSON it writes, and that the
keyed server really refused nothing and checked a key (its audit log stays empty, its
overhead is measured on both endpoints)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fleetlm.cli import app

pytestmark = pytest.mark.slow


def test_bench_gateway_writes_its_report(tmp_path):
    out = tmp_path / "gateway.json"
    r = CliRunner().invoke(app, ["bench", "gateway", "--requests", "10", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert set(data["endpoints"]) == {"GET /v1/models", "POST /v1/completions"}
    for e in data["endpoints"].values():
        assert e["open_p50_ms"] > 0 and e["keyed_p50_ms"] > 0
        assert isinstance(e["pass"], bool) and e["pass"] == (e["overhead_p50_ms"] <= 0.5)
    assert 0 < data["in_process"]["p50_us"] <= data["in_process"]["p99_us"]
    assert data["environment"]["cpu_count"] >= 1 and "cpu_flags" in data["environment"]


def test_bench_gateway_refuses_too_few_requests():
    r = CliRunner().invoke(app, ["bench", "gateway", "--requests", "3"])
    assert r.exit_code == 2 and "--requests 3" in r.output
