"""The closed-loop benchmark drivers report progress: requests completed of the total, as
plain lines when not on a terminal (``fleetlm bench adapters`` / ``bench serve`` runs can
take minutes per configuration)."""

from __future__ import annotations

import io
import re
from pathlib import Path

from fleetlm.bench.adapters import run_engine
from fleetlm.progress import Progress


def test_run_engine_reports_every_completed_request(tiny_base: Path) -> None:
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model

    lm = load_model(str(tiny_base), dtype="float32")
    engine = Engine(lm, EngineConfig(max_running=2, max_len=64, max_hot_adapters=0))
    prompts = [[1, 2, 3 + i] for i in range(5)]
    out = io.StringIO()
    with Progress("bench adapters", stream=out, plain=True, interval_s=0) as p:
        r = run_engine(engine, prompts, [None] * 5, 2, 3, "base",
                       p.task("base requests", len(prompts)))
    assert r["requests_completed"] == 5 and r["generated_tokens"] == 15
    done = [int(m[1]) for m in re.finditer(r"bench adapters: base requests (\d+)/5 ",
                                           out.getvalue())]
    assert done[0] == 0 and done[-1] == 5, out.getvalue()
    assert done == sorted(done) and len(done) >= 3  # 2 in flight: completions come in steps
    last = out.getvalue().splitlines()[-1]
    assert "5/5 100.0%" in last and "eta" not in last  # the end line: nothing left to wait for
