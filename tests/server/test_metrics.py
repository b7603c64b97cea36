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
