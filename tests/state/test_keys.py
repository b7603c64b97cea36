"""API keys on SQLite and PostgreSQL: the secret is returned once and never stored, lookup
by hash returns revoked and expired keys with their status, errors name the fix."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from fleetlm.state import KEY_PREFIX, KeyStore, StateDB, StateError, TenantStore, hash_key
from fleetlm.state.keys import looks_like_secret, parse_expires


@pytest.fixture
def keys(db: StateDB) -> KeyStore:
    TenantStore(db).create("acme")
    TenantStore(db).create("other")
    return KeyStore(db)


def all_text(db: StateDB) -> str:
    """Every value of every table, as text (what a stolen database would show)."""
    out = []
    with db.read() as conn:
        for table in sa.inspect(conn).get_table_names():
            out += [repr(tuple(r)) for r in conn.exec_driver_sql(f"SELECT * FROM {table}")]
    return "\n".join(out)


def test_create_and_lookup(db: StateDB, keys: KeyStore) -> None:
    secret, key = keys.create("acme", "user", name="ci")
    assert secret.startswith(KEY_PREFIX) and len(secret) == 4 + 43
    assert key.id.startswith("key_") and len(key.id) == 4 + 12
    assert key.prefix == secret[:8] and (key.tenant, key.role, key.name) == ("acme", "user", "ci")
    assert key.status() == "active" and key.expires is None and key.revoked is None
    assert keys.lookup(secret) == key == keys.get(key.id)
    assert keys.lookup(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    for junk in ("", "flm-", "Bearer " + secret, secret + "\n", "x" * 10_000, None, 42):
        assert keys.lookup(junk) is None  # type: ignore[arg-type]
    assert keys.get("key_000000000000") is None

    # the secret is nowhere in the database; its hash is
    text = all_text(db)
    assert secret not in text and secret[8:] not in text
    assert hash_key(secret) in text
    if db.path is not None:
        raw = b"".join(p.read_bytes() for p in db.path.parent.glob(db.path.name + "*"))
        assert secret.encode() not in raw and secret[8:].encode() not in raw


def test_two_keys_differ_and_list_by_tenant(keys: KeyStore) -> None:
    s1, k1 = keys.create("acme", "admin")
    s2, k2 = keys.create("other", "user")
    s3, k3 = keys.create("acme", "user", name="second")
    assert len({s1, s2, s3}) == 3 and len({k1.id, k2.id, k3.id}) == 3
    assert [k.id for k in keys.list()] == [k1.id, k2.id, k3.id]
    assert [k.id for k in keys.list("acme")] == [k1.id, k3.id]
    assert keys.list("nobody") == []
    assert keys.count_active() == 3


def test_revoke_keeps_the_first_time(keys: KeyStore) -> None:
    secret, key = keys.create("acme", "user")
    first = keys.revoke(key.id)
    assert first.status() == "revoked" and first.revoked is not None
    time.sleep(0.01)
    assert keys.revoke(key.id).revoked == first.revoked
    assert keys.lookup(secret) == first  # still found: the caller says why it refuses
    assert keys.count_active() == 0
    with pytest.raises(StateError, match="no API key 'key_nope'; `fleetlm keys list`"):
        keys.revoke("key_nope")


def test_expiry(keys: KeyStore) -> None:
    now = time.time()
    secret, key = keys.create("acme", "user", expires=now + 60)
    assert key.status(now) == "active" and key.status(now + 61) == "expired"
    assert keys.count_active(now) == 1 and keys.count_active(now + 61) == 0
    found = keys.lookup(secret)
    assert found is not None and found.status(now + 61) == "expired"
    with pytest.raises(StateError, match="--expires .* is in the past"):
        keys.create("acme", "user", expires=now - 1)


def test_create_errors_name_the_fix(keys: KeyStore) -> None:
    with pytest.raises(StateError, match="--tenant 'nope': no such tenant; create it first: "
                                         "fleetlm tenants create nope"):
        keys.create("nope", "user")
    with pytest.raises(StateError, match="--role 'root': use one of admin, user"):
        keys.create("acme", "root")
    assert keys.list() == []


def test_parse_expires() -> None:
    now = 1_000_000.0
    assert parse_expires("30d", now) == now + 30 * 86400
    assert parse_expires("12h", now) == now + 12 * 3600
    assert parse_expires("2w", now) == now + 14 * 86400
    assert parse_expires("2027-01-31T00:00:00Z") == 1801353600.0
    with pytest.raises(StateError, match="--expires 'soon': give a duration"):
        parse_expires("soon")


def test_looks_like_secret() -> None:
    secret = KEY_PREFIX + "Ab" + "c" * 41
    assert looks_like_secret(secret) and looks_like_secret(f'{{"k": "{secret}"}}')
    assert not looks_like_secret(secret[:8])  # the displayed prefix is fine
    assert not looks_like_secret("flm-" + "a" * 43)  # a lower-case tenant name, not a key
