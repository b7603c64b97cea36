"""Slow: a routed request answered by the small model, not streamed, is cancelled when its
client goes away (its KV row freed), and its ledger row says so (flag ``cancelled``)."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.server.conftest import MODEL, live_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    routes = {
        # an upstream nobody calls: the route always answers with the small model
        "upstreams": {"never": {"base_url": "http://127.0.0.1:9/v1", "model": "x"}},
        "routes": {"local": {"small": MODEL, "large": ["never"], "policy": "always-small",
                             "pii": "off"}},
        "ledger_path": "ledger.sqlite3",
    }
    with live_server(tmp_path_factory.mktemp("adapters"), with_demo=False,
                     routes=routes) as server:
        yield server


def _send_then_leave(url: str, path: str, body: dict, engine) -> float:
    """POST ``body``, wait until the engine generates for it, close the socket without
    reading; the seconds until the engine has nothing running or waiting."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    sock = socket.create_connection((host, int(port)))
    try:
        sock.sendall(head + data)
        end = time.monotonic() + 60
        while engine.stats()["running"] == 0:  # admitted
            assert time.monotonic() < end
            time.sleep(0.02)
        time.sleep(0.5)  # generating
    finally:
        sock.close()
    gone = time.monotonic()
    while engine.stats()["running"] or engine.stats()["waiting"]:
        assert time.monotonic() - gone < 3, "the request kept generating after its client left"
        time.sleep(0.02)
    return time.monotonic() - gone


def test_a_routed_small_answer_is_cancelled_when_its_client_goes_away(live):
    engine = live.engine
    before = engine.stats()["generated_tokens"]
    body = {"model": "local", "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 450, "temperature": 0, "ignore_eos": True}
    took = _send_then_leave(live.url, "/v1/chat/completions", body, engine)
    print(f"running 0 after {took:.2f} s")
    generated = engine.stats()["generated_tokens"] - before
    assert generated < 450, generated  # stopped well before the end
    assert engine.stats()["kv_rows_free"] == engine.stats()["kv_rows"]
    end = time.monotonic() + 5
    while True:  # the ledger row is written as the handler returns
        rows = live.router.ledger.query(None, route="local")
        if rows or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert len(rows) == 1, rows
    row = rows[0]
    assert row.decision == "small" and "cancelled" in row.flags
    assert row.model == MODEL and row.upstream is None
