"""kill -9 in the middle of writing: a process creating tenants and keys (each with its
audit event), audit rows and ledger rows in a loop, reporting each step once committed, is
SIGKILLed at a random moment. Reopened, the store opens, holds everything reported, and
nothing half-written: no tenant or key without its audit event, every ledger row whole."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import sqlalchemy as sa

from fleetlm.router.ledger import Ledger
from fleetlm.state import AuditLog, KeyStore, TenantStore, open_state
from fleetlm.state.migrations import LATEST

WRITER = textwrap.dedent("""
    import json, sys
    from fleetlm.router.ledger import Ledger, LedgerEntry
    from fleetlm.state import AuditEvent, AuditLog, open_state
    from fleetlm.state.admin import create_key, create_tenant
    db = open_state(sys.argv[1])
    ledger, log = Ledger(db), AuditLog(db)
    i = 0
    while True:
        create_tenant(db, f"t{i}", actor="cli:writer")
        secret, key = create_key(db, f"t{i}", "user", name=str(i), actor="cli:writer")
        log.record(AuditEvent(action="test.step", outcome="ok", tenant=f"t{i}", target=str(i)))
        for j in range(20):
            ledger.record(LedgerEntry(route="r", decision="large", upstream="u", tenant=f"t{i}",
                                      request_id=f"{i}-{j}", cost_usd=0.5, pii={"PERSON": j}))
        ledger.flush()
        # everything of step i is committed
        print(json.dumps({"i": i, "secret": secret, "key": key.id}), flush=True)
        i += 1
""")


def _write_then_kill(url: str, steps: int) -> list[dict[str, str]]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    done: list[dict[str, str]] = []
    try:
        deadline = time.monotonic() + 60
        while len(done) < steps and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            done.append(json.loads(line))
        time.sleep(random.uniform(0, 0.03))  # somewhere inside the next steps
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert len(done) >= steps, f"the writer did not get going: {proc.stderr.read()[-2000:]}"  # type: ignore[union-attr]
    return done


def test_sigkill_mid_write_keeps_every_committed_step(state_url: str) -> None:
    done = _write_then_kill(state_url, steps=25)
    with open_state(state_url) as db:
        tenants = {t.name for t in TenantStore(db).list()}
        keys = KeyStore(db)
        events = AuditLog(db).query(limit=100_000)
        for step in done:  # everything reported is there
            i = step["i"]
            assert f"t{i}" in tenants
            found = keys.lookup(step["secret"])
            assert found is not None and found.id == step["key"] and found.name == str(i)
        # nothing half-written: each tenant and key came with its audit event
        by = {(e.action, e.target) for e in events}
        assert all(("tenant.create", t) in by for t in tenants)
        assert all(("key.create", k.id) in by for k in keys.list())
        assert {e.target for e in events if e.action == "test.step"} >= {str(s["i"]) for s in done}
        with Ledger(db) as ledger:
            rows = ledger.query()
            n = len(rows)
            assert n >= 20 * len(done)
            # whole rows, in order, no gap: a prefix of what the writer sent
            want = [f"{i}-{j}" for i in range(n // 20 + 1) for j in range(20)][:n]
            assert [r.request_id for r in rows] == want
            assert all(r.pii == {"PERSON": int(r.request_id.split("-")[1])} for r in rows)
            assert ledger.spend(f"t{len(done) - 1}", since=0) == 10.0
        with db.read() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM schema_migrations")).scalar() == LATEST
    if state_url.startswith("sqlite"):
        conn = sqlite3.connect(state_url.removeprefix("sqlite:///"))
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
