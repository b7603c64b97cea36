"""The cost ledger: one row per routed request in the state store's ``requests`` table,
and the savings report built on it.

    ledger = Ledger()                # the state store: $FLEETLM_STATE_DB, else data_home()/state.db
    ledger = Ledger(db)              # an open StateDB (SQLite or PostgreSQL), not closed by the ledger
    ledger = Ledger(path)            # a ledger file of its own (routes config ledger_path)
    ledger.record(LedgerEntry(route="support", decision="small", model="smollm2-135m:b77", ...))
    ledger.savings(since=time.time() - 86400)   # actual cost vs an all-large baseline
    ledger.spend("acme", since=start_of_day)    # a tenant's upstream USD, for budgets
    ledger.close()                   # flushes what is queued

``record`` never touches the database: it checks the entry and puts it on a queue (a few
microseconds, safe from any thread or the event loop). One writer thread drains the queue
into the database, many rows per transaction. On SQLite the store runs in WAL mode with
``synchronous=NORMAL`` (fleetlm.state.db): a killed process leaves every committed row
readable (a power cut can lose the last transactions, never the file), and readers
(``fleetlm report savings``, another process) never block the writer; on PostgreSQL every
committed row is durable and replicas write to one table. Rows still queued when the process
dies are lost; ``flush()`` waits until everything recorded so far is committed.
``query``/``savings``/``spend`` flush first and read from the database, so call them off the
event loop (``asyncio.to_thread``).

The SQL is SQLAlchemy Core, valid on both databases (no SQLite-only boolean sums, ``floor``
rather than a CAST that rounds on PostgreSQL). The table and its migrations are in
fleetlm.state (schema.py, migrations.py); a ledger file made before the state store is
adopted as it is.

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
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa

from fleetlm.errors import FleetLMError
from fleetlm.state.db import StateDB, StateError, open_state, resolve_url, sqlite_file
from fleetlm.state.migrations import LEDGER_VERSION
from fleetlm.state.schema import ledger_version, requests

if TYPE_CHECKING:
    from fleetlm.router.config import UpstreamConfig

log = logging.getLogger(__name__)

SCHEMA_VERSION = LEDGER_VERSION  # the requests table's format (its schema_version table)
DECISIONS = ("small", "large", "fallback", "blocked")
LedgerDecision = Literal["small", "large", "fallback", "blocked"]
_ENTITY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")

_COLUMNS = ("ts", "request_id", "tenant", "route", "policy", "score", "decision", "model",
            "upstream", "prompt_tokens", "completion_tokens", "latency_ms", "cost_usd",
            "baseline_cost_usd", "pii", "flags")


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

    def _row(self) -> dict[str, Any]:
        d = asdict(self)
        d["pii"] = json.dumps(self.pii, sort_keys=True)
        d["flags"] = json.dumps(list(self.flags))
        return {c: d[c] for c in _COLUMNS}


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
    """The default state store, ``state.db`` in the data folder, where the ledger lives
    unless $FLEETLM_STATE_DB names another store. (Before the state store the ledger was
    ``ledger.sqlite3`` there: ``fleetlm report savings --ledger FILE`` still reads it.)"""
    from fleetlm.paths import data_home

    return data_home() / "state.db"


def open_readonly(path: Path | None = None, state_db: str | None = None) -> Ledger:
    """The ledger for a report: the ledger file ``path`` (--ledger), else the state store
    ``state_db`` (--state-db; default $FLEETLM_STATE_DB, else :func:`default_ledger_path`).
    A missing file is an error naming the option."""
    if path is not None and state_db is not None:
        raise FleetLMError("--ledger and --state-db both say where the ledger is; give one")
    if path is not None:
        if not path.is_file():
            raise FleetLMError(f"--ledger {path}: no ledger there. `fleetlm serve --config` "
                               "writes one as it serves routes (ledger_path in the routes "
                               "config, default: the state store); pass --ledger PATH to read "
                               "another file, or leave it out to read the state store")
        return Ledger(path, readonly=True)
    try:
        url = resolve_url(state_db)
    except StateError as e:
        raise FleetLMError(str(e)) from None
    file = sqlite_file(url)
    if file is not None and not file.is_file():
        raise FleetLMError(f"--state-db {file}: no state store there. `fleetlm serve --config` "
                           "writes the ledger into it as it serves routes; pass --state-db "
                           "PATH|URL for another store, or --ledger FILE for a ledger file "
                           "(ledger_path in a routes config, or the ledger.sqlite3 of a "
                           "fleetlm before the state store)")
    return Ledger(url, readonly=True)


def _as_ts(t: float | datetime | None) -> float | None:
    if t is None or isinstance(t, int | float):
        return t
    return t.timestamp()


def _num(v: Any) -> Any:
    """A database number as a Python int/float (PostgreSQL's sum() may return Decimal)."""
    from decimal import Decimal

    return float(v) if isinstance(v, Decimal) else v


_FLUSH = object()


class Ledger:
    """The cost ledger in a state store.

    ``target``: an open :class:`~fleetlm.state.db.StateDB` (used as it is, not closed by
    the ledger); a path or URL string, or a Path (a SQLite file of its own: the routes
    config's ``ledger_path``, ``--ledger FILE``), opened and closed by the ledger; None: the
    default state store (``open_state()``).

    ``readonly=True`` opens an existing ledger for reports: no writer thread, ``record``
    refused, nothing migrated or created, and a missing file is an error.
    ``path``: where the ledger is, for messages (the file, or the masked URL).
    """

    def __init__(self, target: StateDB | Path | str | None = None, *, readonly: bool = False,
                 max_queue: int = 100_000, batch_rows: int = 512):
        self.readonly = readonly
        self._own_db = not isinstance(target, StateDB)
        if isinstance(target, StateDB):
            self.db = target
        else:
            try:
                url = resolve_url(target)
                file = sqlite_file(url)
                if readonly and file is not None and not file.is_file():
                    raise LedgerError(f"no ledger at {file}; `fleetlm serve --config` writes "
                                      "one once routes are served (ledger_path in the routes "
                                      "config)")
                self.db = open_state(url, migrate=not readonly)
            except StateError as e:
                raise LedgerError(str(e)) from None
        self.path: Path | str = self.db.path if self.db.path is not None else self.db.display_url
        try:
            self._check_tables()
        except BaseException:
            if self._own_db:
                self.db.close()
            raise
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
            name = self.path.name if isinstance(self.path, Path) else self.db.dialect
            self._writer = threading.Thread(target=self._write_loop,
                                            name=f"ledger-writer:{name}", daemon=True)
            self._writer.start()
            # flush at interpreter exit when close() was never called
            self._finalizer = weakref.finalize(self, _stop_writer, self._queue, self._writer)

    # -- schema

    def _check_tables(self) -> None:
        with self.db.read() as conn:
            if not sa.inspect(conn).has_table("requests"):
                raise LedgerError(f"no ledger at {self.path}; `fleetlm serve --config` writes "
                                  "one once routes are served")
            version = conn.execute(sa.select(sa.func.max(ledger_version.c.version))).scalar()
        if version is not None and version > SCHEMA_VERSION:
            raise LedgerError(f"ledger {self.path} has schema version {version}; this "
                              f"fleetlm reads up to {SCHEMA_VERSION}. Upgrade fleetlm or "
                              "point ledger_path / --state-db at a new store")

    def schema_version(self) -> int:
        """The requests table's format version (1)."""
        stmt = sa.select(sa.func.max(ledger_version.c.version))
        with self.db.read() as conn:
            return int(conn.execute(stmt).scalar() or 0)

    def journal_mode(self) -> str:
        """SQLite's journal mode ("wal" unless the file system refused it); PostgreSQL always
        writes ahead: "wal"."""
        if self.db.dialect != "sqlite":
            return "wal"
        with self.db.read() as conn:
            return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar())

    # -- writing

    def record(self, entry: LedgerEntry) -> None:
        """Queue ``entry`` for writing. Never blocks; raises ValueError on a malformed entry.
        A full queue (the database stalled for ~100k requests) drops the row and counts it."""
        if self._closed or self._writer is None:
            raise LedgerError(f"ledger {self.path} is closed or read-only; nothing recorded")
        entry.check()
        try:
            self._queue.put_nowait(entry._row())
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("ledger %s: write queue full, %d rows dropped (database stalled?)",
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

    def _write_loop(self) -> None:
        stop = False
        while not stop:
            items = [self._queue.get()]
            while len(items) < self._batch_rows:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [it for it in items if isinstance(it, dict)]
            events = [it[1] for it in items if isinstance(it, tuple) and it[0] is _FLUSH]
            stop = any(it is None for it in items)
            if rows:
                try:
                    with self.db.write() as conn:  # one transaction per batch
                        conn.execute(requests.insert(), rows)
                    self.written += len(rows)
                except sa.exc.SQLAlchemyError as e:
                    self.lost += len(rows)
                    log.error("ledger %s: %d rows lost: %s", self.path, len(rows), e)
            for ev in events:
                ev.set()

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, stop the writer, and close the store if the ledger opened
        it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._finalizer.detach()
            _stop_writer(self._queue, self._writer, timeout)
        if self._own_db:
            self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading

    def _rows(self, stmt: sa.Select[Any]) -> list[sa.RowMapping]:
        if self._writer is not None and not self._closed:
            self.flush()
        if self._closed:
            raise LedgerError(f"ledger {self.path} is closed")
        with self.db.read() as conn:
            return list(conn.execute(stmt).mappings())

    @staticmethod
    def _where(since: float | datetime | None, until: float | datetime | None,
               route: str | None) -> list[sa.ColumnElement[bool]]:
        conds: list[sa.ColumnElement[bool]] = []
        if since is not None:
            conds.append(requests.c.ts >= _as_ts(since))
        if until is not None:
            conds.append(requests.c.ts < _as_ts(until))
        if route is not None:
            conds.append(requests.c.route == route)
        return conds

    def query(self, since: float | datetime | None = None, *,
              until: float | datetime | None = None, route: str | None = None,
              limit: int | None = None) -> list[LedgerEntry]:
        """Rows with ``since <= ts < until`` (unix seconds or datetimes), oldest first."""
        r = requests.c
        stmt = (sa.select(r.id, *(r[c] for c in _COLUMNS))
                .where(*self._where(since, until, route)).order_by(r.ts, r.id))
        if limit is not None:
            stmt = stmt.limit(int(limit))
        out = []
        for row in self._rows(stmt):
            d = dict(row)
            d["pii"] = json.loads(d["pii"])
            d["flags"] = json.loads(d["flags"])
            out.append(LedgerEntry(**d))
        return out

    def count(self) -> int:
        return int(self._rows(sa.select(sa.func.count().label("n"))
                              .select_from(requests))[0]["n"])

    def spend(self, tenant: str, since: float) -> float:
        """USD spent upstream (rows with an ``upstream``) by ``tenant`` since ``since`` (unix
        seconds), everything recorded so far included: what a budget is checked against."""
        r = requests.c
        stmt = (sa.select(sa.func.coalesce(sa.func.sum(r.cost_usd), 0.0).label("usd"))
                .where(r.upstream.is_not(None), r.tenant == tenant, r.ts >= since))
        return float(self._rows(stmt)[0]["usd"] or 0.0)

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
        r = requests.c
        f = sa.func
        rows = self._rows(
            sa.select(r.route, r.decision, f.count().label("n"), f.sum(r.cost_usd).label("cost"),
                      f.sum(sa.case((r.upstream.is_(None), r.cost_usd), else_=0.0))
                      .label("local_cost"),
                      f.sum(f.coalesce(r.baseline_cost_usd, r.cost_usd)).label("baseline"),
                      f.sum(sa.case((r.baseline_cost_usd.is_(None), 1), else_=0))
                      .label("no_baseline"),
                      f.sum(r.prompt_tokens).label("pt"), f.sum(r.completion_tokens).label("ct"),
                      f.sum(sa.case((r.flags.contains('"usage_estimated"', autoescape=True), 1),
                                    else_=0)).label("estimated"),
                      f.min(r.ts).label("first_ts"), f.max(r.ts).label("last_ts"))
            .where(*self._where(since, until, route)).group_by(r.route, r.decision))

        def empty() -> dict[str, Any]:
            return {"requests": 0, "decisions": dict.fromkeys(DECISIONS, 0),
                    "actual_cost_usd": 0.0, "local_cost_usd": 0.0, "upstream_cost_usd": 0.0,
                    "baseline_cost_usd": 0.0, "prompt_tokens": 0, "completion_tokens": 0}

        total = empty() | {"usage_estimated": 0, "rows_without_baseline": 0,
                           "first_ts": None, "last_ts": None}
        by_route: dict[str, dict[str, Any]] = {}
        for row in rows:
            x = {k: _num(v) for k, v in row.items()}
            for agg in (total, by_route.setdefault(x["route"], empty())):
                agg["requests"] += int(x["n"])
                agg["decisions"][x["decision"]] += int(x["n"])
                agg["actual_cost_usd"] += x["cost"] or 0.0
                agg["local_cost_usd"] += x["local_cost"] or 0.0
                agg["upstream_cost_usd"] += (x["cost"] or 0.0) - (x["local_cost"] or 0.0)
                agg["baseline_cost_usd"] += x["baseline"] or 0.0
                agg["prompt_tokens"] += int(x["pt"] or 0)
                agg["completion_tokens"] += int(x["ct"] or 0)
            total["usage_estimated"] += int(x["estimated"] or 0)
            total["rows_without_baseline"] += int(x["no_baseline"] or 0)
            for k, pick in (("first_ts", min), ("last_ts", max)):
                total[k] = x[k] if total[k] is None else pick(total[k], x[k])
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
        r = requests.c
        where = self._where(since, until, route)
        span = self._rows(sa.select(sa.func.min(r.ts).label("first"),
                                    sa.func.max(r.ts).label("last")).where(*where))[0]
        if span["first"] is None:
            return []
        first, last = float(span["first"]), float(span["last"])
        points = max(points, 1)
        width = max((last - first) / points, 1e-9)
        # floor, not CAST: PostgreSQL's CAST to an integer rounds (SQLAlchemy gives SQLite a
        # floor function); the last row joins the last bucket rather than making one more
        index = sa.func.floor((r.ts - first) / width)
        bucket = sa.case((index >= points, points - 1), else_=index)
        sub = (sa.select(bucket.label("bucket"), r.ts,
                         r.cost_usd, sa.func.coalesce(r.baseline_cost_usd, r.cost_usd)
                         .label("baseline"))
               .where(*where).subquery())
        rows = self._rows(
            sa.select(sub.c.bucket, sa.func.max(sub.c.ts).label("ts"),
                      sa.func.sum(sub.c.cost_usd).label("cost"),
                      sa.func.sum(sub.c.baseline).label("baseline"))
            .group_by(sub.c.bucket).order_by(sub.c.bucket))
        return [(float(x["ts"]), float(x["cost"] or 0.0), float(x["baseline"] or 0.0))
                for x in rows]


def _stop_writer(q: queue.Queue[Any], writer: threading.Thread, timeout: float = 10.0) -> None:
    if writer.is_alive():
        q.put(None)
        writer.join(timeout)
