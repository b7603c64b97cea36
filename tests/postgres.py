"""A throwaway PostgreSQL server for the tests: ONE per test run, started on first use,
stopped at the end, and a fresh empty database for each test that asks.

    def test_x(postgres_url: str) -> None:      # "postgresql+psycopg://postgres@127.0.0.1:PORT/t_3"
    def test_y(state_url: str) -> None:         # the same test on SQLite and on PostgreSQL

The server is the machine's own PostgreSQL binaries (``initdb`` on PATH, else the newest
``/usr/lib/postgresql/*/bin``; ``make test`` installs Debian's ``postgresql`` package when
there is none). Its data, log and unix socket live in one temporary folder; it listens on
127.0.0.1 on a free port with trust authentication and ``fsync=off`` (a test database need
not survive a power cut). Run as root, initdb and the server run as the ``postgres`` user
(``runuser``), which owns the folder: PostgreSQL refuses to run as root.

Without PostgreSQL the tests that need it are skipped, or fail when ``CI=true`` (a CI run
must not pass by skipping them). The fixtures are imported by tests/conftest.py.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres; None without PostgreSQL."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]

    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", bindir.parent.name)) or (0,)

    return max(candidates, key=version) if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """initdb + pg_ctl start in a temporary folder; :meth:`stop` removes everything."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="fleetlm-pg-"))
        self.data, self.sock, self.log = self.root / "data", self.root / "sock", self.root / "log"
        self.sock.mkdir()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = 0
        self._names = itertools.count(1)

    def _run(self, *args: str) -> None:
        cmd = [*self.as_user, str(self.bindir / args[0]), *args[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n"
                               f"{done.stderr}\n{log}")

    def start(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        for attempt in range(3):  # the free port may be taken before the server binds it
            self.port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                    f"-c unix_socket_directories={self.sock} -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                          "-o", opts, "start")
                return self
            except RuntimeError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self) -> str:
        """A new empty database; its name."""
        name = f"t_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            if self.port:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _unavailable(reason: str) -> None:
    msg = (f"PostgreSQL is needed for this test: {reason}. Install it (Debian: apt-get install "
           "postgresql; `make test` does this) or put initdb on PATH")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The test run's one PostgreSQL server (started on first use)."""
    bindir = find_bindir()
    if bindir is None:
        _unavailable("no initdb on PATH or in /usr/lib/postgresql/*/bin")
    assert bindir is not None
    if os.geteuid() == 0 and not shutil.which("runuser"):
        _unavailable("running as root needs runuser to start it as the postgres user")
    server = PostgresServer(bindir)
    try:
        server.start()
    except (RuntimeError, LookupError, OSError, subprocess.SubprocessError) as e:
        server.stop()
        _unavailable(f"it did not start: {e}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh empty database on the test run's server, dropped after the test."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A state store URL: a new SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return "sqlite:///" + str(tmp_path / "state.db")
    return str(request.getfixturevalue("postgres_url"))
