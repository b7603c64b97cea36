"""The audit log: one row per administrative action (adapters added, replaced, deleted or
pinned; keys created or revoked; tenants created or changed) and per refused request, with
who did it, for which tenant, from where, and how it ended.

    log = AuditLog(db)
    log.record(AuditEvent(action="key.create", outcome="ok", actor="cli:alice",
                          tenant="acme", target="key_0123456789ab"))
    log.query(since=time.time() - 7 * 86400, action="adapter.")   # oldest first

The table is append-only in the database itself: triggers refuse UPDATE and DELETE (and
TRUNCATE on PostgreSQL), whatever code runs against it. ``record`` is synchronous and
committed when it returns: callers on an event loop call it from a thread. ``detail`` is
JSON and must never carry a secret: a string shaped like an API key is refused.

This module knows the events' shape; which actions exist is the callers' business.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from fleetlm.state.db import StateDB
from fleetlm.state.keys import looks_like_secret
from fleetlm.state.schema import audit

OUTCOMES = ("ok", "denied", "error")


@dataclass(kw_only=True)
class AuditEvent:
    """One audited action. ``action``: ``adapter.add``, ``adapter.replace``,
    ``adapter.delete``, ``adapter.pin``, ``key.create``, ``key.revoke``, ``tenant.create``,
    ``tenant.set``, ``auth.refused``... ``actor``: a key id, ``cli:<os user>`` or
    ``anonymous``. ``remote``: the client's address. ``id`` is set by the database."""

    action: str
    outcome: str
    actor: str = ""
    tenant: str = ""
    target: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    remote: str = ""
    ts: float = field(default_factory=time.time)
    id: int | None = None

    def check(self) -> str:
        """The detail as JSON; ValueError on a malformed event (a caller bug)."""
        if not self.action:
            raise ValueError("an audit event needs an action (e.g. key.create)")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        text = json.dumps(self.detail, sort_keys=True)  # TypeError on what JSON cannot hold
        for v in (self.actor, self.tenant, self.target, self.remote, self.action, text):
            if looks_like_secret(v):
                raise ValueError("an audit event must not carry an API key secret")
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cli_actor() -> str:
    """``cli:<os user>``: the actor of an admin command run on this machine."""
    try:
        return "cli:" + getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return f"cli:uid{os.getuid()}"


def insert_event(conn: sa.Connection, event: AuditEvent) -> int:
    """Append ``event`` inside the caller's transaction; its id (also set on the event)."""
    detail = event.check()
    values = asdict(event) | {"detail": detail}
    values.pop("id")
    pk = conn.execute(audit.insert().values(**values)).inserted_primary_key
    assert pk is not None
    event.id = int(pk[0])
    return event.id


def _event(row: Any) -> AuditEvent:
    return AuditEvent(id=row.id, ts=row.ts, actor=row.actor, tenant=row.tenant,
                      action=row.action, target=row.target, outcome=row.outcome,
                      detail=json.loads(row.detail), remote=row.remote)


class AuditLog:
    """The audit log of a state store."""

    def __init__(self, db: StateDB) -> None:
        self.db = db

    def record(self, event: AuditEvent) -> None:
        """Append ``event``; committed when this returns. ValueError on a malformed event."""
        with self.db.write() as conn:
            insert_event(conn, event)

    def query(self, *, since: float | None = None, until: float | None = None,
              tenant: str | None = None, action: str | None = None,
              limit: int = 1000) -> list[AuditEvent]:
        """The newest ``limit`` events with ``since <= ts < until``, oldest first. ``action``
        ending in "." matches by prefix ("adapter." -> adapter.add, adapter.delete...);
        without the dot it matches that action and its sub-actions ("key" -> key, key.create)."""
        q = sa.select(audit)
        if since is not None:
            q = q.where(audit.c.ts >= since)
        if until is not None:
            q = q.where(audit.c.ts < until)
        if tenant is not None:
            q = q.where(audit.c.tenant == tenant)
        if action:
            if action.endswith("."):
                q = q.where(audit.c.action.startswith(action, autoescape=True))
            else:
                q = q.where(sa.or_(audit.c.action == action,
                                   audit.c.action.startswith(action + ".", autoescape=True)))
        q = q.order_by(audit.c.ts.desc(), audit.c.id.desc()).limit(max(0, int(limit)))
        with self.db.read() as conn:
            rows = list(conn.execute(q))
        return [_event(r) for r in reversed(rows)]
