"""The upstream client against loopback stub OpenAI servers: success, retries, Retry-After,
refused connections, timeouts and the fallback chain, streams that fail before and after
their first content chunk. Every test is bounded by short timeouts (0.3 s)."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fleetlm.router.config import UpstreamConfig
from fleetlm.router.upstream import (
    StreamInterrupted,
    UpstreamClient,
    UpstreamError,
    UpstreamKeyMissing,
    UpstreamResponse,
    UpstreamStream,
    UpstreamUnavailable,
)
from tests.openai_stub import USAGE, Reply, Stub, stub_starter

BODY: dict[str, Any] = {"model": "support", "messages": [{"role": "user", "content": "hi there"}],
                        "max_tokens": 16}


@pytest.fixture
def stub() -> Iterator[Callable[..., Stub]]:
    yield from stub_starter()


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback port nothing listens on (connection refused). The socket stays bound, not
    listening, for the whole test, so no other server can take the port in the meantime
    (a CI run once saw a timeout here instead of a refusal)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def up(url: str, **kw: Any) -> UpstreamConfig:
    opts: dict[str, Any] = {"model": "big-model", "timeout_s": 0.3, "max_attempts": 3,
                            "backoff_s": 0.01, "max_backoff_s": 0.5}
    return UpstreamConfig(base_url=url, **{**opts, **kw})


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def with_client(upstreams: dict[str, UpstreamConfig], fn: Callable[[UpstreamClient], Any],
                      env: dict[str, str] | None = None) -> Any:
    async with UpstreamClient(upstreams, env=env if env is not None else {},
                              rng=random.Random(0)) as client:
        return await fn(client)


async def collect(stream: UpstreamStream) -> list[dict[str, Any]]:
    return [chunk async for chunk in stream]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# ----------------------------------------------------------------------------- success


def test_chat_success_replaces_model_and_sends_key(stub: Callable[..., Stub]) -> None:
    s = stub()
    ups = {"big": up(s.base_url, api_key_env="BIG_API_KEY")}
    res = run(with_client(ups, lambda c: c.chat("big", {**BODY, "stream": False}),
                          env={"BIG_API_KEY": "sk-test"}))
    assert isinstance(res, UpstreamResponse)
    assert res.upstream == "big" and res.attempts == 1
    assert res.response["choices"][0]["message"]["content"] == "Hello world"
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.estimated) == (11, 7, False)
    (sent,) = s.bodies
    assert sent["model"] == "big-model" and "stream" not in sent
    assert sent["messages"] == BODY["messages"] and sent["max_tokens"] == 16
    assert s.headers[0]["Authorization"] == "Bearer sk-test"


def test_usage_estimated_when_absent(stub: Callable[..., Stub]) -> None:
    s = stub(Reply(usage=None, pieces=("x" * 40,)))
    res = run(with_client({"big": up(s.base_url)}, lambda c: c.chat("big", BODY)))
    # "hi there" = 8 chars -> 2 tokens; 40 chars -> 10 tokens
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.estimated) == (2, 10, True)


def test_stream_success(stub: Callable[..., Stub]) -> None:
    s = stub()

    async def go(c: UpstreamClient) -> tuple[UpstreamStream, list[dict[str, Any]]]:
        st = await c.first_available(["big"], {**BODY, "stream": True}, stream=True)
        return st, await collect(st)

    st, chunks = run(with_client({"big": up(s.base_url)}, go))
    assert st.upstream == "big" and st.failures == []
    assert text_of(chunks) == "Hello world"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"] for c in chunks)  # the usage chunk we asked for is not passed on
    assert (st.usage.prompt_tokens, st.usage.completion_tokens, st.usage.estimated) == (11, 7, False)
    assert st.latency_ms is not None and st.latency_ms >= st.first_content_ms
    (sent,) = s.bodies
    assert sent["model"] == "big-model" and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


def test_stream_usage_chunk_passed_on_when_the_client_asked(stub: Callable[..., Stub]) -> None:
    s = stub()
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}

    async def go(c: UpstreamClient) -> list[dict[str, Any]]:
        return await collect(await c.stream_chat("big", body))

    chunks = run(with_client({"big": up(s.base_url)}, go))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == USAGE


def test_stream_without_usage_is_estimated(stub: Callable[..., Stub]) -> None:
    s = stub(Reply(usage=None, pieces=("abcd", "efgh")))

    async def go(c: UpstreamClient) -> UpstreamStream:
        st = await c.stream_chat("big", BODY)
        await collect(st)
        return st

    st = run(with_client({"big": up(s.base_url)}, go))
    assert (st.usage.prompt_tokens, st.usage.completion_tokens, st.usage.estimated) == (2, 2, True)


# ----------------------------------------------------------------------------- retries


def test_500_twice_then_200_is_retried(stub: Callable[..., Stub]) -> None:
    s = stub(lambda body, i: Reply(status=500) if i < 2 else Reply())
    res = run(with_client({"big": up(s.base_url)}, lambda c: c.chat("big", BODY)))
    assert res.attempts == 3 and len(s.bodies) == 3
    assert res.response["choices"][0]["message"]["content"] == "Hello world"


def test_500_twice_then_200_streaming(stub: Callable[..., Stub]) -> None:
    s = stub(lambda body, i: Reply(status=503) if i < 2 else Reply())

    async def go(c: UpstreamClient) -> str:
        st = await c.stream_chat("big", BODY)
        assert st.attempts == 3
        return text_of(await collect(st))

    assert run(with_client({"big": up(s.base_url)}, go)) == "Hello world"


def test_429_retry_after_is_honoured(stub: Callable[..., Stub]) -> None:
    s = stub(lambda body, i: Reply(status=429, headers={"Retry-After": "0.3"}) if i == 0
             else Reply())
    res = run(with_client({"big": up(s.base_url, backoff_s=0.0)},
                          lambda c: c.chat("big", BODY)))
    assert res.attempts == 2
    waited = s.times[1] - s.times[0]
    assert 0.3 <= waited < 0.9, waited  # backoff_s=0: only Retry-After explains the wait


def test_429_retry_after_above_cap_moves_on(stub: Callable[..., Stub]) -> None:
    slow429 = stub(Reply(status=429, headers={"Retry-After": "120"}))
    ok = stub()
    ups = {"a": up(slow429.base_url), "b": up(ok.base_url)}
    t0 = time.monotonic()
    res = run(with_client(ups, lambda c: c.first_available(["a", "b"], BODY)))
    assert time.monotonic() - t0 < 1.0
    assert res.upstream == "b" and len(slow429.bodies) == 1
    (fail,) = res.failures
    assert fail.status == 429 and "Retry-After 120s is above max_backoff_s" in fail.reason


def test_400_is_not_retried(stub: Callable[..., Stub]) -> None:
    s = stub(Reply(status=400))
    with pytest.raises(UpstreamError, match=r"HTTP 400.*\[1 attempt\]") as e:
        run(with_client({"big": up(s.base_url)}, lambda c: c.chat("big", BODY)))
    assert e.value.status == 400 and len(s.bodies) == 1


# ----------------------------------------------------------------------------- the chain


def test_connection_refused_falls_over(stub: Callable[..., Stub], dead_url: str) -> None:
    ok = stub()
    ups = {"dead": up(dead_url, max_attempts=2), "ok": up(ok.base_url)}
    res = run(with_client(ups, lambda c: c.first_available(["dead", "ok"], BODY)))
    assert res.upstream == "ok"
    (fail,) = res.failures
    assert fail.upstream == "dead" and "cannot connect" in fail.reason
    assert fail.attempts == 2  # connection errors are retried


def test_slow_upstream_times_out_and_falls_over(stub: Callable[..., Stub]) -> None:
    slow, ok = stub(Reply(delay_s=3.0)), stub()
    ups = {"slow": up(slow.base_url), "ok": up(ok.base_url)}
    for stream in (False, True):
        async def go(c: UpstreamClient, stream: bool = stream) -> Any:
            if not stream:
                return await c.first_available(["slow", "ok"], BODY)
            st = await c.first_available(["slow", "ok"], BODY, stream=True)
            await st.aclose()
            return st

        t0 = time.monotonic()
        res = run(with_client(ups, go))
        elapsed = time.monotonic() - t0
        assert 0.3 <= elapsed < 1.0, elapsed  # one attempt of 0.3 s: a timeout is not retried
        assert res.upstream == "ok"
        (fail,) = res.failures
        assert "timeout after 0.3s" in fail.reason and fail.attempts == 1


def test_all_fail_lists_every_reason_within_the_timeouts(stub: Callable[..., Stub],
                                                         dead_url: str) -> None:
    failing, slow = stub(Reply(status=500)), stub(Reply(delay_s=3.0))
    ups = {"failing": up(failing.base_url), "dead": up(dead_url),
           "slow": up(slow.base_url), "nokey": up(failing.base_url, api_key_env="NOPE_KEY")}
    t0 = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as e:
        run(with_client(ups, lambda c: c.first_available(["failing", "dead", "slow", "nokey"],
                                                         BODY)))
    assert time.monotonic() - t0 < 2.0
    reasons = {f.upstream: f.reason for f in e.value.failures}
    assert list(reasons) == ["failing", "dead", "slow", "nokey"]
    assert "HTTP 500" in reasons["failing"] and "[3 attempts]" in reasons["failing"]
    assert "cannot connect" in reasons["dead"]
    assert "timeout" in reasons["slow"]
    assert "NOPE_KEY is not set" in reasons["nokey"]
    msg = str(e.value)
    assert all(name in msg for name in reasons)
    assert len(failing.bodies) == 3  # the key check failed before any request was sent


def test_deadline_bounds_the_whole_chain(stub: Callable[..., Stub]) -> None:
    slow = stub(Reply(delay_s=3.0))
    ups = {"a": up(slow.base_url, timeout_s=1.0), "b": up(slow.base_url, timeout_s=1.0)}
    t0 = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as e:
        run(with_client(ups, lambda c: c.first_available(["a", "b"], BODY, deadline_s=0.4)))
    assert time.monotonic() - t0 < 0.8
    assert "deadline_s" in e.value.failures[-1].reason


def test_missing_key_is_a_clear_error_at_call_time(stub: Callable[..., Stub]) -> None:
    s = stub()
    ups = {"big": up(s.base_url, api_key_env="BIG_API_KEY")}
    client = UpstreamClient(ups, env={})  # building the client reads no key
    assert client.missing_keys() == [client.missing_keys()[0]]
    with pytest.raises(UpstreamKeyMissing, match=r"upstreams.big.api_key_env: environment "
                                                 r"variable BIG_API_KEY is not set"):
        run(client.chat("big", BODY))
    run(client.aclose())
    assert s.bodies == []


def test_unknown_upstream_name() -> None:
    with pytest.raises(UpstreamUnavailable, match="no upstream named 'ghost'"):
        run(with_client({}, lambda c: c.first_available(["ghost"], BODY)))
    with pytest.raises(UpstreamUnavailable, match="the route names no upstream"):
        run(with_client({}, lambda c: c.first_available([], BODY)))


# ----------------------------------------------------------------------------- streams


def test_stream_dying_after_first_content_is_an_error_not_a_switch(
        stub: Callable[..., Stub]) -> None:
    dying, backup = stub(Reply(pieces=("Hel", "lo", " world"), die_after=1)), stub()
    ups = {"dying": up(dying.base_url), "backup": up(backup.base_url)}
    got: list[dict[str, Any]] = []

    async def go(c: UpstreamClient) -> None:
        st = await c.first_available(["dying", "backup"], BODY, stream=True)
        assert st.upstream == "dying"
        async for chunk in st:
            got.append(chunk)

    with pytest.raises(StreamInterrupted, match="stream interrupted after content was sent") as e:
        run(with_client(ups, go))
    assert text_of(got) == "Hel"
    assert e.value.upstream == "dying" and e.value.usage.estimated
    assert backup.bodies == [] and len(dying.bodies) == 1  # no retry, no switch


def test_stream_dying_before_content_fails_over(stub: Callable[..., Stub]) -> None:
    dying, backup = stub(Reply(die_after=0)), stub()
    ups = {"dying": up(dying.base_url, max_attempts=1), "backup": up(backup.base_url)}

    async def go(c: UpstreamClient) -> tuple[UpstreamStream, str]:
        st = await c.first_available(["dying", "backup"], BODY, stream=True)
        return st, text_of(await collect(st))

    st, text = run(with_client(ups, go))
    assert st.upstream == "backup" and text == "Hello world"
    (fail,) = st.failures
    assert "stream ended without [DONE]" in fail.reason


def test_stream_stalling_after_content_hits_the_gap_limit(stub: Callable[..., Stub]) -> None:
    s = stub(Reply(pieces=("a", "b"), gap_s=3.0))

    async def go(c: UpstreamClient) -> None:
        await collect(await c.stream_chat("big", BODY))

    t0 = time.monotonic()
    with pytest.raises(StreamInterrupted, match="no chunk for 0.2s"):
        run(with_client({"big": up(s.base_url, stream_gap_s=0.2)}, go))
    assert time.monotonic() - t0 < 1.0
