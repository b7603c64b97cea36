"""The cost ledger: one SQLite row per routed request, and the savings report built on it.

    ledger = Ledger()                        # data_home()/ledger.sqlite3; Ledger(path) elsewhere
    ledger.record(LedgerEntry(route="support", decision="small", model="smollm2-135m:b77", ...))
    ledger.savings(since=time.time() - 86400)   # actual cost vs an all-large baseline
    ledger.close()                           # flushes what is queued

``record`` never touches the disk: it checks the entry and puts it on a queue (a few
microseconds, safe from any thread or the event loop). One writer thread drains the queue
into SQLite, many rows per transaction. The database runs in WAL mode with
``synchronous=NORMAL``: a killed process leaves every committed row readable (a power cut
can lose the last transactions, never the file), and readers (``fleetlm report savings``,
another process) never block the writer. Rows still queued when the process dies are lost;
``flush()`` waits until everything recorded so far is committed. ``query``/``savings``
flush first and read from disk, so call them off the event loop (``asyncio.to_thread``).

Costs are computed by the caller with :func:`upstream_cost` / :func:`local_cost` and stored
per row, together with the row's all-large baseline (what the same tokens would have cost at
the route's first large upstream), so the report needs no config and survives price changes.

Privacy: ``pii`` holds entity types and counts (``{"PERSON": 2}``), never the values; the
ledger refuses keys that are not entity-type names.

This module knows nothing about HTTP, policies or models.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fleetlm.errors import FleetLMError

if TYPE_CHECKING:
    from fleetlm.router.config import UpstreamConfig

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DECISIONS = ("small", "large", "fallback", "blocked")
LedgerDecision = Literal["small", "large", "fallback", "blocked"]
_ENTITY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")

_SCHEMA = (
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

_COLUMNS = ("ts", "request_id", "tenant", "route", "policy", "score", "decision", "model",
            "upstream", "prompt_tokens", "completion_tokens", "latency_ms", "cost_usd",
            "baseline_cost_usd", "pii", "flags")
_INSERT = (f"INSERT INTO requests ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")


class LedgerError(FleetLMError):
    """The ledger file cannot be used: the message names the path and what to do."""


@dataclass(kw_only=True)
class LedgerEntry:
    """One routed request. ``decision``: small (the small model answered as decided), large
    (an upstream answered), fallback (escalation failed, the small model's answer was sent,
    flagged), blocked (refused, e.g. personal data with ``pii: block``)."""

    route: str
    decision: LedgerDecision
    model: str = ""
    ts: float = field(default_factory=time.time)
    request_id: str = ""
    tenant: str = ""
    policy: str = ""
    score: float | None = None
    upstream: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    baseline_cost_usd: float | None = None
    pii: dict[str, int] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    id: int | None = None  # set by the database; ignored by record()

    def check(self) -> None:
        """Raise ValueError on a malformed entry (a caller bug, so it fails loudly)."""
        if self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {self.decision!r}")
        for k, v in self.pii.items():
            # entity types only: a value ("Jane Doe") must never reach the disk
            if not k or not set(k) <= _ENTITY or k[0].isdigit():
                raise ValueError(f"pii keys are entity types (PERSON, EMAIL_ADDRESS), got {k!r}")
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"pii[{k}] must be a count, got {v!r}")
        if min(self.prompt_tokens, self.completion_tokens) < 0:
            raise ValueError("token counts must be >= 0")

    def _row(self) -> tuple[Any, ...]:
        d = asdict(self)
        d["pii"] = json.dumps(self.pii, sort_keys=True)
        d["flags"] = json.dumps(list(self.flags))
        return tuple(d[c] for c in _COLUMNS)


# ---------------------------------------------------------------------------------- costs


def upstream_cost(upstream: UpstreamConfig, prompt_tokens: int, completion_tokens: int
                  ) -> float:
    """USD of one upstream call at the upstream's prices per million tokens."""
    return (prompt_tokens * upstream.price_per_1m_input
            + completion_tokens * upstream.price_per_1m_output) / 1e6


