"""Administrative changes with their audit events: each change and its ``ok`` event are
written in ONE transaction (no key without its audit row, even after a crash), and a change
refused with a StateError is recorded as an ``error`` event before the error goes on.

    secret, key = create_key(db, "acme", "user", actor=cli_actor())
    revoke_key(db, key.id, actor="key_0123456789ab", remote="10.0.0.7")

Both the command line (actor ``cli:<os user>``) and the HTTP admin API (actor: the key id)
use these. This module knows which event each change makes; nothing of who may make it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa

from fleetlm.state.audit import AuditEvent, insert_event
from fleetlm.state.db import StateDB, StateError
from fleetlm.state.keys import ApiKey, insert_key, revoke_in
from fleetlm.state.tenants import Tenant, TenantPolicy, insert_tenant, update_tenant

T = TypeVar("T")
log = logging.getLogger(__name__)


def _audited(db: StateDB, event: AuditEvent,
             change: Callable[[sa.Connection, AuditEvent], T]) -> T:
    """Run ``change`` and append ``event`` (outcome ok) in one transaction; on a StateError,
    append ``event`` with outcome error and the message, then raise."""
    try:
        with db.write() as conn:
            out = change(conn, event)
            insert_event(conn, event)
        return out
    except StateError as e:
        event.outcome, event.id = "error", None
        event.detail = event.detail | {"error": str(e)}
        try:
            with db.write() as conn:
                insert_event(conn, event)
        except sa.exc.SQLAlchemyError as db_error:  # the refusal is the news, not this
            log.error("audit event %s not recorded: %s", event.action, db_error)
        raise


def create_key(db: StateDB, tenant: str, role: str, *, name: str = "",
               expires: float | None = None, actor: str, remote: str = ""
               ) -> tuple[str, ApiKey]:
    """A new key (see KeyStore.create) and its ``key.create`` event."""
    ev = AuditEvent(action="key.create", outcome="ok", actor=actor, tenant=tenant,
                    remote=remote, detail={"role": role, "name": name, "expires": expires})

    def change(conn: sa.Connection, ev: AuditEvent) -> tuple[str, ApiKey]:
        secret, key = insert_key(conn, tenant, role, name=name, expires=expires)
        ev.target = key.id
        ev.detail = ev.detail | {"prefix": key.prefix}
        return secret, key

    return _audited(db, ev, change)


def revoke_key(db: StateDB, key_id: str, *, actor: str, remote: str = "") -> ApiKey:
    """Revoke ``key_id`` (see KeyStore.revoke) with its ``key.revoke`` event."""
    ev = AuditEvent(action="key.revoke", outcome="ok", actor=actor, target=key_id,
                    remote=remote)

    def change(conn: sa.Connection, ev: AuditEvent) -> ApiKey:
        key = revoke_in(conn, key_id)
        ev.tenant = key.tenant
        ev.detail = {"revoked": key.revoked}
        return key

    return _audited(db, ev, change)


def create_tenant(db: StateDB, name: str, policy: TenantPolicy | None = None, *, actor: str,
                  remote: str = "") -> Tenant:
    """A new tenant with its ``tenant.create`` event (detail: the policy)."""
    ev = AuditEvent(action="tenant.create", outcome="ok", actor=actor, tenant=name,
                    target=name, remote=remote,
                    detail={"policy": (policy or TenantPolicy()).model_dump()})
    return _audited(db, ev, lambda conn, ev: insert_tenant(conn, name, policy))


def set_tenant(db: StateDB, name: str, changes: dict[str, Any], *, actor: str,
               remote: str = "") -> Tenant:
    """Change a tenant's policy (see TenantStore.set) with its ``tenant.set`` event (detail:
    each changed field's old and new value)."""
    ev = AuditEvent(action="tenant.set", outcome="ok", actor=actor, tenant=name, target=name,
                    remote=remote, detail={"changes": changes})

    def change(conn: sa.Connection, ev: AuditEvent) -> Tenant:
        before, after = update_tenant(conn, name, changes)
        old, new = before.policy.model_dump(), after.policy.model_dump()
        ev.detail = {"changes": {k: {"from": old[k], "to": new[k]}
                                 for k in new if old[k] != new[k]}}
        return after

    return _audited(db, ev, change)
