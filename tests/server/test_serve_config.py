"""``fleetlm serve --config``: a bad routes file stops the start with the field's name; a
good one serves its routes, and the ledger rows are committed when the process stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fleetlm.router.ledger import Ledger
from tests.server.conftest import MODEL
from tests.server.test_shutdown import _free_port, _wait_ready


def _serve(config: Path, port: int, home: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "FLEETLM_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "fleetlm", "serve", "--model", MODEL,
                             "--dtype", "float32", "--no-compile", "--port", str(port), "--max-batch", "2",
                             "--max-len", "512", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def test_a_bad_routes_file_names_the_field(tmp_path: Path):
    cfg = tmp_path / "routes.yaml"
    cfg.write_text("routes:\n  support:\n    small: smollm2-135m\n    large: [big]\n"
                   "    policy: confidence\n    treshold: 0.8\n")
    proc = _serve(cfg, _free_port(), tmp_path / "home")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "routes.support.treshold: unknown key" in err
    assert "routes.support.large.0: no upstream named 'big'" in err


@pytest.mark.slow
def test_a_route_to_a_missing_adapter_fails_at_start(tmp_path: Path):
    cfg = tmp_path / "routes.yaml"
    cfg.write_text("routes:\n  support:\n    small: smollm2-135m:banking77\n"
                   "    policy: always-small\n    pii: off\n")
    proc = _serve(cfg, _free_port(), tmp_path / "home")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert "routes.support.small" in err and "banking77" in err


@pytest.mark.slow
def test_serve_with_routes_answers_and_commits_the_ledger(tmp_path: Path):
    import httpx

    ledger = tmp_path / "ledger.sqlite3"
    cfg = tmp_path / "routes.yaml"
    cfg.write_text("routes:\n  assistant:\n    small: smollm2-135m\n    policy: always-small\n"
                   "    pii: off\nlocal_cost_per_hour: 0.40\nledger_path: ledger.sqlite3\n")
    port = _free_port()
    proc = _serve(cfg, port, tmp_path / "home")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert models == [MODEL, "assistant"]
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "assistant", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == MODEL
        assert "decision=small" in r.headers["x-fleetlm-route"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    with Ledger(ledger, readonly=True) as led:
        (row,) = led.query()
    assert (row.route, row.decision, row.model, row.policy) == ("assistant", "small", MODEL,
                                                               "always-small")
    assert row.completion_tokens == r.json()["usage"]["completion_tokens"] and row.cost_usd > 0


def test_a_task_route_needs_a_tuned_adapter(tmp_path: Path):
    from fleetlm.errors import ConfigError
    from fleetlm.router.config import parse_routes
    from fleetlm.server.hybrid import Router

    cfg = parse_routes({"routes": {"r": {"small": MODEL, "policy": "always-small", "pii": "off",
                                         "task": "adapter"}}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"routes\.r\.task: task: adapter needs an adapter"):
        Router.for_server(cfg, MODEL, None)
    assert not (tmp_path / "ledger.sqlite3").exists()
