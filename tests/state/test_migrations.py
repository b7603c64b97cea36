"""Migrations: a new store gets every table as schema.py describes it, each migration runs
once even when processes open a new store together, a ledger file from before the state
store is adopted with its rows, and a store newer than this code is refused."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from fleetlm.router.ledger import Ledger, LedgerEntry, LedgerError
from fleetlm.state import StateError, open_state
from fleetlm.state.migrations import LATEST, MIGRATIONS, current_version, upgrade
from fleetlm.state.schema import metadata


def test_a_new_store_matches_schema_py(state_url: str) -> None:
    with open_state(state_url) as db, db.read() as conn:
        insp = sa.inspect(conn)
        assert current_version(conn) == LATEST == len(MIGRATIONS)
        rows = conn.exec_driver_sql("SELECT version, name FROM schema_migrations "
                                    "ORDER BY version").all()
        assert [tuple(r) for r in rows] == [(m.version, m.name) for m in MIGRATIONS]
        for table in metadata.tables.values():
            # SQLite reports its INTEGER PRIMARY KEY (the rowid, never NULL) as nullable
            rowid = {c.name for c in table.primary_key.columns
                     if db.dialect == "sqlite" and isinstance(c.type, sa.Integer)}
            got = {c["name"]: c["nullable"] and c["name"] not in rowid
                   for c in insp.get_columns(table.name)}
            want = {c.name: c.nullable for c in table.columns}
            assert got == want, table.name
            got_idx = {i["name"]: tuple(i["column_names"]) for i in insp.get_indexes(table.name)}
            for idx in table.indexes:
                assert got_idx[idx.name] == tuple(c.name for c in idx.columns), idx.name
        assert conn.exec_driver_sql("SELECT version FROM schema_version").scalar() == 1


def test_opening_again_changes_nothing(state_url: str) -> None:
    open_state(state_url).close()
    with open_state(state_url) as db:
        assert upgrade(db.engine) == []
        with db.read() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM schema_migrations").scalar() == LATEST


def test_threads_opening_a_new_store_together_apply_each_migration_once(state_url: str) -> None:
    n = 6
    dbs = [open_state(state_url, migrate=False) for _ in range(n)]  # separate engines
    barrier = threading.Barrier(n)
    applied: list[list[int]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            applied[i] = upgrade(dbs[i].engine)
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert sorted(v for a in applied for v in a) == list(range(1, LATEST + 1))
        assert sum(1 for a in applied if a) == 1  # one thread did it all, in one transaction
        with dbs[0].read() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM schema_migrations").scalar() == LATEST
            assert conn.exec_driver_sql("SELECT count(*) FROM schema_version").scalar() == 1
    finally:
        for d in dbs:
            d.close()


OPENER = textwrap.dedent("""
    import sys, time
    from fleetlm.state.db import open_state
    from fleetlm.state.migrations import upgrade
    db = open_state(sys.argv[1], migrate=False)
    while time.time() < float(sys.argv[2]):   # start together
        time.sleep(0.001)
    print(",".join(map(str, upgrade(db.engine))))
    db.close()
""")


def test_processes_opening_a_new_store_together(state_url: str) -> None:
    import time

    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, state_url, str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    applied = [out.strip() for out, _ in outs]
    assert sorted(applied) == ["", "", "", ",".join(str(m.version) for m in MIGRATIONS)]
    with open_state(state_url) as db, db.read() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM schema_migrations").scalar() == LATEST


# the ledger file as fleetlm wrote it before the state store (router/ledger.py _SCHEMA)
OLD_LEDGER = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,                 -- unix seconds, when the request arrived
    request_id TEXT NOT NULL DEFAULT '',
    tenant TEXT NOT NULL DEFAULT '',  -- tenant / API key id, never the key
    route TEXT NOT NULL,
    policy TEXT NOT NULL DEFAULT '',
    score REAL,                       -- the policy's score in [0, 1]; NULL when none
    decision TEXT NOT NULL CHECK (decision IN ('small', 'large', 'fallback', 'blocked')),
    model TEXT NOT NULL DEFAULT '',   -- the model that answered ('' when blocked)
    upstream TEXT,                    -- the upstream that answered, NULL for local
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    latency_ms REAL NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    baseline_cost_usd REAL,           -- all-large baseline; NULL when the route has no upstream
    pii TEXT NOT NULL DEFAULT '{}',   -- JSON {entity type: count}
    flags TEXT NOT NULL DEFAULT '[]'  -- JSON list, e.g. ["usage_estimated"]
)""",
    "CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts)",
)


