"""What a tenant may do: its patterns, its per-request caps, its rate and its budget.

    limiter = RateLimiter()
    limiter.admit("acme", policy)            # 429 with Retry-After when over rpm or tpm
    limiter.add_tokens("acme", 812)          # prompt + completion tokens, as they are known
    check_target(policy, route=None, model="smollm2-135m", adapter="b77")   # 403 if not allowed
    check_caps(policy, max_tokens=64, n=1)                                  # 400 over a cap
    budgets = Budgets(ledger.spend)
    await budgets.exceeded("acme", policy)   # "daily" / "monthly" / None, before escalating

Rates are counted in 60 one-second buckets per tenant (memory per tenant is fixed, whatever
the traffic): requests when admitted, tokens when the engine or an upstream reports them, so
a request that would pass the token limit is still admitted while the window is below it
(the next one waits). With a state store (``shared``), every process serving it adds its
counts to the store's ``rate_counts`` and reads everyone else's about once a second
(:mod:`fleetlm.state.rates`, off the event loop), so a tenant's limit holds across
replicas, give or take the last second of the other replicas' traffic. If the store cannot
be reached, each process goes on with what it knows (its own counts and the others' last
read), logs a warning, and sends its counts when the store is back. The budgets, read from
the shared ledger, are global too.

Budgets are upstream spend (USD, the ledger's ``cost_usd`` of rows answered by an upstream)
per UTC day and per UTC calendar month. The ledger is read at most every ``ttl_s`` per
tenant and period, off the event loop, and spend recorded by this process since is added,
so a burst of escalations cannot all slip past the check between two reads.

This module knows tenants' policies and HTTP errors; it does not know keys, routes or the
engine.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from fleetlm.server.errors import INVALID_REQUEST, APIError

if TYPE_CHECKING:
    from fleetlm.state.rates import RateCounts
    from fleetlm.state.tenants import TenantPolicy

log = logging.getLogger(__name__)

WINDOW_S = 60
PERMISSION = "permission_error"


class Window:
    """Counts over the last 60 seconds, in one-second buckets."""

    __slots__ = ("counts", "stamps")

    def __init__(self) -> None:
        self.counts = [0] * WINDOW_S
        self.stamps = [-WINDOW_S] * WINDOW_S  # the second each bucket counts

    def total(self, now: float) -> int:
        sec = int(now)
        return sum(c for c, s in zip(self.counts, self.stamps, strict=True) if s > sec - WINDOW_S)

    def add(self, now: float, n: int) -> None:
        sec = int(now)
        i = sec % WINDOW_S
        if self.stamps[i] != sec:
            self.stamps[i], self.counts[i] = sec, 0
        self.counts[i] += n

    def merged(self, other: Window) -> Window:
        """Both windows' counts together (per bucket, the newer second wins; the same second
        adds up)."""
        out = Window()
        for i in range(WINDOW_S):
            a, b = (self.stamps[i], self.counts[i]), (other.stamps[i], other.counts[i])
            out.stamps[i], out.counts[i] = max(a, b) if a[0] != b[0] else (a[0], a[1] + b[1])
        return out

    def retry_after(self, now: float, limit: int) -> int:
        """Whole seconds until the window's total is below ``limit`` again (at least 1)."""
        sec = int(now)
        live = sorted((s, c) for c, s in zip(self.counts, self.stamps, strict=True)
                      if s > sec - WINDOW_S and c)
        total = sum(c for _, c in live)
        for s, c in live:
            total -= c
            if total < limit:
                return max(1, s + WINDOW_S - sec)
        return 1


