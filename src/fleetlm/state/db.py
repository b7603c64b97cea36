"""Where the state store lives and how it is opened: the URL (``--state-db``,
``$FLEETLM_STATE_DB``, else ``state.db`` in the data folder), the SQLAlchemy engine with
the per-dialect settings, and :class:`StateDB`, the handle every store takes.

    db = open_state()                           # $FLEETLM_STATE_DB, else data_home()/state.db
    db = open_state("postgresql://fleetlm:pw@db:5432/fleetlm")   # replicas share one
    with db.write() as conn: ...                # one transaction (BEGIN IMMEDIATE on SQLite)
    db.close()

SQLite (one machine): every connection runs in WAL mode with ``synchronous=NORMAL`` (a killed
process loses nothing committed; a power cut may lose the last transactions, never the file),
waits up to 10 s for a lock and enforces foreign keys. SQLAlchemy emits BEGIN itself, since
Python's sqlite3 module (before 3.12) does not begin a transaction for DDL or SELECT.
PostgreSQL (several replicas): connections are checked before use (``pool_pre_ping``), so a
restarted database costs one reconnect, not an error.

This module knows URLs, engines and transactions; what the tables hold is the stores' business
(keys.py, tenants.py, audit.py, and the cost ledger in fleetlm.router.ledger).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url

from fleetlm.errors import StateError

__all__ = ["StateDB", "StateError", "default_state_url", "mask", "open_state", "resolve_url",
           "sqlite_file"]

log = logging.getLogger(__name__)

ACCEPTED = ("a file path (SQLite), sqlite:////ABS/PATH/state.db, or "
            "postgresql://USER:PASSWORD@HOST:5432/DATABASE")
_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


def default_state_url() -> str:
    """The SQLite file ``state.db`` in the data folder (see fleetlm.paths)."""
    from fleetlm.paths import data_home

    return "sqlite:///" + str(data_home() / "state.db")


def mask(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    return _PASSWORD.sub(r"\1***@", url)


def resolve_url(url: str | Path | None) -> str:
    """The SQLAlchemy URL of the state store.

    None: ``$FLEETLM_STATE_DB`` if set, else :func:`default_state_url`. A plain path:
    ``sqlite:///ABSOLUTE``. ``postgresql://`` and ``postgres://`` become
    ``postgresql+psycopg://`` (psycopg 3). ``sqlite://`` and ``postgresql+psycopg://`` pass
    as they are. Anything else is a StateError naming --state-db.
    """
    if url is None:
        url = os.environ.get("FLEETLM_STATE_DB") or default_state_url()
    if isinstance(url, Path):
        return "sqlite:///" + str(url.expanduser().absolute())
    text = url.strip()
    if not text:
        raise StateError(f"--state-db is empty; give {ACCEPTED}")
    if "://" not in text:
        return "sqlite:///" + str(Path(text).expanduser().absolute())
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg://" + rest
    if scheme in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        return text
    raise StateError(f"--state-db {mask(text)}: the scheme {scheme}:// is not supported; give "
                     f"{ACCEPTED} (also $FLEETLM_STATE_DB)")


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for PostgreSQL and in-memory SQLite."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return None
    if u.query.get("mode") == "memory" or str(u.database).startswith("file:"):
        return None
    return Path(str(u.database))


class StateDB:
    """An open state store: its resolved ``url``, the ``display_url`` (password masked, for
    messages), the ``dialect`` ("sqlite" or "postgresql") and the SQLAlchemy ``engine``.
    Thread-safe: each call takes a pooled connection."""

    def __init__(self, url: str, engine: sa.Engine) -> None:
        self.url = url
        self.display_url = mask(url)
        self.dialect = engine.dialect.name
        self.engine = engine

    @property
    def path(self) -> Path | None:
        """The SQLite file, None on PostgreSQL."""
        return sqlite_file(self.url)

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else self.display_url

    def __repr__(self) -> str:
        return f"StateDB({self.display_url!r})"

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A connection for reads (rolled back when the block ends)."""
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """One transaction, committed when the block ends without an exception. On SQLite it
        starts with BEGIN IMMEDIATE: the write lock is taken (or waited for) up front, so a
        read-then-write never fails half-way on another writer's lock."""
        with self.engine.connect().execution_options(fleetlm_immediate=True) as conn:
            with conn.begin():
                yield conn

    def close(self) -> None:
        """Close every pooled connection. The handle must not be used afterwards."""
        self.engine.dispose()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sqlite_engine(url: str) -> sa.Engine:
    file = sqlite_file(url)
    kw: dict[str, Any] = {}
    if file is None:  # in memory: one connection, or every connection is another database
        kw["poolclass"] = sa.StaticPool
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 10.0},
                              **kw)
    warned: list[str] = []

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # sqlite3 begins nothing; the "begin" hook does
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 10000")
        mode = str(cur.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if mode != "wal" and file is not None and not warned:
            # e.g. a network file system without shared memory: still correct, less safe
            warned.append(mode)
            log.warning("state store %s: journal_mode is %s, not wal (a file system without "
                        "WAL support?); put it on a local disk", file, mode)
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get("fleetlm_immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _fix(db_url: str) -> str:
    if sqlite_file(db_url) is not None:
        return ("check the path (a SQLite file made by fleetlm) and that its folder is "
                "writable by this user, or pass --state-db PATH|URL (or set "
                "FLEETLM_STATE_DB) to use another store")
    return ("check that the server is running and reachable, and the user, password and "
            "database in the URL (create the database first: createdb NAME); pass --state-db "
            "URL or set FLEETLM_STATE_DB")


def open_state(url: str | Path | None = None, *, migrate: bool = True) -> StateDB:
    """Open the state store at ``url`` (see :func:`resolve_url`) and bring its schema up to
    date (:func:`fleetlm.state.migrations.upgrade`). ``migrate=False`` only checks that the
    database is not newer than this code (for read-only reports: nothing is written).
    A store that cannot be reached or written is a StateError naming the masked URL and the
    fix."""
    from fleetlm.state.migrations import check, upgrade

    resolved = resolve_url(url)
    file = sqlite_file(resolved)
    display = str(file) if file is not None else mask(resolved)
    try:
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            engine = _sqlite_engine(resolved)
        else:
            engine = sa.create_engine(resolved, pool_pre_ping=True)
    except (OSError, sa.exc.ArgumentError) as e:
        raise StateError(f"cannot open the state store {display}: {e}; "
                         f"{_fix(resolved)}") from None
    except ImportError as e:
        raise StateError(f"the state store {display} needs a driver that is not installed "
                         f"({e}); give {ACCEPTED}") from None
    db = StateDB(resolved, engine)
    try:
        if migrate:
            upgrade(engine)
        else:
            check(engine)
    except StateError:
        db.close()
        raise
    except sa.exc.SQLAlchemyError as e:
        db.close()
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()
        password = make_url(resolved).password
        text = " ".join(reason[:3])
        if password:
            text = text.replace(str(password), "***")
        raise StateError(f"cannot open the state store {display}: {text}; "
                         f"{_fix(resolved)}") from None
    return db
