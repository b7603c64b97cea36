"""Rate limits shared through the state store (SQLite and PostgreSQL): the counts table
itself, then two rate limiters over one store -- two replicas -- holding one tenant to
one limit, a store that stops answering, and counts sent on the way out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fleetlm.server.errors import APIError
from fleetlm.server.limits import RateLimiter
from fleetlm.state import StateDB, TenantPolicy
from fleetlm.state.rates import RateCounts

T0 = 1_765_100_000  # a unix second


class Clock:
    def __init__(self, t: float = T0 + 0.5) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_each_source_reads_the_others_counts_summed_per_second(db: StateDB) -> None:
    a, b, c = RateCounts(db), RateCounts(db), RateCounts(db)
    assert a.exchange("a", [("acme", "requests", T0, 2), ("acme", "tokens", T0, 40)],
                      since=T0 - 59) == []
    # the same second again adds up; a second source's count of that second sums with it
    a.exchange("a", [("acme", "requests", T0, 1)], since=T0 - 59)
    assert sorted(b.exchange("b", [("acme", "requests", T0, 5), ("beta", "requests", T0 + 1, 1)],
                             since=T0 - 59)) == [("acme", "requests", T0, 3),
                                                 ("acme", "tokens", T0, 40)]
    assert sorted(c.exchange("c", [], since=T0 - 59)) == [
        ("acme", "requests", T0, 8), ("acme", "tokens", T0, 40), ("beta", "requests", T0 + 1, 1)]
    # a window that has moved on: old seconds are not read, and are deleted (by each
    # source at most every PRUNE_EVERY_S: c pruned on its first exchange)
    assert c.exchange("c", [], since=T0 + 1) == [("beta", "requests", T0 + 1, 1)]

    def rows() -> int:
        with db.read() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM rate_counts").scalar() or 0)

    assert rows() == 4
    c.PRUNE_EVERY_S = 0
    c.exchange("c", [], since=T0 + 1)
    assert rows() == 1


def test_two_replicas_hold_a_tenant_to_one_requests_per_minute(db: StateDB) -> None:
    clock = Clock()
    a = RateLimiter(clock, shared=RateCounts(db))
    b = RateLimiter(clock, shared=RateCounts(db))
    policy = TenantPolicy(rpm=4)
    a.admit("acme", policy)
    a.admit("acme", policy)
    b.admit("acme", policy)
    asyncio.run(a.sync())
    asyncio.run(b.sync())
    b.admit("acme", policy)  # 2 on a + 2 on b: the limit
    asyncio.run(b.sync())
    asyncio.run(a.sync())
    for lim in (a, b):
        with pytest.raises(APIError) as e:
            lim.admit("acme", policy)
        assert e.value.status == 429 and e.value.code == "tenant_rpm_exceeded"
        assert 1 <= int(e.value.headers["Retry-After"]) <= 60
    # without the store each would have let 4 through: 8 for the tenant
    alone = RateLimiter(clock)
    for _ in range(4):
        alone.admit("acme", policy)
    # a minute on, the window is empty everywhere
    clock.t += 61
    asyncio.run(a.sync())
    a.admit("acme", policy)


def test_tokens_are_shared_and_only_limited_tenants_are_sent(db: StateDB) -> None:
    clock = Clock()
    a = RateLimiter(clock, shared=RateCounts(db))
    b = RateLimiter(clock, shared=RateCounts(db))
    a.admit("tok", TenantPolicy(tpm=100))
    a.add_tokens("tok", 120)
    a.add_tokens("free", 10_000)  # no limit was ever applied to it: not sent
    asyncio.run(a.sync())
    asyncio.run(b.sync())
    assert set(b.others) == {("tok", "requests"), ("tok", "tokens")}
    with pytest.raises(APIError) as e:
        b.admit("tok", TenantPolicy(tpm=100))
    assert e.value.code == "tenant_tpm_exceeded"


class Down:
    """A store that stops answering, then comes back."""

    def __init__(self, db: StateDB) -> None:
        self.real, self.down = RateCounts(db), True

    def exchange(self, *args: Any) -> Any:
        if self.down:
            raise ConnectionError("connection refused")
        return self.real.exchange(*args)


def test_a_store_that_stops_answering_leaves_local_limits_and_loses_no_count(
        db: StateDB, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    down = Down(db)
    a = RateLimiter(clock, shared=down)  # type: ignore[arg-type]
    policy = TenantPolicy(rpm=3)
    for _ in range(3):
        a.admit("acme", policy)
    asyncio.run(a.sync())
    asyncio.run(a.sync())
    assert caplog.text.count("did not answer") == 1  # once per outage
    with pytest.raises(APIError):  # its own counts still hold it
        a.admit("acme", policy)
    down.down = False
    asyncio.run(a.sync())  # the 3 counted while it was down arrive now
    assert "answers again" in caplog.text
    b = RateLimiter(clock, shared=RateCounts(db))
    asyncio.run(b.sync())
    with pytest.raises(APIError):
        b.admit("acme", policy)


def test_counts_not_yet_sent_are_sent_on_close(db: StateDB) -> None:
    clock = Clock()

    async def serve_then_stop() -> None:
        a = RateLimiter(clock, shared=RateCounts(db), sync_s=3600)
        a.admit("acme", TenantPolicy(rpm=2))  # starts the exchange task: one sync at once
        await asyncio.sleep(0.2)
        a.admit("acme", TenantPolicy(rpm=2))  # not sent before the next hour
        await a.aclose()
        assert a._task is not None and a._task.done()

    asyncio.run(serve_then_stop())
    b = RateLimiter(clock, shared=RateCounts(db))
    asyncio.run(b.sync())
    with pytest.raises(APIError):
        b.admit("acme", TenantPolicy(rpm=2))
