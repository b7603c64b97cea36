"""The tables of the state store, as SQLAlchemy Core objects the stores query with.

    schema_migrations  which numbered migration ran when (migrations.py writes it)
    tenants            name -> policy (JSON of TenantPolicy): what a tenant may call, its limits
    api_keys           one row per key: the sha256 of the secret, never the secret
    audit              append-only: who did what to which adapter, key or tenant, and refusals
    requests           the cost ledger (fleetlm.router.ledger): one row per routed request
    rate_counts        requests and tokens per tenant, second and serving process: the
                       tenants' rpm/tpm windows every replica of one store shares
    schema_version     the ledger's own format version (1), kept from the ledger file that
                       came before the state store, so that file and this one read alike

These objects describe the tables as they are now; the tables are created and changed only
by the numbered migrations (migrations.py), whose DDL is frozen as it was written. When a
table changes, change it here AND add a migration; tests/state checks the two agree.

This module knows column names and types; what the rows mean is the stores' business.
"""

from __future__ import annotations

import sqlalchemy as sa

# REAL on SQLite, DOUBLE PRECISION on PostgreSQL (PostgreSQL's REAL is 4 bytes: not for
# unix seconds or dollars)
Real: sa.Double[float] = sa.Double()
# the ledger's and the audit log's row ids: 64 bits on PostgreSQL, the rowid on SQLite
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("applied_ts", Real, nullable=False),
)

tenants = sa.Table(
    "tenants", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("policy", sa.Text, nullable=False, server_default="{}"),  # JSON TenantPolicy
    sa.Column("created", Real, nullable=False),
    sa.Column("updated", Real, nullable=False),
)

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.Text, primary_key=True),  # "key_" + 12 hex
    sa.Column("hash", sa.Text, nullable=False, unique=True),  # sha256 hex of the secret
    sa.Column("prefix", sa.Text, nullable=False),  # the secret's first 8 chars, for display
    sa.Column("tenant", sa.Text, sa.ForeignKey("tenants.name"), nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False, server_default=""),
    sa.Column("created", Real, nullable=False),
    sa.Column("expires", Real, nullable=True),
    sa.Column("revoked", Real, nullable=True),
    sa.Index("api_keys_tenant", "tenant"),
)

audit = sa.Table(
    "audit", metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column("ts", Real, nullable=False),
    sa.Column("actor", sa.Text, nullable=False, server_default=""),
    sa.Column("tenant", sa.Text, nullable=False, server_default=""),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("target", sa.Text, nullable=False, server_default=""),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=False, server_default="{}"),  # JSON, never secrets
    sa.Column("remote", sa.Text, nullable=False, server_default=""),
    sa.Index("audit_ts", "ts"),
    sa.Index("audit_tenant_ts", "tenant", "ts"),
)

requests = sa.Table(
    "requests", metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column("ts", Real, nullable=False),  # unix seconds, when the request arrived
    sa.Column("request_id", sa.Text, nullable=False, server_default=""),
    sa.Column("tenant", sa.Text, nullable=False, server_default=""),  # never the key
    sa.Column("route", sa.Text, nullable=False),
    sa.Column("policy", sa.Text, nullable=False, server_default=""),
    sa.Column("score", Real, nullable=True),  # the policy's score in [0, 1]
    sa.Column("decision", sa.Text, nullable=False),  # small | large | fallback | blocked
    sa.Column("model", sa.Text, nullable=False, server_default=""),
    sa.Column("upstream", sa.Text, nullable=True),  # NULL: answered locally
    sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("latency_ms", Real, nullable=False, server_default="0"),
    sa.Column("cost_usd", Real, nullable=False, server_default="0"),
    sa.Column("baseline_cost_usd", Real, nullable=True),  # NULL: the route has no upstream
    sa.Column("pii", sa.Text, nullable=False, server_default="{}"),  # {entity type: count}
    sa.Column("flags", sa.Text, nullable=False, server_default="[]"),  # JSON list
    sa.Index("requests_ts", "ts"),
    sa.Index("requests_tenant_ts", "tenant", "ts"),
)

rate_counts = sa.Table(
    "rate_counts", metadata,
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),  # "requests" | "tokens"
    sa.Column("second", sa.BigInteger, primary_key=True, autoincrement=False),  # unix s
    sa.Column("source", sa.Text, primary_key=True),  # the serving process that counted
    sa.Column("n", sa.BigInteger, nullable=False),
    sa.Index("rate_counts_second", "second"),
)

ledger_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, nullable=False),
)
