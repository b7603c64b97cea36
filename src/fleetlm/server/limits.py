"""What a tenant may do: its patterns, its per-request caps, its rate and its budget.

    limiter = RateLimiter()
    limiter.admit("acme", policy)            # 429 with Retry-After when over rpm or tpm
    limiter.add_tokens("acme", 812)          # prompt + completion tokens, as they are known
    check_target(policy, route=None, model="smollm2-135m", adapter="b77")   # 403 if not allowed
    check_caps(policy, max_tokens=64, n=1)                                  # 400 over a cap
    budgets = Budgets(ledger.spend)
    await budgets.exceeded("acme", policy)   # "daily" / "monthly" / None, before escalating

Rates are counted per process in 60 one-second buckets per tenant (memory per tenant is
fixed, whatever the traffic): requests when admitted, tokens when the engine or an
upstream reports them, so a request that would pass the token limit is still admitted while
the window is below it (the next one waits). With several replicas each counts its own
traffic; the budgets, read from the shared ledger, are global.

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
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fleetlm.server.errors import INVALID_REQUEST, APIError

if TYPE_CHECKING:
    from fleetlm.state.tenants import TenantPolicy

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
    """Requests and tokens per minute of each tenant (this process's share)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.requests: dict[str, Window] = {}
        self.tokens: dict[str, Window] = {}

    def admit(self, tenant: str, policy: TenantPolicy | None) -> None:
        """Count one request of ``tenant``, or raise 429 (with Retry-After) when it is over
        its requests or tokens per minute. Nothing is counted for a refused request."""
        if policy is None or (policy.rpm is None and policy.tpm is None):
            return
        now = self.clock()
        reqs = self.requests.setdefault(tenant, Window())
        if policy.rpm is not None and reqs.total(now) >= policy.rpm:
            raise _too_many(f"tenant {tenant!r} is over its limit of {policy.rpm} requests per "
                            "minute", reqs.retry_after(now, policy.rpm), "rpm")
        if policy.tpm is not None:
            toks = self.tokens.setdefault(tenant, Window())
            if toks.total(now) >= policy.tpm:
                raise _too_many(f"tenant {tenant!r} is over its limit of {policy.tpm} tokens "
                                "per minute", toks.retry_after(now, policy.tpm), "tpm")
        reqs.add(now, 1)

    def add_tokens(self, tenant: str, n: int) -> None:
        """Count ``n`` tokens (prompt or completion) of ``tenant`` now."""
        if n > 0:
            self.tokens.setdefault(tenant, Window()).add(self.clock(), n)


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
