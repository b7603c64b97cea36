"""What ``fleetlm keys list``, ``fleetlm tenants list`` and ``fleetlm audit`` print: rich
tables for people and JSON for scripts. Times are UTC, ``2026-11-01 09:30Z``.

This module lays out what the stores return; it reads and writes nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from fleetlm.state.audit import AuditEvent
from fleetlm.state.keys import ApiKey
from fleetlm.state.tenants import PATTERN_FIELDS, Tenant


def when(ts: float | None) -> str:
    """``2026-11-01 09:30Z`` (UTC); "" for None."""
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%MZ")


def keys_json(keys: Sequence[ApiKey], now: float | None = None) -> str:
    now = time.time() if now is None else now
    return json.dumps([k.to_dict(now) for k in keys], indent=2)


def keys_table(keys: Sequence[ApiKey], now: float | None = None) -> Any:
    from rich.table import Table

    now = time.time() if now is None else now
    table = Table(title=f"{len(keys)} API key(s)")
    for col in ("id", "prefix", "tenant", "role", "name", "created", "expires", "status"):
        table.add_column(col)
    for k in keys:
        status = k.status(now)
        table.add_row(k.id, k.prefix, k.tenant, k.role, k.name, when(k.created),
                      when(k.expires) or "never",
                      status + (f" {when(k.revoked)}" if k.revoked is not None else ""),
                      style=None if status == "active" else "dim")
    return table


def tenants_json(tenants: Sequence[Tenant]) -> str:
    return json.dumps([t.to_dict() for t in tenants], indent=2)


def _limit(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def tenants_table(tenants: Sequence[Tenant]) -> Any:
    from rich.table import Table

    table = Table(title=f"{len(tenants)} tenant(s)")
    cols = ("name", *PATTERN_FIELDS, "rpm", "tpm", "budget/day", "budget/month", "max_tokens",
            "max_n", "updated")
    for col in cols:
        table.add_column(col, justify="left" if col in ("name", *PATTERN_FIELDS) else "right")
    for t in tenants:
        p = t.policy
        table.add_row(t.name, *(",".join(getattr(p, f)) or "(none)" for f in PATTERN_FIELDS),
                      *(_limit(v) for v in (p.rpm, p.tpm)),
                      *("-" if v is None else f"${v:g}"
                        for v in (p.budget_daily_usd, p.budget_monthly_usd)),
                      *(_limit(v) for v in (p.max_tokens, p.max_n)), when(t.updated))
    return table


def audit_json(events: Sequence[AuditEvent]) -> str:
    return json.dumps([e.to_dict() for e in events], indent=2)


def audit_table(events: Sequence[AuditEvent]) -> Any:
    from rich.table import Table

    table = Table(title=f"{len(events)} audit event(s), oldest first")
    for col in ("time", "actor", "tenant", "action", "target", "outcome", "remote", "detail"):
        table.add_column(col)
    for e in events:
        table.add_row(when(e.ts), e.actor, e.tenant, e.action, e.target, e.outcome, e.remote,
                      json.dumps(e.detail, sort_keys=True) if e.detail else "",
                      style="red" if e.outcome != "ok" else None)
    return table