class RateLimiter:
    """Requests and tokens per minute of each tenant: this process's counts, plus (with
    ``shared``) what the other processes of the same state store counted."""

    def __init__(self, clock: Callable[[], float] = time.time, *,
                 shared: RateCounts | None = None, sync_s: float = 1.0) -> None:
        self.clock, self.shared, self.sync_s = clock, shared, sync_s
        self.requests: dict[str, Window] = {}
        self.tokens: dict[str, Window] = {}
        self.others: dict[tuple[str, str], Window] = {}  # (tenant, kind): the last read
        self.source = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._limited: set[str] = set()  # tenants with a rate limit: only theirs are shared
        self._pending: Counter[tuple[str, str, int]] = Counter()  # not yet sent
        self._task: asyncio.Task[None] | None = None
        self._store_down = False

    def admit(self, tenant: str, policy: TenantPolicy | None) -> None:
        """Count one request of ``tenant``, or raise 429 (with Retry-After) when it is over
        its requests or tokens per minute. Nothing is counted for a refused request."""
        if policy is None or (policy.rpm is None and policy.tpm is None):
            return
        self._limited.add(tenant)
        self._start_sync()
        now = self.clock()
        reqs = self._window("requests", tenant)
        if policy.rpm is not None and reqs.total(now) >= policy.rpm:
            raise _too_many(f"tenant {tenant!r} is over its limit of {policy.rpm} requests per "
                            "minute", reqs.retry_after(now, policy.rpm), "rpm")
        if policy.tpm is not None:
            toks = self._window("tokens", tenant)
            if toks.total(now) >= policy.tpm:
                raise _too_many(f"tenant {tenant!r} is over its limit of {policy.tpm} tokens "
                                "per minute", toks.retry_after(now, policy.tpm), "tpm")
        self._count(self.requests, "requests", tenant, now, 1)

    def add_tokens(self, tenant: str, n: int) -> None:
        """Count ``n`` tokens (prompt or completion) of ``tenant`` now."""
        if n > 0:
            self._count(self.tokens, "tokens", tenant, self.clock(), n)

    def _window(self, kind: str, tenant: str) -> Window:
        """This process's window of ``kind``, with the other processes' counts added."""
        own = (self.requests if kind == "requests" else self.tokens).setdefault(tenant, Window())
        others = self.others.get((tenant, kind))
        return own if others is None else own.merged(others)

    def _count(self, windows: dict[str, Window], kind: str, tenant: str, now: float,
               n: int) -> None:
        windows.setdefault(tenant, Window()).add(now, n)
        if self.shared is not None and tenant in self._limited:
            self._pending[(tenant, kind, int(now))] += n

    # -- sharing through the state store ---------------------------------------------------

    def _start_sync(self) -> None:
        if self.shared is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not serving (a direct call): this process's counts only
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        self._task = loop.create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(self.sync_s)

    async def sync(self) -> None:
        """Send this process's new counts and read the others' (one exchange, on a worker
        thread). A store that cannot be reached keeps the counts for the next try."""
        assert self.shared is not None
        pending, self._pending = self._pending, Counter()
        since = int(self.clock()) - WINDOW_S + 1
        counts = [(t, k, s, n) for (t, k, s), n in pending.items() if s >= since]
        try:
            rows = await asyncio.to_thread(self.shared.exchange, self.source, counts, since)
        except Exception as e:  # noqa: BLE001 -- limits go on locally; the store may be back
            if not self._store_down:  # once per outage, not every second
                log.warning("rate limits: the state store did not answer (%s); counting "
                            "this process's requests only until it does", e)
            self._store_down = True
            self._pending.update({(t, k, s): n for t, k, s, n in counts})
            return
        if self._store_down:
            log.warning("rate limits: the state store answers again; limits are shared")
            self._store_down = False
        others: dict[tuple[str, str], Window] = {}
        for tenant, kind, second, n in rows:
            others.setdefault((tenant, kind), Window()).add(second, n)
        self.others = others

    async def aclose(self) -> None:
        """Stop sharing; the counts not yet sent are sent now (best effort)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.shared is not None and self._pending:
            await self.sync()


def _too_many(message: str, retry_s: int, which: str) -> APIError:
    return APIError(429, f"{message}; retry in {retry_s} s, or ask an admin to raise it "
                         f"(`fleetlm tenants set NAME --{which} N`)", "rate_limit_exceeded",
                    None, f"tenant_{which}_exceeded", headers={"Retry-After": str(retry_s)})


def check_target(policy: TenantPolicy | None, *, route: str | None, model: str | None,
                 adapter: str | None) -> None:
    """403 unless the tenant may call the route, or the base ``model`` with ``adapter``."""
    if policy is None:
        return
    checks = ([("routes", route, policy.allows_route)] if route is not None else
              [("models", model, policy.allows_model), ("adapters", adapter, policy.allows_adapter)])
    for what, name, allowed in checks:
        if name is not None and not allowed(name):
            raise APIError(403, f"model: this key's tenant may not call {what[:-1]} {name!r} "
                                f"(its {what} patterns: {', '.join(getattr(policy, what))}); "
                                f"ask an admin (`fleetlm tenants set NAME --{what} ...`)",
                           PERMISSION, "model", "model_not_allowed")


def check_caps(policy: TenantPolicy | None, *, max_tokens: int | None, n: int,
               field: str = "max_tokens") -> None:
    """400 when the request asks for more tokens or choices than the tenant may."""
    if policy is None:
        return
    if policy.max_tokens is not None and max_tokens is not None and max_tokens > policy.max_tokens:
        raise APIError(400, f"{field}={max_tokens}: this key's tenant may ask for at most "
                            f"{policy.max_tokens}; send {field} <= {policy.max_tokens}",
                       INVALID_REQUEST, field, "max_tokens_over_tenant_limit")
    if policy.max_n is not None and n > policy.max_n:
        raise APIError(400, f"n={n}: this key's tenant may ask for at most {policy.max_n} "
                            f"choices; send n <= {policy.max_n}", INVALID_REQUEST, "n",
                       "n_over_tenant_limit")


def period_starts(now: float) -> tuple[float, float]:
    """Unix seconds of the start of the UTC day and of the UTC calendar month of ``now``."""
    t = time.gmtime(now)
    day = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    month = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    return float(day), float(month)


class Budgets:
    """Each tenant's upstream spend against its daily and monthly budgets.

    ``spend(tenant, since)`` reads the ledger (blocking: it is called on a worker thread).
    """

    def __init__(self, spend: Callable[[str, float], float], *, ttl_s: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.spend, self.ttl_s, self.clock = spend, ttl_s, clock
        # tenant -> period start -> [spend read + spend added since, when it was read]
        self._cache: dict[str, dict[float, list[float]]] = {}

    async def spent(self, tenant: str, since: float) -> float:
        periods = self._cache.setdefault(tenant, {})
        hit = periods.get(since)
        now = time.monotonic()
        if hit is None or now - hit[1] > self.ttl_s:
            value = await asyncio.to_thread(self.spend, tenant, since)
            if len(periods) > 4:  # last period's entries
                periods.clear()
            hit = periods[since] = [value, now]
        return hit[0]

    def add(self, tenant: str, usd: float) -> None:
        """Spend this process just recorded (until the next read includes it)."""
        for hit in self._cache.get(tenant, {}).values():
            hit[0] += usd

    async def exceeded(self, tenant: str, policy: TenantPolicy | None) -> str | None:
        """``"daily"`` or ``"monthly"`` when the tenant has spent its budget, else None."""
        if policy is None:
            return None
        day, month = period_starts(self.clock())
        for name, budget, since in (("daily", policy.budget_daily_usd, day),
                                    ("monthly", policy.budget_monthly_usd, month)):
            if budget is not None and await self.spent(tenant, since) >= budget - 1e-12:
                return name
        return None


def budget_error(tenant: str, period: str, policy: TenantPolicy) -> APIError:
    """The 402 of a route with ``over_budget: error`` for a tenant past its budget."""
    budget = policy.budget_daily_usd if period == "daily" else policy.budget_monthly_usd
    assert budget is not None and not math.isnan(budget)
    return APIError(402, f"tenant {tenant!r} has spent its {period} budget of ${budget:g} for "
                         "large-model escalations; wait for the next period or ask an admin "
                         f"(`fleetlm tenants set NAME --budget-{period}-usd X`)",
                    "insufficient_quota", None, "budget_exceeded")