def old_ledger(path: Path, version: int = 1, rows: int = 3) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    for stmt in OLD_LEDGER:
        conn.execute(stmt)
    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    for i in range(rows):
        conn.execute("INSERT INTO requests (ts, route, decision, upstream, cost_usd, tenant, pii) "
                     "VALUES (?, 'support', 'large', 'big', 0.5, 'acme', '{\"PERSON\": 1}')",
                     (100.0 + i,))
    conn.commit()
    conn.close()
    return path


def test_an_old_ledger_file_is_adopted_with_its_rows(tmp_path: Path) -> None:
    path = old_ledger(tmp_path / "ledger.sqlite3")
    # a report reads it as it is: nothing migrated, nothing written
    before = path.read_bytes()
    with Ledger(path, readonly=True) as ro:
        assert ro.count() == 3
    assert path.read_bytes() == before
    with open_state(path) as db:
        with db.read() as conn:
            assert current_version(conn) == LATEST
            assert conn.exec_driver_sql("SELECT count(*) FROM tenants").scalar() == 0
        with Ledger(db) as ledger:
            rows = ledger.query()
            assert [r.ts for r in rows] == [100.0, 101.0, 102.0]
            assert rows[0].pii == {"PERSON": 1} and rows[0].id == 1
            assert ledger.spend("acme", since=0) == pytest.approx(1.5)
            ledger.record(LedgerEntry(route="support", decision="small", ts=200.0))
            assert [r.id for r in ledger.query()] == [1, 2, 3, 4]
            assert ledger.schema_version() == 1
    # the old ledger code can still read the adopted file (same table, same version)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 1
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_an_old_ledger_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    path = old_ledger(tmp_path / "ledger.sqlite3", version=2)
    with pytest.raises(StateError, match="has schema version 2; this fleetlm reads up to 1. "
                                         "Upgrade fleetlm"):
        open_state(path)
    with open_state(path, migrate=False):  # nothing was applied: the refusal rolled back
        pass
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'tenants'"
                        ).fetchone()[0] == 0
    conn.close()
    with pytest.raises(LedgerError, match="schema version 2"):
        Ledger(path, readonly=True)


def test_a_newer_store_is_refused(state_url: str) -> None:
    with open_state(state_url) as db, db.write() as conn:
        conn.exec_driver_sql("INSERT INTO schema_migrations (version, name, applied_ts) "
                             f"VALUES ({LATEST + 1}, 'from_the_future', 0)")
    for migrate in (True, False):
        with pytest.raises(StateError, match=f"schema version {LATEST + 1}, newer than this "
                                             f"fleetlm knows \\({LATEST}\\): upgrade fleetlm"):
            open_state(state_url, migrate=migrate)


def test_a_failing_migration_leaves_the_version_it_had(state_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import fleetlm.state.migrations as mig

    def broken(conn: sa.Connection) -> None:
        conn.exec_driver_sql("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("migration 3 failed")

    monkeypatch.setattr(mig, "MIGRATIONS", (*MIGRATIONS[:2], mig.Migration(3, "audit", broken)))
    with pytest.raises(RuntimeError, match="migration 3 failed"):
        open_state(state_url)
    monkeypatch.undo()
    with open_state(state_url, migrate=False) as db, db.read() as conn:
        assert current_version(conn) == 0  # all or nothing
        assert not sa.inspect(conn).has_table("half_done")
        assert not sa.inspect(conn).has_table("tenants")
    with open_state(state_url) as db, db.read() as conn:
        assert current_version(conn) == LATEST
