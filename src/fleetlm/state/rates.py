"""Tenants' request and token counts per second, shared by every serving process of one
state store, so that ``rpm``/``tpm`` limits hold for the tenant, not for each replica.

    rates = RateCounts(db)
    others = rates.exchange("ingress-3f2a", [("acme", "requests", 1765100000, 4)],
                            since=1765099941)
    # -> [("acme", "requests", 1765099990, 12), ...]: what every other process counted

Each process adds its own counts (rows keyed by tenant, kind, second and its ``source``)
and reads the sums of everyone else's for the window; rows older than the window are
deleted by whoever exchanges. The server's rate limiter (fleetlm.server.limits) calls this
about once a second, off the event loop, and adds what it reads to its own counts.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from fleetlm.state.schema import rate_counts

if TYPE_CHECKING:
    from fleetlm.state.db import StateDB

Count = tuple[str, str, int, int]  # tenant, kind ("requests" | "tokens"), unix second, n


class RateCounts:
    """The ``rate_counts`` table of a state store."""

    PRUNE_EVERY_S = 10.0

    def __init__(self, db: StateDB) -> None:
        self.db = db
        self._pruned_at = 0.0

    def exchange(self, source: str, counts: list[Count], since: int) -> list[Count]:
        """Add ``counts`` (this ``source``'s, since its last exchange), drop rows older than
        ``since`` (at most every ``PRUNE_EVERY_S``), and return every other source's counts
        from ``since`` on, summed per tenant, kind and second."""
        t = rate_counts
        prune = time.monotonic() - self._pruned_at > self.PRUNE_EVERY_S
        if counts or prune:
            self._write(source, counts, since, prune)
        with self.db.read() as conn:
            found = conn.execute(
                sa.select(t.c.tenant, t.c.kind, t.c.second, sa.func.sum(t.c.n))
                .where(t.c.second >= since, t.c.source != source)
                .group_by(t.c.tenant, t.c.kind, t.c.second))
            return [(te, k, int(s), int(n)) for te, k, s, n in found]

    def _write(self, source: str, counts: list[Count], since: int, prune: bool) -> None:
        t = rate_counts
        with self.db.write() as conn:
            if counts:
                rows = [{"tenant": te, "kind": k, "second": s, "source": source, "n": n}
                        for te, k, s, n in counts]
                insert = _insert(conn)(t)
                conn.execute(insert.on_conflict_do_update(
                    index_elements=[t.c.tenant, t.c.kind, t.c.second, t.c.source],
                    set_={"n": t.c.n + insert.excluded.n}), rows)
            if prune:
                conn.execute(sa.delete(t).where(t.c.second < since))
        if prune:
            self._pruned_at = time.monotonic()


def _insert(conn: sa.Connection) -> Any:
    """The dialect's INSERT, which has ON CONFLICT DO UPDATE (both have the same form)."""
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
