"""Every answer is OpenAI-shaped, Starlette's own errors included (found by the fuzzer):
no such path, a method the path does not take, a body that is not UTF-8 or not JSON; and a
``model`` that cannot name an adapter is a 404 like any unknown model, not a 422."""

from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

import httpx
import pytest

from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.server.app import create_app
from fleetlm.server.errors import APIError
from fleetlm.server.local import adapter_of


def _send(method: str, path: str, **kw: Any) -> httpx.Response:
    engine = mock.MagicMock()
    engine.store = None
    app = create_app(engine, "m")

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test") as c:
            return await c.request(method, path, **kw)
    return asyncio.run(go())


@pytest.mark.parametrize("method,path,kw,status,code", [
    ("POST", "/v1/embeddings", {"json": {"input": "hi"}}, 404, "not_found"),
    ("GET", "/nothing/here", {}, 404, "not_found"),
    ("PUT", "/v1/models", {}, 405, "method_not_allowed"),
    ("POST", "/v1/chat/completions",
     {"content": b'"\xff"', "headers": {"Content-Type": "application/json"}}, 400,
     "invalid_json"),
    ("POST", "/v1/chat/completions",
     {"content": b'{"model": "m", ', "headers": {"Content-Type": "application/json"}}, 400,
     "invalid_json"),
])
def test_starlette_errors_are_openai_shaped(method, path, kw, status, code):
    r = _send(method, path, **kw)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["type"] == "invalid_request_error"
    assert err["param"] is None  # not a field: the body as a whole (was "1" for bad JSON)
    if status == 405:
        assert r.headers["allow"] == "GET"


@pytest.mark.parametrize("model", ["a b", "x" * 65, ".hidden", "m:../etc", "m:"])
def test_a_model_that_cannot_name_an_adapter_is_not_found(model):
    with pytest.raises(APIError) as e:
        adapter_of(model, "m", store=object())
    assert (e.value.status, e.value.code, e.value.param) == (404, "model_not_found", "model")


@pytest.mark.parametrize("t", [1e-300, 3.9e-226, 1e-7, 0.0])
def test_a_temperature_that_vanishes_in_float32_is_greedy(t):
    """Found by the fuzzer: 1e-300 passed validation and the sampler divided by zero."""
    assert SamplingParams(temperature=t).validate().greedy
    assert not SamplingParams(temperature=1e-3).greedy
