"""Fixtures of the state store's tests: ``db``, an open store on SQLite and on PostgreSQL
(``state_url`` is parametrized over both; see tests/postgres.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleetlm.state import StateDB, open_state


@pytest.fixture
def db(state_url: str) -> Iterator[StateDB]:
    store = open_state(state_url)
    yield store
    store.close()
