"""The state store: API keys, tenants and their policies, the audit log, and the cost
ledger's table, in one database: a SQLite file by default (``$FLEETLM_HOME/state.db``), or
PostgreSQL when several replicas share it (``--state-db postgresql://...`` or
``$FLEETLM_STATE_DB``).

    from fleetlm.state import AuditEvent, AuditLog, KeyStore, TenantPolicy, TenantStore, open_state

    db = open_state()                                   # opens and migrates; StateError if not
    TenantStore(db).create("acme", TenantPolicy(models=["smollm2-*"], rpm=600))
    secret, key = KeyStore(db).create("acme", "user", name="ci")   # the secret is shown once
    KeyStore(db).lookup(secret).status()                # "active"
    AuditLog(db).record(AuditEvent(action="key.create", outcome="ok", actor="cli:alice",
                                   tenant="acme", target=key.id))
    db.close()

    db.py          URLs, the engine, StateDB, open_state
    schema.py      the tables (SQLAlchemy Core)
    migrations.py  numbered migrations, applied once under a lock
    keys.py        API keys (sha256 of a 256-bit secret)
    tenants.py     tenants and TenantPolicy (glob patterns, rate limits, budgets)
    audit.py       the append-only audit log
    admin.py       changes made together with their audit event (CLI and admin API)
    listing.py     tables and JSON of keys, tenants and events for the command line

A lower floor: it imports fleetlm.config, fleetlm.errors, fleetlm.paths and third-party
libraries only; the server enforces what is stored here, the router's ledger writes its
rows here. Importing it opens nothing.
"""

from fleetlm.state.audit import AuditEvent, AuditLog, cli_actor
from fleetlm.state.db import StateDB, StateError, default_state_url, open_state, resolve_url
from fleetlm.state.keys import KEY_PREFIX, ROLES, ApiKey, KeyStore, hash_key
from fleetlm.state.tenants import TENANT_NAME, Tenant, TenantPolicy, TenantStore

__all__ = [
    "KEY_PREFIX", "ROLES", "TENANT_NAME", "ApiKey", "AuditEvent", "AuditLog", "KeyStore",
    "StateDB", "StateError", "Tenant", "TenantPolicy", "TenantStore", "cli_actor",
    "default_state_url", "hash_key", "open_state", "resolve_url",
]
