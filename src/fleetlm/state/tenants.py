"""Tenants: a name and a policy. The policy says which base models, adapters and routes
the tenant's keys may call (fnmatch glob patterns, not regular expressions) and its limits:
requests and tokens per minute, upstream spend per UTC day and month, max_tokens and n per
request.

    TenantStore(db).create("acme", TenantPolicy(models=["smollm2-*"], rpm=600))
    TenantStore(db).set("acme", budget_daily_usd=5.0, rpm=None)   # None clears a limit
    TenantStore(db).get("acme").policy.allows_model("smollm2-135m")   # True

This module stores and validates policies; enforcing them (counting requests, summing spend)
is the server's business.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import sqlalchemy as sa
from pydantic import Field, ValidationError, field_validator

from fleetlm.config import StrictModel, format_errors
from fleetlm.state.db import StateDB, StateError
from fleetlm.state.schema import tenants

TENANT_NAME = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
MAX_PATTERNS = 64
MAX_PATTERN_CHARS = 256
_DOCS = "docs/state.md"


class TenantPolicy(StrictModel):
    """What a tenant may call and how much. Unknown keys are errors."""

    models: list[str] = Field(default_factory=lambda: ["*"])  # base model name globs
    adapters: list[str] = Field(default_factory=lambda: ["*"])  # adapter name globs
    routes: list[str] = Field(default_factory=lambda: ["*"])  # route name globs
    rpm: int | None = Field(None, ge=1)  # requests per minute
    tpm: int | None = Field(None, ge=1)  # tokens (prompt + completion) per minute
    budget_daily_usd: float | None = Field(None, ge=0)  # upstream spend per UTC day
    budget_monthly_usd: float | None = Field(None, ge=0)  # per UTC calendar month
    max_tokens: int | None = Field(None, ge=1)  # per request
    max_n: int | None = Field(None, ge=1)  # choices per request

    @field_validator("models", "adapters", "routes")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_PATTERNS:
            raise ValueError(f"at most {MAX_PATTERNS} patterns, got {len(v)}")
        for p in v:
            if not p or len(p) > MAX_PATTERN_CHARS:
                raise ValueError(f"each pattern is 1 to {MAX_PATTERN_CHARS} characters, got "
                                 f"{p[:40]!r}{'...' if len(p) > 40 else ''}")
            if any(ord(c) < 32 or ord(c) == 127 for c in p):
                raise ValueError(f"pattern {p!r} has a control character")
        return v

    def allows_model(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.models)

    def allows_adapter(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.adapters)

    def allows_route(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.routes)


FIELDS = tuple(TenantPolicy.model_fields)
PATTERN_FIELDS = ("models", "adapters", "routes")


@dataclass
class Tenant:
    name: str
    policy: TenantPolicy
    created: float
    updated: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "policy": self.policy.model_dump(),
                "created": self.created, "updated": self.updated}


def check_name(name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(TENANT_NAME, name):
        raise StateError(f"tenant name {name!r}: use 1 to 64 lowercase letters, digits, '_', "
                         "'.' or '-', starting with a letter or digit (e.g. acme, team-a)")


def policy_from(changes: dict[str, Any], base: TenantPolicy | None = None,
                what: str = "tenant policy") -> TenantPolicy:
    """``base`` (default: the default policy) with ``changes`` merged in and validated. A
    value None resets that field to its default (no limit; ``["*"]`` for a pattern list).
    Unknown fields and bad values are one StateError naming every field at fault."""
    unknown = sorted(set(changes) - set(FIELDS))
    if unknown:
        raise StateError(f"{what}: unknown field(s) {', '.join(unknown)}; the fields are "
                         f"{', '.join(FIELDS)}")
    merged = (base or TenantPolicy()).model_dump()
    for k, v in changes.items():
        if v is None:
            merged.pop(k)
        else:
            merged[k] = v
    try:
        return TenantPolicy(**merged)
    except ValidationError as e:
        lines = format_errors(e, _DOCS)
        raise StateError(f"{what}: " + "; ".join(lines)) from None


def changes_from_options(options: dict[str, Any], clear: Sequence[str] = ()) -> dict[str, Any]:
    """Policy changes from command-line options: those given (not None), pattern lists split
    on commas (``"smollm2-*,qwen*"``), and each ``--clear FIELD`` (``rpm`` or ``max-tokens``
    spelling) as None."""
    changes: dict[str, Any] = {}
    for k, v in options.items():
        if v is None:
            continue
        if k in PATTERN_FIELDS and isinstance(v, str):
            v = [p.strip() for p in v.split(",") if p.strip()]
        changes[k] = v
    for f in clear:
        key = f.strip().replace("-", "_")
        if key not in FIELDS:
            raise StateError(f"--clear {f}: not a policy field; the fields are "
                             f"{', '.join(FIELDS)}")
        if key in changes:
            raise StateError(f"--clear {f} and --{key.replace('_', '-')} both given; give one")
        changes[key] = None
    return changes


def _tenant(row: Any) -> Tenant:
    try:
        policy = TenantPolicy.model_validate_json(row.policy)
    except ValidationError as e:
        raise StateError(f"tenant {row.name}: its stored policy does not validate "
                         f"({'; '.join(format_errors(e, _DOCS))}); a newer fleetlm wrote it? "
                         "upgrade fleetlm") from None
    return Tenant(name=row.name, policy=policy, created=row.created, updated=row.updated)


def _dump(policy: TenantPolicy) -> str:
    return json.dumps(policy.model_dump(), sort_keys=True)


def insert_tenant(conn: sa.Connection, name: str, policy: TenantPolicy | None = None,
                  now: float | None = None) -> Tenant:
    """Create a tenant inside the caller's transaction."""
    check_name(name)
    now = time.time() if now is None else now
    if conn.execute(sa.select(tenants.c.name).where(tenants.c.name == name)).first():
        raise StateError(f"tenant {name} already exists; change it with "
                         f"`fleetlm tenants set {name} ...`")
    t = Tenant(name=name, policy=policy or TenantPolicy(), created=now, updated=now)
    try:
        conn.execute(tenants.insert().values(name=name, policy=_dump(t.policy), created=now,
                                             updated=now))
    except sa.exc.IntegrityError:  # created by another process since the select
        raise StateError(f"tenant {name} already exists; change it with "
                         f"`fleetlm tenants set {name} ...`") from None
    return t


