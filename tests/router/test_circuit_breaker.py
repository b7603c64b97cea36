"""The circuit breaker of each upstream: its bookkeeping on a fake clock, then against
loopback stub servers through the upstream client: an outage opens it after N failed calls,
an open circuit is skipped without waiting for the timeout (the chain moves on), one
half-open probe after the cool-down, success closes it, failure opens it again, and a 4xx
(the request's fault) does not count. Config defaults and checks too."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fleetlm.errors import ConfigError
from fleetlm.router.config import UpstreamConfig, parse_routes
from fleetlm.router.upstream import (
    CircuitBreaker,
    CircuitOpen,
    UpstreamClient,
    UpstreamUnavailable,
)
from tests.openai_stub import Reply, Stub, stub_starter

BODY: dict[str, Any] = {"model": "r", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def stub() -> Iterator[Callable[..., Stub]]:
    yield from stub_starter()


class Switch:
    """A stub reply a test can change: ``mode`` is "ok", "error" (500) or "slow"."""

    def __init__(self, slow_s: float = 5.0) -> None:
        self.mode, self.slow_s = "ok", slow_s

    def __call__(self, body: dict[str, Any], i: int) -> Reply:
        if self.mode == "error":
            return Reply(status=500)
        if self.mode == "slow":
            return Reply("late", delay_s=self.slow_s)
        return Reply("fine")


def up(url: str, **kw: Any) -> UpstreamConfig:
    opts: dict[str, Any] = {"model": "big-model", "max_attempts": 1, "circuit_failures": 2,
                            "circuit_cooldown_s": 0.3}
    return UpstreamConfig(base_url=url, **{**opts, **kw})


def client(ups: dict[str, UpstreamConfig]) -> UpstreamClient:
    return UpstreamClient(ups, env={}, rng=random.Random(0))


async def timed(coro: Any) -> tuple[Any, float]:
    """(result or the exception raised, seconds)."""
    t = time.monotonic()
    try:
        out = await coro
    except Exception as e:  # noqa: BLE001 -- returned for the test to check
        out = e
    return out, time.monotonic() - t


# -------------------------------------------------------------------------- bookkeeping


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_n_consecutive_failures_then_probes_once() -> None:
    clock = Clock()
    b = CircuitBreaker(3, 30.0, clock)
    for _ in range(2):
        assert b.allow() == "call"
        b.failure("call")
    assert b.state == "closed"
    b.success("call")  # a success in between starts the count again
    for _ in range(3):
        assert b.allow() == "call"
        b.failure("call")
    assert b.state == "open" and b.consecutive == 3
    assert b.allow() == "skip" and b.skipped == 1
    clock.now += 29.9
    assert b.allow() == "skip" and b.retry_in() == pytest.approx(0.1)
    clock.now += 0.1
    assert b.state == "half-open"
    assert b.allow() == "probe"
    assert b.allow() == "skip"  # one probe at a time
    b.failure("probe")  # still down: another full cool-down
    assert b.state == "open" and b.retry_in() == 30.0
    clock.now += 30.0
    assert b.allow() == "probe"
    b.success("probe")
    assert b.state == "closed" and b.consecutive == 0 and b.allow() == "call"


def test_a_released_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    b = CircuitBreaker(1, 5.0, clock)
    b.failure(b.allow())
    clock.now += 5.0
    assert b.allow() == "probe"
    b.release("probe")  # cancelled: nothing learnt
    assert b.allow() == "probe"


def test_zero_failures_never_opens() -> None:
    b = CircuitBreaker(0, 5.0)
    for _ in range(50):
        b.failure(b.allow())
    assert b.state == "closed" and b.allow() == "call"


# ------------------------------------------------------------------------ over loopback


def test_an_outage_opens_the_circuit_and_later_calls_skip_without_waiting(stub) -> None:
    """Timeout 1 s: the first two calls each wait it out; the third is skipped at once."""
    s = stub(Switch(slow_s=5.0))
    s.reply.mode = "slow"
    ups = {"big": up(s.base_url, timeout_s=1.0, circuit_cooldown_s=30.0)}

    async def go() -> list[tuple[Any, float]]:
        async with client(ups) as c:
            out = [await timed(c.first_available(["big"], BODY)) for _ in range(3)]
            assert c.breakers["big"].state == "open"
            return out

    (e1, t1), (e2, t2), (e3, t3) = asyncio.run(go())
    assert isinstance(e1, UpstreamUnavailable) and isinstance(e2, UpstreamUnavailable)
    assert t1 >= 0.9 and t2 >= 0.9  # each waited for the timeout
    assert isinstance(e3, UpstreamUnavailable) and t3 < 0.2
    (skip,) = e3.failures
    assert isinstance(skip, CircuitOpen) and "circuit open after 2 consecutive failures" in str(e3)
    assert len(s.bodies) == 2  # the skipped call sent nothing


def test_an_open_upstream_is_skipped_and_the_chain_answers_at_once(stub) -> None:
    bad, good = stub(Switch()), stub(Reply("from the backup"))
    bad.reply.mode = "error"
    ups = {"big": up(bad.base_url, timeout_s=5.0, circuit_cooldown_s=30.0),
           "backup": up(good.base_url)}

    async def go() -> tuple[Any, float]:
        async with client(ups) as c:
            for _ in range(2):
                await c.first_available(["big", "backup"], BODY)
            bad.reply.mode = "slow"  # would now cost the full 5 s timeout
            return await timed(c.first_available(["big", "backup"], BODY))

    res, elapsed = asyncio.run(go())
    assert elapsed < 0.2 and res.upstream == "backup"
    assert res.response["choices"][0]["message"]["content"] == "from the backup"
    assert [type(f) for f in res.failures] == [CircuitOpen]
    assert len(bad.bodies) == 2 and len(good.bodies) == 3


def test_half_open_lets_one_probe_through_and_success_closes(stub) -> None:
    s = stub(Switch(slow_s=0.3))
    s.reply.mode = "error"
    ups = {"big": up(s.base_url, timeout_s=2.0, circuit_cooldown_s=0.3)}

    async def go() -> None:
        async with client(ups) as c:
            b = c.breakers["big"]
            for _ in range(2):
                await timed(c.chat("big", BODY))
            assert b.state == "open"
            skipped, _ = await timed(c.chat("big", BODY))
            assert isinstance(skipped, CircuitOpen) and len(s.bodies) == 2
            await asyncio.sleep(0.35)
            assert b.state == "half-open"
            s.reply.mode = "slow"  # the probe takes 0.3 s: the calls beside it are skipped
            results = await asyncio.gather(*(timed(c.chat("big", BODY)) for _ in range(3)))
            answered = [r for r, _ in results if not isinstance(r, Exception)]
            refused = [(r, t) for r, t in results if isinstance(r, CircuitOpen)]
            assert len(answered) == 1 and len(refused) == 2
            assert all(t < 0.2 for _, t in refused)
            assert len(s.bodies) == 3  # only the probe reached the upstream
            assert b.state == "closed" and b.consecutive == 0
            s.reply.mode = "ok"
            res, _ = await timed(c.chat("big", BODY))
            assert res.response["choices"][0]["message"]["content"] == "fine"

    asyncio.run(go())


def test_a_failed_probe_opens_the_circuit_again(stub) -> None:
    s = stub(Switch())
    s.reply.mode = "error"
    ups = {"big": up(s.base_url, circuit_cooldown_s=0.2)}

    async def go() -> None:
        async with client(ups) as c:
            for _ in range(2):
                await timed(c.chat("big", BODY))
            await asyncio.sleep(0.25)
            probe, _ = await timed(c.chat("big", BODY))
            assert not isinstance(probe, CircuitOpen) and len(s.bodies) == 3
            assert c.breakers["big"].state == "open"
            again, _ = await timed(c.chat("big", BODY))
            assert isinstance(again, CircuitOpen) and len(s.bodies) == 3

    asyncio.run(go())


def test_a_4xx_answer_does_not_open_the_circuit(stub) -> None:
    s = stub(Reply(status=400))
    ups = {"big": up(s.base_url)}

    async def go() -> None:
        async with client(ups) as c:
            for _ in range(4):
                await timed(c.chat("big", BODY))
            assert c.breakers["big"].state == "closed"

    asyncio.run(go())
    assert len(s.bodies) == 4


def test_streams_count_too(stub) -> None:
    s = stub(Switch())
    s.reply.mode = "error"
    ups = {"big": up(s.base_url)}

    async def go() -> None:
        async with client(ups) as c:
            for _ in range(2):
                await timed(c.stream_chat("big", {**BODY, "stream": True}))
            skipped, elapsed = await timed(c.stream_chat("big", {**BODY, "stream": True}))
            assert isinstance(skipped, CircuitOpen) and elapsed < 0.2

    asyncio.run(go())
    assert len(s.bodies) == 2


# ------------------------------------------------------------------------------- config


def test_defaults_and_checks() -> None:
    cfg = UpstreamConfig(base_url="http://127.0.0.1:1/v1", model="m")
    assert (cfg.circuit_failures, cfg.circuit_cooldown_s, cfg.max_tokens) == (5, 30.0, 4096)
    raw = {"upstreams": {"big": {"base_url": "http://127.0.0.1:1/v1", "model": "m",
                                 "circuit_failures": -1, "circuit_cooldown_s": 0,
                                 "max_tokens": 0}},
           "routes": {"r": {"small": "m", "large": ["big"], "policy": "always-large"}}}
    with pytest.raises(ConfigError) as e:
        parse_routes(raw)
    for key in ("circuit_failures", "circuit_cooldown_s", "max_tokens"):
        assert f"upstreams.big.{key}" in str(e.value)
    raw["upstreams"]["big"].update(circuit_failures=0, circuit_cooldown_s=1.5, max_tokens=None)
    big = parse_routes(raw).upstreams["big"]
    assert (big.circuit_failures, big.circuit_cooldown_s, big.max_tokens) == (0, 1.5, None)
