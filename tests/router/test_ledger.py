"""The ledger: WAL on, rows round-trip, savings numbers checked by hand, safe from many
threads, and a SIGKILL mid-write leaves every committed row readable. The tests taking
``state_url`` run on SQLite and on PostgreSQL (tests/postgres.py)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fleetlm.router.config import UpstreamConfig
from fleetlm.router.ledger import (
    Ledger,
    LedgerEntry,
    LedgerError,
    default_ledger_path,
    local_cost,
    open_readonly,
    upstream_cost,
)
from fleetlm.state import open_state

BIG = UpstreamConfig(base_url="http://h/v1", model="m", price_per_1m_input=2.5,
                     price_per_1m_output=10.0)


def test_cost_helpers() -> None:
    # 1000 in at $2.50/M + 1000 out at $10/M = 0.0025 + 0.01
    assert upstream_cost(BIG, 1000, 1000) == pytest.approx(0.0125)
    # $0.40/h for 9 s = 0.40 * 9 / 3600
    assert local_cost(0.40, 9000) == pytest.approx(0.001)
    assert local_cost(0.40, -5) == 0.0


def test_wal_mode_schema_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ledger.sqlite3"
    with Ledger(path) as ledger:
        assert ledger.journal_mode() == "wal"
        assert ledger.schema_version() == 1
        e = LedgerEntry(ts=100.0, request_id="r1", tenant="key-7", route="support",
                        policy="confidence", score=0.42, decision="large", model="some-large",
                        upstream="big", prompt_tokens=12, completion_tokens=3, latency_ms=250.0,
                        cost_usd=0.001, baseline_cost_usd=0.001,
                        pii={"PERSON": 2, "EMAIL_ADDRESS": 1}, flags=["usage_estimated"])
        ledger.record(e)
        (got,) = ledger.query()
        assert got.id is not None
        got.id = None
        assert got == e
        assert Path(str(path) + "-wal").exists()
    # a second connection sees the same, in WAL mode too (the mode is stored in the file)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == 1
    conn.close()


def test_entries_are_checked(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        with pytest.raises(ValueError, match="entity types"):
            ledger.record(LedgerEntry(route="r", decision="small", pii={"Jane Doe": 1}))
        with pytest.raises(ValueError, match="decision"):
            ledger.record(LedgerEntry(route="r", decision="maybe"))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="count"):
            ledger.record(LedgerEntry(route="r", decision="small", pii={"PERSON": -1}))
        assert ledger.count() == 0
    with pytest.raises(LedgerError, match="closed"):
        ledger.record(LedgerEntry(route="r", decision="small"))


def test_savings_by_hand(state_url: str) -> None:
    base = upstream_cost(BIG, 1000, 1000)  # 0.0125: the all-large price of 1000 + 1000 tokens
    rows = [
        # small answered: 9 s of a $0.40/h machine = 0.001
        LedgerEntry(ts=10, route="support", decision="small", prompt_tokens=1000,
                    completion_tokens=1000, latency_ms=9000, cost_usd=local_cost(0.4, 9000),
                    baseline_cost_usd=base),
        LedgerEntry(ts=20, route="support", decision="small", prompt_tokens=1000,
                    completion_tokens=1000, latency_ms=9000, cost_usd=local_cost(0.4, 9000),
                    baseline_cost_usd=base),
        # large answered: 2000 in, 500 out = 0.005 + 0.005
        LedgerEntry(ts=30, route="support", decision="large", upstream="big",
                    prompt_tokens=2000, completion_tokens=500,
                    cost_usd=upstream_cost(BIG, 2000, 500),
                    baseline_cost_usd=upstream_cost(BIG, 2000, 500)),
        # escalation failed, small answer sent: 0.0005 local
        LedgerEntry(ts=40, route="support", decision="fallback", prompt_tokens=1000,
                    completion_tokens=1000, cost_usd=0.0005, baseline_cost_usd=base,
                    flags=["usage_estimated"]),
        LedgerEntry(ts=50, route="support", decision="blocked", pii={"PERSON": 1}),
        # a route without upstream: its baseline is its own cost
        LedgerEntry(ts=60, route="local-only", decision="small", prompt_tokens=10,
                    completion_tokens=10, cost_usd=0.002),
    ]
    with Ledger(state_url) as ledger:
        for r in rows:
            ledger.record(r)
        s = ledger.savings()
        assert s["requests"] == 6
        assert s["decisions"] == {"small": 3, "large": 1, "fallback": 1, "blocked": 0 + 1}
        actual = 0.001 + 0.001 + 0.01 + 0.0005 + 0.0 + 0.002
        baseline = 0.0125 + 0.0125 + 0.01 + 0.0125 + 0.0 + 0.002
        assert s["actual_cost_usd"] == pytest.approx(actual)
        assert s["baseline_cost_usd"] == pytest.approx(baseline)
        assert s["saved_usd"] == pytest.approx(baseline - actual)
        assert s["saved_fraction"] == pytest.approx((baseline - actual) / baseline)
        assert s["share_escalated"] == pytest.approx(2 / 6)
        assert s["prompt_tokens"] == 1000 * 3 + 2000 + 10
        assert s["completion_tokens"] == 1000 * 3 + 500 + 10
        assert s["usage_estimated"] == 1
        assert s["rows_without_baseline"] == 2  # blocked (cost 0) and local-only
        assert (s["first_ts"], s["last_ts"]) == (10, 60)
        sup = s["by_route"]["support"]
        assert sup["requests"] == 5 and sup["share_escalated"] == pytest.approx(2 / 5)
        assert sup["actual_cost_usd"] == pytest.approx(0.0125)
        assert s["by_route"]["local-only"]["saved_fraction"] == pytest.approx(0.0)

        # since / until / route filters
        later = ledger.savings(since=35)
        assert later["requests"] == 3 and later["since"] == 35
        assert later["actual_cost_usd"] == pytest.approx(0.0005 + 0.002)
        assert [e.ts for e in ledger.query(since=20, until=50)] == [20, 30, 40]
        assert [e.ts for e in ledger.query(route="local-only")] == [60]
        assert len(ledger.query(limit=2)) == 2
        empty = ledger.savings(since=1000)
        assert empty["requests"] == 0 and empty["saved_fraction"] is None


def test_many_threads_and_fast_record(state_url: str) -> None:
    n_threads, per_thread = 8, 250
    with Ledger(state_url) as ledger:
        def work(t: int) -> None:
            for i in range(per_thread):
                ledger.record(LedgerEntry(route=f"r{t}", decision="small", request_id=f"{t}-{i}"))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert ledger.flush()
        rows = ledger.query()
        assert len(rows) == n_threads * per_thread
        assert len({r.request_id for r in rows}) == n_threads * per_thread
        assert ledger.recorded == ledger.written == n_threads * per_thread
        assert ledger.dropped == ledger.lost == 0

        # record() only queues: far below 1 ms each even on a busy machine
        entry = LedgerEntry(route="r", decision="large", pii={"PERSON": 1}, flags=["x"])
        t0 = time.perf_counter()
        for _ in range(1000):
            ledger.record(entry)
        per_call = (time.perf_counter() - t0) / 1000
        assert per_call < 1e-3, per_call


def test_close_flushes_and_readonly_reads(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    with pytest.raises(LedgerError, match="no ledger at"):
        Ledger(path, readonly=True)
    ledger = Ledger(path)
    for i in range(100):
        ledger.record(LedgerEntry(route="r", decision="small", ts=float(i)))
    ledger.close()
    ledger.close()  # idempotent
    with Ledger(path, readonly=True) as ro:
        assert ro.count() == 100
        with pytest.raises(LedgerError, match="read-only"):
            ro.record(LedgerEntry(route="r", decision="small"))


def test_round_trip_spend_and_cost_over_time(state_url: str) -> None:
    with open_state(state_url) as db:
        ledger = Ledger(db)
        e = LedgerEntry(ts=100.25, request_id="r1", tenant="acme", route="support",
                        policy="confidence", score=0.42, decision="large", model="some-large",
                        upstream="big", prompt_tokens=12, completion_tokens=3, latency_ms=250.5,
                        cost_usd=0.001, baseline_cost_usd=0.002,
                        pii={"PERSON": 2, "EMAIL_ADDRESS": 1}, flags=["usage_estimated"])
        ledger.record(e)
        (got,) = ledger.query()
        assert got.id is not None
        got.id = None
        assert got == e
        assert ledger.journal_mode() == "wal" and ledger.schema_version() == 1
        # spend: upstream rows of that tenant since the time, committed or only queued
        for ts, tenant, upstream, cost in [(0, "acme", "big", 1.0), (50, "acme", None, 9.0),
                                           (60, "acme", "big", 0.25), (70, "other", "big", 5.0),
                                           (200, "acme", "small-up", 0.5)]:
            ledger.record(LedgerEntry(ts=ts, tenant=tenant, route="r", decision="large",
                                      upstream=upstream, cost_usd=cost))
        assert ledger.spend("acme", since=50) == pytest.approx(0.25 + 0.001 + 0.5)
        assert ledger.spend("acme", since=0) == pytest.approx(1.0 + 0.25 + 0.001 + 0.5)
        assert ledger.spend("nobody", since=0) == 0.0
        ledger.close()
        # cost over time: 10 rows one second apart in 5 buckets of 1.8 s (floor, not round)
        with Ledger(db) as ledger2:
            for i in range(10):
                ledger2.record(LedgerEntry(ts=1000.0 + i, route="t", decision="small",
                                           cost_usd=1.0, baseline_cost_usd=2.0))
            series = ledger2.cost_over_time(since=1000, points=5)
        assert series == [(1001.0, 2.0, 4.0), (1003.0, 2.0, 4.0), (1005.0, 2.0, 4.0),
                          (1007.0, 2.0, 4.0), (1009.0, 2.0, 4.0)]
        assert db.engine.pool is not None  # the ledger did not close the store it was given
        with db.read() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM requests").scalar() == 16


def test_readonly_on_both_backends(state_url: str) -> None:
    with Ledger(state_url) as ledger:
        ledger.record(LedgerEntry(route="r", decision="blocked"))
    with open_readonly(state_db=state_url) as ro:
        assert ro.count() == 1 and ro.readonly
        with pytest.raises(LedgerError, match="read-only"):
            ro.record(LedgerEntry(route="r", decision="small"))


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    Ledger(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="schema version 99"):
        Ledger(path)


def test_default_is_the_state_store_under_data_home(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLEETLM_STATE_DB", raising=False)
    assert default_ledger_path() == tmp_path / "home" / "state.db"
    with Ledger() as ledger:
        assert ledger.path == tmp_path / "home" / "state.db"
    # $FLEETLM_STATE_DB names another store
    monkeypatch.setenv("FLEETLM_STATE_DB", str(tmp_path / "elsewhere.db"))
    with Ledger() as ledger:
        assert ledger.path == tmp_path / "elsewhere.db"


WRITER = textwrap.dedent("""
    import sys
    from fleetlm.router.ledger import Ledger, LedgerEntry
    ledger = Ledger(sys.argv[1])
    n = 0
    while True:
        for _ in range(50):
            ledger.record(LedgerEntry(route="r", decision="small", request_id=str(n),
                                      prompt_tokens=n, pii={"PERSON": 1}))
            n += 1
        ledger.flush()
        print(n, flush=True)   # everything up to n is committed
""")


def test_sigkill_mid_write_leaves_committed_rows(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    committed = 0
    try:
        deadline = time.monotonic() + 30
        while committed < 2000 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            committed = int(line)
        # the writer is mid-loop (recording, flushing): kill it without warning
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert committed >= 2000, "the writer process did not get going"
    assert Path(str(path) + "-wal").exists()  # the kill left the WAL un-checkpointed
    with Ledger(path, readonly=True) as ledger:
        n = ledger.count()
        assert n >= committed
        rows = ledger.query()
        # rows are whole, in order, with no gap: a prefix of what the writer sent
        assert [r.request_id for r in rows] == [str(i) for i in range(n)]
        assert all(r.pii == {"PERSON": 1} for r in rows)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