def update_tenant(conn: sa.Connection, name: str, changes: dict[str, Any],
                  now: float | None = None) -> tuple[Tenant, Tenant]:
    """Merge ``changes`` into the tenant's policy inside the caller's transaction;
    ``(before, after)``."""
    row = conn.execute(sa.select(tenants).where(tenants.c.name == name)).first()
    if row is None:
        raise StateError(f"no tenant {name!r}; create it: fleetlm tenants create {name}")
    before = _tenant(row)
    policy = policy_from(changes, before.policy, what=f"tenant {name}")
    now = time.time() if now is None else now
    conn.execute(tenants.update().where(tenants.c.name == name)
                 .values(policy=_dump(policy), updated=now))
    return before, Tenant(name=name, policy=policy, created=before.created, updated=now)


class TenantStore:
    """The tenants of a state store. Every method is one short transaction."""

    def __init__(self, db: StateDB) -> None:
        self.db = db

    def create(self, name: str, policy: TenantPolicy | None = None) -> Tenant:
        with self.db.write() as conn:
            return insert_tenant(conn, name, policy)

    def get(self, name: str) -> Tenant | None:
        with self.db.read() as conn:
            row = conn.execute(sa.select(tenants).where(tenants.c.name == name)).first()
        return _tenant(row) if row is not None else None

    def list(self) -> list[Tenant]:
        with self.db.read() as conn:
            return [_tenant(r) for r in conn.execute(sa.select(tenants).order_by(tenants.c.name))]

    def set(self, name: str, **changes: Any) -> Tenant:
        """Merge ``changes`` into the policy and re-validate (see :func:`policy_from`)."""
        with self.db.write() as conn:
            return update_tenant(conn, name, changes)[1]
