"""The test PostgreSQL (tests/postgres.py): found, started once, a fresh database per test;
missing, it skips, except under CI=true where it fails (a CI run must not pass by skipping)."""

from __future__ import annotations

import psycopg
import pytest

from tests.postgres import PostgresServer, _unavailable, find_bindir


def test_missing_postgres_skips_or_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL is needed"):
        _unavailable("no initdb")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install postgresql"):
        _unavailable("no initdb")


def test_each_test_gets_a_fresh_database(postgres_server: PostgresServer, postgres_url: str) -> None:
    assert find_bindir() == postgres_server.bindir
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone() == (0,)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
