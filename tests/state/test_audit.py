"""The audit log on SQLite and PostgreSQL: events round-trip, filters, append-only in the
database (UPDATE/DELETE refused by triggers, whoever runs them), no secrets, and the admin
changes that write their event in the same transaction."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from fleetlm.state import AuditEvent, AuditLog, KeyStore, StateDB, StateError, TenantStore
from fleetlm.state.admin import create_key, create_tenant, revoke_key, set_tenant
from fleetlm.state.audit import cli_actor


def test_record_and_query_filters(db: StateDB) -> None:
    log = AuditLog(db)
    events = [
        AuditEvent(ts=10, action="adapter.add", outcome="ok", actor="key_a", tenant="acme",
                   target="support-v1", detail={"rank": 8}, remote="10.0.0.1"),
        AuditEvent(ts=20, action="adapter.delete", outcome="denied", actor="key_b",
                   tenant="other", target="support-v1"),
        AuditEvent(ts=30, action="key.create", outcome="ok", actor="cli:alice", tenant="acme",
                   target="key_c"),
        AuditEvent(ts=40, action="auth.refused", outcome="denied", actor="anonymous",
                   detail={"reason": "unknown key"}, remote="203.0.113.9"),
        AuditEvent(ts=50, action="adapters.x", outcome="error"),
    ]
    for e in events:
        log.record(e)
    assert [e.id for e in events] == sorted(e.id for e in events if e.id is not None)
    got = log.query()
    assert got == events  # oldest first, every field back (ids set by record)
    assert [e.ts for e in log.query(since=20, until=40)] == [20, 30]
    assert [e.target for e in log.query(tenant="acme")] == ["support-v1", "key_c"]
    assert [e.action for e in log.query(action="adapter.")] == ["adapter.add", "adapter.delete"]
    assert [e.action for e in log.query(action="adapter")] == ["adapter.add", "adapter.delete"]
    assert [e.action for e in log.query(action="adapter.add")] == ["adapter.add"]
    assert log.query(action="adapter%") == [] and log.query(action="adapter_") == []
    assert [e.ts for e in log.query(limit=2)] == [40, 50]  # the newest two, oldest first


def test_audit_is_append_only_in_the_database(db: StateDB) -> None:
    log = AuditLog(db)
    log.record(AuditEvent(action="key.create", outcome="ok"))
    for sql in ("UPDATE audit SET outcome = 'denied'", "DELETE FROM audit",
                *(["TRUNCATE audit"] if db.dialect == "postgresql" else [])):
        with pytest.raises(sa.exc.DatabaseError, match="audit is append-only"), \
                db.write() as conn:
            conn.exec_driver_sql(sql)
    (e,) = log.query()
    assert e.outcome == "ok"


def test_events_are_checked(db: StateDB) -> None:
    log = AuditLog(db)
    secret = "flm-" + "Xy" * 21 + "z"
    with pytest.raises(ValueError, match="secret"):
        log.record(AuditEvent(action="key.create", outcome="ok", detail={"key": secret}))
    with pytest.raises(ValueError, match="secret"):
        log.record(AuditEvent(action="auth.refused", outcome="denied", target=secret))
    with pytest.raises(ValueError, match="outcome"):
        log.record(AuditEvent(action="x", outcome="maybe"))
    with pytest.raises(ValueError, match="action"):
        log.record(AuditEvent(action="", outcome="ok"))
    with pytest.raises(TypeError):
        log.record(AuditEvent(action="x", outcome="ok", detail={"x": object()}))
    assert log.query() == []


def test_admin_changes_are_audited(db: StateDB) -> None:
    actor = cli_actor()
    assert actor.startswith("cli:") and len(actor) > 4
    create_tenant(db, "acme", actor=actor)
    secret, key = create_key(db, "acme", "user", name="ci", actor=actor, remote="127.0.0.1")
    set_tenant(db, "acme", {"rpm": 60, "models": ["a*"]}, actor=actor)
    revoke_key(db, key.id, actor="key_admin")
    with pytest.raises(StateError, match="no such tenant"):
        create_key(db, "nope", "admin", actor=actor)
    with pytest.raises(StateError, match="rpm"):
        set_tenant(db, "acme", {"rpm": 0}, actor=actor)
    events = AuditLog(db).query()
    assert [(e.action, e.outcome, e.tenant, e.target) for e in events] == [
        ("tenant.create", "ok", "acme", "acme"),
        ("key.create", "ok", "acme", key.id),
        ("tenant.set", "ok", "acme", "acme"),
        ("key.revoke", "ok", "acme", key.id),
        ("key.create", "error", "nope", ""),
        ("tenant.set", "error", "acme", "acme"),
    ]
    assert events[1].detail == {"role": "user", "name": "ci", "expires": None,
                                "prefix": key.prefix} and events[1].remote == "127.0.0.1"
    assert events[2].detail == {"changes": {"models": {"from": ["*"], "to": ["a*"]},
                                            "rpm": {"from": None, "to": 60}}}
    assert events[3].actor == "key_admin"
    assert "no such tenant" in events[4].detail["error"]
    assert secret not in repr(events)
    assert KeyStore(db).get(key.id).status() == "revoked"  # type: ignore[union-attr]
    assert TenantStore(db).get("acme").policy.rpm == 60  # type: ignore[union-attr]


def test_an_admin_change_and_its_event_commit_together(db: StateDB,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import fleetlm.state.admin as admin

    def failing_insert(conn: sa.Connection, event: AuditEvent) -> int:
        raise sa.exc.OperationalError("INSERT INTO audit", {}, Exception("disk full"))

    monkeypatch.setattr(admin, "insert_event", failing_insert)
    with pytest.raises(sa.exc.OperationalError):
        admin.create_tenant(db, "acme", actor="cli:x")
    assert TenantStore(db).get("acme") is None  # no change without its audit row