def local_cost(local_cost_per_hour: float, latency_ms: float) -> float:
    """USD of the local machine for the request's wall time. This charges each request the
    whole machine, so under concurrent (batched) load it over-states the local cost: the
    savings it reports are a lower bound."""
    return local_cost_per_hour * max(0.0, latency_ms) / 3.6e6


# --------------------------------------------------------------------------------- ledger


def default_ledger_path() -> Path:
    from fleetlm.paths import data_home

    return data_home() / "ledger.sqlite3"


def open_readonly(path: Path | None = None) -> Ledger:
    """The ledger at ``path`` (default: :func:`default_ledger_path`) for a report; a missing
    file is an error naming ``--ledger``."""
    path = path if path is not None else default_ledger_path()
    if not path.is_file():
        raise FleetLMError(f"--ledger {path}: no ledger there. `fleetlm serve --config` "
                           "writes one as it serves routes (ledger_path in the routes config, "
                           f"default {default_ledger_path()}); pass --ledger PATH to read "
                           "another file")
    return Ledger(path, readonly=True)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        # e.g. a network file system without shared memory: still correct, less crash-safe
        log.warning("ledger %s: journal_mode is %s, not wal (file system without WAL "
                    "support?); put ledger_path on a local disk", path, mode)
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _as_ts(t: float | datetime | None) -> float | None:
    if t is None or isinstance(t, int | float):
        return t
    return t.timestamp()


_FLUSH = object()


