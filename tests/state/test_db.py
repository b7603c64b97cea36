"""Where the state store is and how it opens: URLs resolved (paths, postgres:// spellings,
the environment), refused schemes named with --state-db, SQLite's per-connection settings,
and errors that name the masked URL and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from fleetlm.state import StateError, default_state_url, open_state, resolve_url
from fleetlm.state.db import mask, sqlite_file


def test_resolve_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEETLM_STATE_DB", raising=False)
    monkeypatch.setenv("FLEETLM_HOME", str(tmp_path / "home"))
    assert default_state_url() == "sqlite:///" + str(tmp_path / "home" / "state.db")
    assert resolve_url(None) == default_state_url()
    monkeypatch.setenv("FLEETLM_STATE_DB", "postgres://u:pw@h:5432/db")
    assert resolve_url(None) == "postgresql+psycopg://u:pw@h:5432/db"
    monkeypatch.setenv("FLEETLM_STATE_DB", "")  # empty counts as unset
    assert resolve_url(None) == default_state_url()

    assert resolve_url(tmp_path / "a.db") == f"sqlite:///{tmp_path}/a.db"
    assert resolve_url(str(tmp_path / "b.db")) == f"sqlite:///{tmp_path}/b.db"
    monkeypatch.chdir(tmp_path)
    assert resolve_url("rel/c.db") == f"sqlite:///{tmp_path}/rel/c.db"  # made absolute
    assert resolve_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    for same in ("sqlite:////abs/x.db", "sqlite://", "postgresql+psycopg://u@h/db"):
        assert resolve_url(same) == same
    with pytest.raises(StateError, match=r"--state-db mysql://u:\*\*\*@h/db: the scheme "
                                         r"mysql:// is not supported; give a file path"):
        resolve_url("mysql://u:secret@h/db")
    with pytest.raises(StateError, match="--state-db is empty"):
        resolve_url("  ")


def test_mask_and_sqlite_file() -> None:
    assert mask("postgresql+psycopg://fleet:s3cr:et@db:5432/x") == \
        "postgresql+psycopg://fleet:***@db:5432/x"
    assert mask("postgresql+psycopg://fleet@db/x") == "postgresql+psycopg://fleet@db/x"
    assert sqlite_file("sqlite:////a/b.db") == Path("/a/b.db")
    assert sqlite_file("sqlite://") is None
    assert sqlite_file("postgresql+psycopg://u@h/db") is None


def test_sqlite_settings_on_every_connection(tmp_path: Path) -> None:
    with open_state(tmp_path / "new" / "folder" / "state.db") as db:  # folders created
        assert db.dialect == "sqlite" and db.path == tmp_path / "new" / "folder" / "state.db"
        assert str(db) == str(db.path)
        conns = [db.engine.connect() for _ in range(3)]  # three pooled connections
        try:
            for c in conns:
                assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
                assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
                assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        finally:
            for c in conns:
                c.close()


def test_foreign_keys_are_enforced(state_url: str) -> None:
    with open_state(state_url) as db:
        with pytest.raises(sa.exc.IntegrityError), db.write() as conn:
            conn.exec_driver_sql(
                "INSERT INTO api_keys (id, hash, prefix, tenant, role, created) "
                "VALUES ('key_x', 'h', 'flm-x', 'no-such-tenant', 'user', 0)")


def test_write_rolls_back_on_error(state_url: str) -> None:
    with open_state(state_url) as db:
        with pytest.raises(RuntimeError), db.write() as conn:
            conn.exec_driver_sql("INSERT INTO tenants (name, policy, created, updated) "
                                 "VALUES ('a', '{}', 0, 0)")
            raise RuntimeError("boom")
        with db.read() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM tenants").scalar() == 0


def test_a_folder_that_cannot_be_made_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(StateError, match=f"cannot open the state store {tmp_path}/file/sub/"
                                         "state.db: .*--state-db PATH"):
        open_state(tmp_path / "file" / "sub" / "state.db")


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "state.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match=f"cannot open the state store {bad}: .*--state-db"):
        open_state(bad)


def test_unreachable_postgres_masks_the_password() -> None:
    port = 1  # nothing listens there
    with pytest.raises(StateError) as e:
        open_state(f"postgresql://fleet:hunter2@127.0.0.1:{port}/x")
    msg = str(e.value)
    assert "hunter2" not in msg
    assert f"postgresql+psycopg://fleet:***@127.0.0.1:{port}/x" in msg
    assert "server is running" in msg and "--state-db" in msg


def test_missing_postgres_database_is_named(postgres_server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StateError, match='database "nope" does not exist.*createdb'):
        open_state(postgres_server.url("nope"))
