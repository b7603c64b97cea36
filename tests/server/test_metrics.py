"""Slow: /metrics (Prometheus) of a live fleetlm server after real requests."""

from __future__ import annotations

import pytest

from tests.server.conftest import MODEL, live_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("adapters"), with_demo=True) as live:
        yield live.url


def _samples(base: str) -> dict[tuple[str, frozenset], float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(base + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_request_token_and_latency_metrics(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    before = _samples(server)
    r = client.chat.completions.create(model="demo", max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "Say hi"}])
    chunks = list(client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Say hi"}]))
    after = _samples(server)

    status = r.choices[0].finish_reason
    assert _value(after, "fleetlm_requests_total", model="demo", status=status) \
        - _value(before, "fleetlm_requests_total", model="demo", status=status) == 1
    assert _value(after, "fleetlm_prompt_tokens_total", model="demo") == r.usage.prompt_tokens
    assert _value(after, "fleetlm_completion_tokens_total", model="demo") == r.usage.completion_tokens
    assert _value(after, "fleetlm_time_to_first_token_seconds_count", model="demo") >= 1
    assert _value(after, "fleetlm_inter_token_latency_seconds_count", model="demo") \
        == r.usage.completion_tokens - 1
    # the streaming path counts too, once per request
    usage = chunks[-1].usage
    assert sum(v for (n, lb), v in after.items() if n == "fleetlm_requests_total"
               and ("model", MODEL) in lb) == 1
    assert _value(after, "fleetlm_completion_tokens_total", model=MODEL) == usage.completion_tokens
    assert _value(after, "fleetlm_time_to_first_token_seconds_count", model=MODEL) == 1
    # gauges sampled at scrape time
    assert _value(after, "fleetlm_queue_depth") == 0 and _value(after, "fleetlm_running") == 0
    assert _value(after, "fleetlm_hot_adapters") == 1 and _value(after, "fleetlm_warm_adapters") >= 1
    assert _value(after, "fleetlm_generated_tokens") >= r.usage.completion_tokens
    # no speculation configured: nothing drafted
    assert _value(after, "fleetlm_draft_tokens_proposed") == 0
    assert _value(after, "fleetlm_draft_tokens_accepted") == 0


def test_refused_requests_are_counted_by_model_and_status(server):
    import httpx

    before = _samples(server)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=server, timeout=30) as http:
        assert http.post("/v1/chat/completions", json={**chat, "model": "nope"}).status_code == 404
        assert http.post("/v1/chat/completions",
                         json={**chat, "model": MODEL, "temperature": -1}).status_code == 400
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                  "max_tokens": "many"}).status_code == 400
        assert http.get("/v1/models").status_code == 200  # not a generation request
    after = _samples(server)

    def refused(model: str, code: str) -> float:
        return _value(after, "fleetlm_refused_requests_total", model=model, code=code) \
            - _value(before, "fleetlm_refused_requests_total", model=model, code=code)

    assert refused("nope", "404") == 1
    assert refused(MODEL, "400") == 1  # parsed, then refused by the engine's checks
    assert refused("unknown", "400") == 1  # the body did not parse: no model to name
    # refused requests are not in the generation counter
    assert _value(after, "fleetlm_requests_total", model="nope", status="error") == 0


def test_refused_requests_for_a_served_adapter_keep_its_name(server):
    import httpx

    before = _samples(server)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": -1}
    with httpx.Client(base_url=server, timeout=30) as http:
        for model in ("demo", f"{MODEL}:demo"):
            assert http.post("/v1/chat/completions", json={**chat, "model": model}).status_code == 400
    after = _samples(server)
    for model in ("demo", f"{MODEL}:demo"):
        assert _value(after, "fleetlm_refused_requests_total", model=model, code="400") \
            - _value(before, "fleetlm_refused_requests_total", model=model, code="400") == 1