class Ledger:
    """The SQLite ledger at ``path`` (created with its folder when missing).

    ``readonly=True`` opens an existing ledger for reports: no writer thread, ``record``
    refused, and a missing file is an error rather than created.
    """

    def __init__(self, path: Path | str | None = None, *, readonly: bool = False,
                 max_queue: int = 100_000, batch_rows: int = 512):
        self.path = Path(path) if path is not None else default_ledger_path()
        self.readonly = readonly
        if readonly and not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path}; `fleetlm serve --config` writes one "
                              "once routes are served (ledger_path in the routes config)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._read = _connect(self.path)
            self._init_schema(self._read)
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open the ledger {self.path}: {e}; check the path and "
                              "its permissions, or set ledger_path in the routes config") from None
        self._read_lock = threading.Lock()
        self._batch_rows = batch_rows
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._closed = False
        # counters, read by /metrics; written by one thread each, so no lock
        self.recorded = 0  # accepted by record()
        self.written = 0  # committed
        self.dropped = 0  # refused by record() because the queue was full
        self.lost = 0  # accepted but not written (a database error; logged)
        self._writer: threading.Thread | None = None
        if not readonly:
            conn = _connect(self.path)
            self._writer = threading.Thread(target=self._write_loop, args=(conn,),
                                            name=f"ledger-writer:{self.path.name}", daemon=True)
            self._writer.start()
            # flush at interpreter exit when close() was never called
            self._finalizer = weakref.finalize(self, _stop_writer, self._queue, self._writer)

    # -- schema

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")  # two processes opening a new file: one creates it
        try:
            for stmt in _SCHEMA:
                conn.execute(stmt)
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0] if row else None
            if version is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise LedgerError(f"ledger {self.path} has schema version {version}; this "
                                  f"fleetlm reads up to {SCHEMA_VERSION}. Upgrade fleetlm or "
                                  "point ledger_path at a new file")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def schema_version(self) -> int:
        with self._read_lock:
            return int(self._read.execute("SELECT max(version) FROM schema_version").fetchone()[0])

    def journal_mode(self) -> str:
        with self._read_lock:
            return str(self._read.execute("PRAGMA journal_mode").fetchone()[0])

    # -- writing

    def record(self, entry: LedgerEntry) -> None:
        """Queue ``entry`` for writing. Never blocks; raises ValueError on a malformed entry.
        A full queue (the disk stalled for ~100k requests) drops the row and counts it."""
        if self._closed or self._writer is None:
            raise LedgerError(f"ledger {self.path} is closed or read-only; nothing recorded")
        entry.check()
        try:
            self._queue.put_nowait(entry._row())
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("ledger %s: write queue full, %d rows dropped (disk stalled?)",
                          self.path, self.dropped)
            return
        self.recorded += 1

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every row recorded before this call is committed. False on timeout."""
        if self._writer is None or not self._writer.is_alive():
            return self._queue.empty()
        done = threading.Event()
        self._queue.put((_FLUSH, done))  # blocks only if the queue is full
        return done.wait(timeout)

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        stop = False
        while not stop:
            items = [self._queue.get()]
            while len(items) < self._batch_rows:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [it for it in items if isinstance(it, tuple) and it[0] is not _FLUSH]
            events = [it[1] for it in items if isinstance(it, tuple) and it[0] is _FLUSH]
            stop = any(it is None for it in items)
            if rows:
                try:
                    with conn:  # one transaction per batch
                        conn.execute("BEGIN")
                        conn.executemany(_INSERT, rows)
                    self.written += len(rows)
                except sqlite3.Error as e:
                    self.lost += len(rows)
                    log.error("ledger %s: %d rows lost: %s", self.path, len(rows), e)
            for ev in events:
                ev.set()
        conn.close()

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, stop the writer, close the files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._finalizer.detach()
            _stop_writer(self._queue, self._writer, timeout)
        with self._read_lock:
            self._read.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading

    def _select(self, sql: str, params: Iterable[Any]) -> list[sqlite3.Row]:
        if self._writer is not None and not self._closed:
            self.flush()
        with self._read_lock:
            if self._closed:
                raise LedgerError(f"ledger {self.path} is closed")
            self._read.row_factory = sqlite3.Row
            return list(self._read.execute(sql, tuple(params)))

    @staticmethod
    def _where(since: float | datetime | None, until: float | datetime | None,
               route: str | None) -> tuple[str, list[Any]]:
        conds: list[str] = []
        params: list[Any] = []
        if since is not None:
            conds.append("ts >= ?")
            params.append(_as_ts(since))
        if until is not None:
            conds.append("ts < ?")
            params.append(_as_ts(until))
        if route is not None:
            conds.append("route = ?")
            params.append(route)
        return (" WHERE " + " AND ".join(conds)) if conds else "", params

    def query(self, since: float | datetime | None = None, *,
              until: float | datetime | None = None, route: str | None = None,
              limit: int | None = None) -> list[LedgerEntry]:
        """Rows with ``since <= ts < until`` (unix seconds or datetimes), oldest first."""
        where, params = self._where(since, until, route)
        sql = f"SELECT id, {', '.join(_COLUMNS)} FROM requests{where} ORDER BY ts, id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        out = []
        for r in self._select(sql, params):
            d = dict(r)
            d["pii"] = json.loads(d["pii"])
            d["flags"] = json.loads(d["flags"])
            out.append(LedgerEntry(**d))
        return out

    def count(self) -> int:
        return int(self._select("SELECT count(*) FROM requests", ())[0][0])

    def savings(self, since: float | datetime | None = None, *,
                until: float | datetime | None = None, route: str | None = None
                ) -> dict[str, Any]:
        """Actual cost against the all-large baseline, overall and per route (``route``
        keeps that route's rows only).

        baseline: each row's ``baseline_cost_usd`` (its tokens at the route's first large
        upstream); a row without one (a route with no upstream) counts its actual cost.
        actual = local (rows answered here: ``upstream`` NULL) + upstream cost.
        share_escalated: (large + fallback) / requests, i.e. the policy chose the large model.
        """
        where, params = self._where(since, until, route)
        rows = self._select(
            "SELECT route, decision, count(*) AS n, sum(cost_usd) AS cost, "
            "sum(CASE WHEN upstream IS NULL THEN cost_usd ELSE 0 END) AS local_cost, "
            "sum(coalesce(baseline_cost_usd, cost_usd)) AS baseline, "
            "sum(baseline_cost_usd IS NULL) AS no_baseline, "
            "sum(prompt_tokens) AS pt, sum(completion_tokens) AS ct, "
            "sum(flags LIKE '%\"usage_estimated\"%') AS estimated, "
            "min(ts) AS first_ts, max(ts) AS last_ts "
            f"FROM requests{where} GROUP BY route, decision", params)

        def empty() -> dict[str, Any]:
            return {"requests": 0, "decisions": dict.fromkeys(DECISIONS, 0),
                    "actual_cost_usd": 0.0, "local_cost_usd": 0.0, "upstream_cost_usd": 0.0,
                    "baseline_cost_usd": 0.0, "prompt_tokens": 0, "completion_tokens": 0}

        total = empty() | {"usage_estimated": 0, "rows_without_baseline": 0,
                           "first_ts": None, "last_ts": None}
        by_route: dict[str, dict[str, Any]] = {}
        for r in rows:
            for agg in (total, by_route.setdefault(r["route"], empty())):
                agg["requests"] += r["n"]
                agg["decisions"][r["decision"]] += r["n"]
                agg["actual_cost_usd"] += r["cost"] or 0.0
                agg["local_cost_usd"] += r["local_cost"] or 0.0
                agg["upstream_cost_usd"] += (r["cost"] or 0.0) - (r["local_cost"] or 0.0)
                agg["baseline_cost_usd"] += r["baseline"] or 0.0
                agg["prompt_tokens"] += r["pt"] or 0
                agg["completion_tokens"] += r["ct"] or 0
            total["usage_estimated"] += r["estimated"] or 0
            total["rows_without_baseline"] += r["no_baseline"] or 0
            for k, pick in (("first_ts", min), ("last_ts", max)):
                total[k] = r[k] if total[k] is None else pick(total[k], r[k])
        for agg in (total, *by_route.values()):
            d, n = agg["decisions"], agg["requests"]
            agg["share_escalated"] = (d["large"] + d["fallback"]) / n if n else 0.0
            agg["saved_usd"] = agg["baseline_cost_usd"] - agg["actual_cost_usd"]
            agg["saved_fraction"] = (agg["saved_usd"] / agg["baseline_cost_usd"]
                                     if agg["baseline_cost_usd"] > 0 else None)
        total["since"] = _as_ts(since)
        total["by_route"] = by_route
        return total

    def cost_over_time(self, since: float | datetime | None = None, *,
                       until: float | datetime | None = None, route: str | None = None,
                       points: int = 200) -> list[tuple[float, float, float]]:
        """Actual and all-large baseline cost per time bucket, oldest first: at most
        ``points`` rows ``(last ts in the bucket, actual USD, baseline USD)``, the buckets
        evenly spaced between the first and the last row (what a plot over time needs,
        without reading every row)."""
        where, params = self._where(since, until, route)
        first, last = self._select(f"SELECT min(ts), max(ts) FROM requests{where}", params)[0]
        if first is None:
            return []
        width = max((last - first) / max(points, 1), 1e-9)
        rows = self._select(
            "SELECT CAST((ts - ?) / ? AS INTEGER) AS bucket, max(ts) AS ts, "
            "sum(cost_usd) AS cost, sum(coalesce(baseline_cost_usd, cost_usd)) AS baseline "
            f"FROM requests{where} GROUP BY bucket ORDER BY bucket", [first, width, *params])
        return [(float(r["ts"]), float(r["cost"] or 0.0), float(r["baseline"] or 0.0))
                for r in rows]


def _stop_writer(q: queue.Queue[Any], writer: threading.Thread, timeout: float = 10.0) -> None:
    if writer.is_alive():
        q.put(None)
        writer.join(timeout)
