"""API keys: created with a random secret that is shown once, stored as its sha256 only,
looked up by that hash, revoked or expired but never deleted (the audit log names them).

    secret, key = KeyStore(db).create("acme", "user", name="ci", expires=time.time() + 86400)
    key = KeyStore(db).lookup(secret)       # ApiKey or None; key.status() says if it is usable

A secret is ``flm-`` + 43 url-safe characters (256 random bits). Why a plain sha256 and not
a slow password hash (bcrypt, argon2): those exist to make guessing low-entropy passwords
expensive; a 256-bit random secret cannot be guessed, so a slow hash would only slow every
request down. The hash is also why a lookup is one indexed select that leaks nothing by its
timing: an attacker cannot steer which stored hash their guess lands near.

The functions ``insert_key`` and ``revoke_in`` work inside a caller's transaction (admin.py
writes the key and its audit event together); :class:`KeyStore` wraps each in its own.

This module knows keys, tenants' names and roles; what a role may do is the server's business.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa

from fleetlm.state.db import StateDB, StateError
from fleetlm.state.schema import api_keys, tenants

ROLES = ("admin", "user")
KEY_PREFIX = "flm-"
Role = Literal["admin", "user"]
KeyStatus = Literal["active", "revoked", "expired"]
# what create() makes: flm- + token_urlsafe(32); lookup() accepts a little more, in case the
# length ever changes, and refuses anything else without a query
_SECRET = re.compile(r"flm-[A-Za-z0-9_-]{16,128}")
# a whole secret inside a text (43 random url-safe chars hold an upper-case letter all but
# once in 10^9; tenant names, which are lower-case, never match)
_LEAK = re.compile(r"(?<![A-Za-z0-9_-])flm-[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class ApiKey:
    """One key as stored (never the secret). ``prefix``: the secret's first 8 characters,
    for people to tell keys apart."""

    id: str
    tenant: str
    role: str
    name: str
    prefix: str
    created: float
    expires: float | None
    revoked: float | None

    def status(self, now: float | None = None) -> KeyStatus:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and self.expires <= (time.time() if now is None else now):
            return "expired"
        return "active"

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        return asdict(self) | {"status": self.status(now)}


def hash_key(secret: str) -> str:
    """sha256 hex of the secret: what the database stores and looks up."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def looks_like_secret(text: str) -> bool:
    """True when ``text`` contains something shaped like an API key secret (the audit log
    refuses to store it)."""
    return any(any(c.isupper() for c in m[0]) for m in _LEAK.finditer(text))


def parse_expires(text: str, now: float | None = None) -> float:
    """Unix seconds of ``--expires``: a duration from now (``30d``, ``12h``, ``90m``, ``2w``)
    or an ISO date or date-time (``2027-01-31`` is local midnight; ``2027-01-31T12:00Z``)."""
    t = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([mhdw])", t)
    if m:
        return (time.time() if now is None else now) + float(m[1]) * _UNITS[m[2]]
    try:
        return datetime.fromisoformat(t).timestamp()
    except ValueError:
        raise StateError(f"--expires {text!r}: give a duration (30d, 12h, 90m, 2w) or an ISO "
                         "date or date-time (2027-01-31, 2027-01-31T12:00:00Z)") from None


def _key(row: Any) -> ApiKey:
    return ApiKey(id=row.id, tenant=row.tenant, role=row.role, name=row.name,
                  prefix=row.prefix, created=row.created, expires=row.expires,
                  revoked=row.revoked)


_COLUMNS = [c for c in api_keys.c if c.name != "hash"]


def insert_key(conn: sa.Connection, tenant: str, role: str, *, name: str = "",
               expires: float | None = None, now: float | None = None) -> tuple[str, ApiKey]:
    """Create a key inside the caller's transaction; ``(secret, key)``."""
    now = time.time() if now is None else now
    problems = []
    if role not in ROLES:
        problems.append(f"--role {role!r}: use one of {', '.join(ROLES)}")
    if expires is not None and expires <= now:
        when = datetime.fromtimestamp(expires).isoformat(timespec="seconds")
        problems.append(f"--expires {when} is in the past; give a later date or a duration "
                        "(30d)")
    if len(name) > 200:
        problems.append("--name: at most 200 characters")
    if problems:
        raise StateError("; ".join(problems))
    if conn.execute(sa.select(tenants.c.name).where(tenants.c.name == tenant)).first() is None:
        raise StateError(f"--tenant {tenant!r}: no such tenant; create it first: "
                         f"fleetlm tenants create {tenant}")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id="key_" + secrets.token_hex(6), tenant=tenant, role=role, name=name,
                 prefix=secret[:8], created=now, expires=expires, revoked=None)
    conn.execute(api_keys.insert().values(hash=hash_key(secret), **asdict(key)))
    return secret, key


def revoke_in(conn: sa.Connection, key_id: str, now: float | None = None) -> ApiKey:
    """Revoke inside the caller's transaction; a key revoked before keeps its first time."""
    now = time.time() if now is None else now
    conn.execute(api_keys.update().where(api_keys.c.id == key_id, api_keys.c.revoked.is_(None))
                 .values(revoked=now))
    row = conn.execute(sa.select(*_COLUMNS).where(api_keys.c.id == key_id)).first()
    if row is None:
        raise StateError(f"no API key {key_id!r}; `fleetlm keys list` shows the ids")
    return _key(row)


class KeyStore:
    """The API keys of a state store. Every method is one short transaction."""

    def __init__(self, db: StateDB) -> None:
        self.db = db

    def create(self, tenant: str, role: str, *, name: str = "",
               expires: float | None = None) -> tuple[str, ApiKey]:
        """A new key for ``tenant`` (which must exist): ``(secret, key)``. The secret is
        returned here only; the database keeps its hash."""
        with self.db.write() as conn:
            return insert_key(conn, tenant, role, name=name, expires=expires)

    def lookup(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, revoked and expired ones included (the caller says
        why it refuses); None for an unknown or malformed secret."""
        if not isinstance(secret, str) or not _SECRET.fullmatch(secret):
            return None
        with self.db.read() as conn:
            row = conn.execute(sa.select(*_COLUMNS)
                               .where(api_keys.c.hash == hash_key(secret))).first()
        return _key(row) if row is not None else None

    def get(self, key_id: str) -> ApiKey | None:
        with self.db.read() as conn:
            row = conn.execute(sa.select(*_COLUMNS).where(api_keys.c.id == key_id)).first()
        return _key(row) if row is not None else None

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        """Every key (of ``tenant``), oldest first."""
        q = sa.select(*_COLUMNS).order_by(api_keys.c.created, api_keys.c.id)
        if tenant is not None:
            q = q.where(api_keys.c.tenant == tenant)
        with self.db.read() as conn:
            return [_key(r) for r in conn.execute(q)]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke ``key_id`` now (StateError when there is no such key); revoking twice keeps
        the first time."""
        with self.db.write() as conn:
            return revoke_in(conn, key_id)

    def count(self) -> int:
        """Every key ever created, revoked and expired ones included."""
        with self.db.read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(api_keys)).scalar()
                       or 0)

    def count_active(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        q = (sa.select(sa.func.count()).select_from(api_keys)
             .where(api_keys.c.revoked.is_(None),
                    sa.or_(api_keys.c.expires.is_(None), api_keys.c.expires > now)))
        with self.db.read() as conn:
            return int(conn.execute(q).scalar() or 0)
