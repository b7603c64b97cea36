"""``fleetlm bench fuzz`` and ``fleetlm bench soak``, run briefly on the tiny model, and the
answer checks the fuzzer relies on.

The short runs check the JSON each writes (every field the docs describe, counts that add
up, every operation fuzzed, every kind of hostile request really sent), not the figures:
the issue's targets are reported pass/fail by the benchmark, never asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleetlm.bench.fuzz import shape_problems, stream_problems
from fleetlm.bench.soak import HOSTILE_KINDS, rss_summary
from fleetlm.cli.bench import app

ERROR = {"error": {"message": "max_tokens: must be >= 1", "type": "invalid_request_error",
                   "param": "max_tokens", "code": None}}


def _answer(status: int, body: Any, path: str = "/v1/chat/completions",
            ctype: str = "application/json") -> list[str]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return shape_problems("POST", path, status, ctype, raw)


def test_openai_error_shape_is_checked() -> None:
    assert _answer(400, ERROR) == []
    assert _answer(400, {"detail": "There was an error parsing the body"})
    assert _answer(404, {"error": {"message": "", "type": "x", "param": None, "code": None}})
    assert _answer(413, {"error": {"message": "too big", "type": "x"}})  # param, code missing
    assert _answer(400, b"<html>bad request</html>", ctype="text/html")


def test_completion_shapes_are_checked() -> None:
    chat = {"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    assert _answer(200, chat) == []
    assert _answer(200, {**chat, "object": "text_completion"})
    assert _answer(200, {**chat, "choices": []})
    assert _answer(200, {**chat, "usage": {"prompt_tokens": "3"}})
    text = {"id": "c", "object": "text_completion",
            "choices": [{"index": 0, "finish_reason": "length", "text": "abc"}]}
    assert _answer(200, text, "/v1/completions") == []
    assert _answer(200, {**text, "choices": [{"index": 0, "finish_reason": "eos", "text": "a"}]},
                   "/v1/completions")


def test_streams_are_checked() -> None:
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    good = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
    assert stream_problems(good, chat=True) == []
    assert stream_problems(f"data: {json.dumps(chunk)}\n\n", chat=True)  # no [DONE]
    assert stream_problems("data: {broken\n\ndata: [DONE]\n\n", chat=True)
    server_error = {"error": {"message": "internal error: RuntimeError", "type": "server_error",
                              "param": None, "code": None}}
    assert stream_problems(f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(server_error)}\n\n"
                           "data: [DONE]\n\n", chat=True)


def test_rss_growth_is_measured_after_warmup() -> None:
    samples = [(float(t), 100 << 20) for t in range(10)] \
        + [(float(t), (200 + t) << 20) for t in range(10, 30)]
    r = rss_summary(samples, after_s=10)
    # 20 samples after warm-up: the medians of the first 2 and of the last 2
    assert r["after_warmup_mb"] == 210.5 and r["end_mb"] == 228.5
    assert r["growth_pct"] == pytest.approx(100 * 18 / 210.5, abs=0.01)
    assert rss_summary(samples, after_s=100)["growth_pct"] is None


def _run(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


@pytest.mark.slow
def test_bench_fuzz_writes_its_figures(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    _run("fuzz", "--cases", "40", "--seed", "1", "--model", str(tiny_base), "--max-len", "96",
         "--out", str(out))
    d = json.loads(out.read_text())
    for key in ("cases_per_operation", "status_codes", "server_errors", "schema_violations",
                "no_answer", "failures", "healthy_after", "duration_s", "environment"):
        assert key in d, key
    assert d["environment"]["cpu"] and "cpu_flags" in d["environment"]
    assert d["cases"] == 40 == sum(sum(m.values()) for m in d["cases_per_operation"].values())
    assert sum(d["status_codes"].values()) == d["cases"] - d["no_answer"]
    ops = set(d["cases_per_operation"])
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/adapters",
            "GET /v1/adapters/{name}", "DELETE /v1/adapters/{name}", "GET /health"} <= ops
    assert d["server_errors"] == sum(v for k, v in d["status_codes"].items() if int(k) >= 500)
    for f in d["failures"]:
        assert f["curl"].startswith("curl ") and f["request"]["method"] and f["count"] >= 1
    assert d["healthy_after"] is True


@pytest.mark.slow
def test_bench_soak_sends_hostile_requests(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    # --no-compile: the server's start compiled the tiny model's decode steps for ~40 s of
    # the suite; what this checks (hostile requests, lost ones, RSS) does not depend on it
    _run("soak", "--seconds", "16", "--model", str(tiny_base), "--clients", "2",
         "--hostile", "1", "--adapters", "1", "--max-tokens", "8", "--no-compile",
         "--out", str(out))
    d = json.loads(out.read_text())
    assert d["config"]["compile"] is False
    assert d["hostile_clients"] == 2
    for kind in HOSTILE_KINDS:
        assert d["hostile"][kind]["sent"] > 0, f"no {kind} request was sent"
    assert d["hostile_sent"] == sum(k["sent"] for k in d["hostile"].values())
    for phase in ("calm", "hostile"):
        p = d["well_behaved"][phase]
        assert p["sent"] > 0 and p["answered"] + p["lost"] + p["hung"] == p["sent"]
        assert {"ttft_p50_ms", "ttft_p99_ms", "requests_per_s", "tokens_per_s",
                "status_codes"} <= set(p)
    assert d["rss"]["samples"] >= 10 and d["rss"]["growth_pct"] is not None
    assert set(d["targets"]) == {"rss_growth_pct <= 5", "lost_or_hung == 0",
                                 "ttft_p99_hostile / calm <= 1.5",
                                 "hostile requests answered as expected", "healthy afterwards"}
    assert d["pass"] == all(d["targets"].values())
    statuses = [int(s) for k in d["hostile"].values() for s in k["status_codes"] if s != "None"]
    assert statuses and max(statuses) < 500, d["hostile"]
