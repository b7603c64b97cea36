"""Slow: a routed request answered by the small model, not streamed, is cancelled when its
client goes away (its KV row freed), and its ledger row says so (flag ``cancelled``)."""

from __future__ import annotations

import time

import pytest

from tests.server.conftest import MODEL, live_server, send_then_leave

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


def test_a_routed_small_answer_is_cancelled_when_its_client_goes_away(live):
    engine = live.engine
    before = engine.stats()["generated_tokens"]
    body = {"model": "local", "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 450, "temperature": 0, "ignore_eos": True}
    took = send_then_leave(live.url, "/v1/chat/completions", body, engine)
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
