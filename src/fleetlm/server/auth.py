"""Who is calling: API keys, roles, and the audit trail of what admins did.

    gateway = Gateway(open_state(url), require_keys=not is_loopback(host))
    app.include_router(router, dependencies=[Depends(gateway.authenticate)])
    caller_of(request)        # Caller(key_id, tenant, role, policy), set by authenticate
    await gateway.record(request, "adapter.add", "b77", "ok", {"overwrite": False})

Clients send ``Authorization: Bearer flm-...`` (the OpenAI SDK's ``api_key``). A server is
*open* (every request is an anonymous admin, as before keys existed) only while its store
has never held a key and it listens on a loopback address; once a key exists (revoking or
expiring every key does not open it again), or on any other address, every endpoint but
``/health`` needs a key, and an open server ignores whatever key a client sends. Refusals are 401 (missing, unknown, revoked, expired key: ``WWW-Authenticate:
Bearer``) and 403 (a user key on an admin endpoint), OpenAI-shaped.

Keys are looked up by their SHA-256 (:mod:`fleetlm.state.keys`); a known key and its
tenant's policy are cached for ``cache_ttl_s`` (5 s), so the hot path is two dictionary
lookups and a hash, and a revocation or a tenant change made with the CLI (or on another
replica) takes effect within that time. Unknown keys are cached too (bounded), so a client
hammering with a wrong key costs no database reads. Lookups that miss the cache run on a
worker thread, never on the event loop.

Audit: admin actions are recorded before their response goes out (awaited); refused
authentications are recorded without delaying the refusal, at most ``audit_per_s`` rows a
second, the rest counted into the next row's ``detail.suppressed``. An audit write that
fails is logged, never turned into an error for the client.

This module knows HTTP, keys and roles; tenants' limits are :mod:`fleetlm.server.limits`'s,
storage is :mod:`fleetlm.state`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleetlm.server.errors import INVALID_REQUEST, APIError
from fleetlm.server.limits import PERMISSION, Budgets, RateLimiter

if TYPE_CHECKING:
    from fleetlm.state.db import StateDB
    from fleetlm.state.tenants import TenantPolicy

log = logging.getLogger(__name__)

ADMIN, USER = "admin", "user"
_bearer = HTTPBearer(auto_error=False, description="An API key from `fleetlm keys create` "
                     "(flm-...); not needed while the server is open (no keys, loopback).")
_MAX_CACHED = 10_000


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a key (its id, tenant, role and the tenant's policy), or the
    anonymous admin of an open server (no key id, no tenant, no limits)."""

    key_id: str | None
    tenant: str
    role: str
    policy: TenantPolicy | None

    @property
    def actor(self) -> str:
        return self.key_id or "anonymous"

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


ANONYMOUS = Caller(None, "", ADMIN, None)


def caller_of(request: Request) -> Caller:
    """The caller :meth:`Gateway.authenticate` found (anonymous when the app has no gateway)."""
    return getattr(request.state, "caller", ANONYMOUS)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a --host value) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def remote(request: Request) -> str:
    return request.client.host if request.client else ""


class _TTLCache:
    """At most ``_MAX_CACHED`` entries, each for ``ttl`` seconds (oldest evicted first)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.items: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> tuple[bool, Any]:
        hit = self.items.get(key)
        if hit is None or time.monotonic() - hit[0] > self.ttl:
            return False, None
        return True, hit[1]

    def put(self, key: str, value: Any) -> None:
        self.items[key] = (time.monotonic(), value)
        self.items.move_to_end(key)
        while len(self.items) > _MAX_CACHED:
            self.items.popitem(last=False)


class Gateway:
    """Keys, roles, tenants' limits and the audit log of one server, over a state store.

    ``db`` None: no store (an app built in a test or a benchmark): always open, no audit.
    ``require_keys``: refuse requests without a valid key even while no key exists (a
    non-loopback bind)."""

    def __init__(self, db: StateDB | None, *, require_keys: bool = False,
                 cache_ttl_s: float = 5.0, audit_per_s: float = 10.0) -> None:
        self.db, self.require_keys, self.cache_ttl_s = db, require_keys, cache_ttl_s
        self.keys = self.tenants = self.audit = None
        if db is not None:
            from fleetlm.state.audit import AuditLog
            from fleetlm.state.keys import KeyStore
            from fleetlm.state.tenants import TenantStore

            self.keys, self.tenants, self.audit = KeyStore(db), TenantStore(db), AuditLog(db)
        if db is not None:
            from fleetlm.state.rates import RateCounts

            # every process serving this store counts against the same limits
            self.limiter = RateLimiter(shared=RateCounts(db))
        else:
            self.limiter = RateLimiter()
        self.budgets: Budgets | None = None  # set by the router, which owns the ledger
        self._keys = _TTLCache(cache_ttl_s)  # key hash -> (ApiKey | None, TenantPolicy | None)
        self._active = self.keys.count_active() if self.keys is not None else 0
        self._keys_made = self.keys.count() if self.keys is not None else 0
        self._checked_at = time.monotonic()
        self._audit_allowance, self._audit_at, self._suppressed = audit_per_s, 0.0, 0
        self._audit_per_s = audit_per_s
        self._tasks: set[asyncio.Task[None]] = set()

    # -- who is calling --------------------------------------------------------------------

    async def keys_required(self) -> bool:
        """Whether requests need a key now: always off loopback, else once the store holds a
        key, active or not (re-read every ``cache_ttl_s`` until then)."""
        if self.require_keys or self._keys_made:
            return True
        if self.keys is None:
            return False
        if time.monotonic() - self._checked_at > self.cache_ttl_s:
            self._checked_at = time.monotonic()
            self._keys_made = await asyncio.to_thread(self.keys.count)
        return self._keys_made > 0

    def describe(self) -> str:
        """The start-up line about access."""
        if self._keys_made == 0 and not self.require_keys:
            return ("no API keys: the server is open to anyone who can reach it (loopback "
                    "only); create one with `fleetlm keys create --tenant NAME --role admin` "
                    "and every endpoint but /health will need a key")
        if self._keys_made == 0:
            return ("API keys required (not a loopback address) and none exists yet: every "
                    "request but /health is refused until you run `fleetlm tenants create "
                    "NAME` and `fleetlm keys create --tenant NAME --role admin`")
        return f"API keys required ({self._active} active of {self._keys_made})"

    async def authenticate(self, request: Request,
                           credentials: HTTPAuthorizationCredentials | None = Security(_bearer)
                           ) -> Caller:
        """The FastAPI dependency of every endpoint but /health: the caller, or 401."""
        caller = await self._caller(request, credentials)
        request.state.caller = caller
        return caller

    async def admin(self, request: Request,
                    credentials: HTTPAuthorizationCredentials | None = Security(_bearer)
                    ) -> Caller:
        """The dependency of admin endpoints: an admin caller, or 401/403."""
        caller = await self.authenticate(request, credentials)
        if not caller.is_admin:
            self.refused_later(request, "not_admin", caller=caller)
            raise APIError(403, f"{request.method} {request.url.path} needs an admin key; this "
                                f"key ({caller.key_id}) has role {caller.role!r}", PERMISSION,
                           None, "admin_only")
        return caller

    async def _caller(self, request: Request,
                      credentials: HTTPAuthorizationCredentials | None) -> Caller:
        if not await self.keys_required():
            return ANONYMOUS  # open: whatever key the client sends is ignored
        if credentials is None or not credentials.credentials:
            raise self._refuse(request, "missing_api_key", "no API key: send `Authorization: "
                               "Bearer KEY` (the OpenAI SDK's api_key) with a key from "
                               "`fleetlm keys create`")
        secret = credentials.credentials
        if self.keys is None:  # a bind that needs keys, and no store to hold them
            raise self._refuse(request, "invalid_api_key", "this server has no key store")
        from fleetlm.state.keys import hash_key

        digest = hash_key(secret)
        found, cached = self._keys.get(digest)
        if not found:
            cached = await asyncio.to_thread(self._lookup, secret)
            self._keys.put(digest, cached)
        key, policy = cached
        if key is None:
            raise self._refuse(request, "invalid_api_key", "the API key is not valid; check "
                               "it, or ask an admin for a new one", secret)
        status = key.status()
        if status != "active":
            raise self._refuse(request, f"{status}_api_key", f"the API key {key.id} is "
                               f"{status}; ask an admin for a new one", secret, key.tenant)
        return Caller(key.id, key.tenant, key.role, policy)

    def _lookup(self, secret: str) -> tuple[Any, TenantPolicy | None]:
        """The key and its tenant's policy, from the store (on a worker thread)."""
        assert self.keys is not None and self.tenants is not None
        key = self.keys.lookup(secret)
        if key is None:
            return None, None
        tenant = self.tenants.get(key.tenant)
        return key, tenant.policy if tenant is not None else None

    def _refuse(self, request: Request, reason: str, message: str, secret: str = "",
                tenant: str = "") -> APIError:
        detail: dict[str, Any] = {"reason": reason, "path": request.url.path}
        if secret.startswith("flm-"):
            detail["key_prefix"] = secret[:8]  # what `fleetlm keys list` shows; never more
        self.refused_later(request, reason, detail=detail, tenant=tenant)
        return APIError(401, message, INVALID_REQUEST, None, reason,
                        headers={"WWW-Authenticate": "Bearer"})

    # -- the audit log ---------------------------------------------------------------------

    async def record(self, request: Request, action: str, target: str, outcome: str,
                     detail: dict[str, Any] | None = None) -> None:
        """Record an admin action (committed before this returns; a failure is logged)."""
        if self.audit is None:
            return
        from fleetlm.state.audit import AuditEvent

        caller = caller_of(request)
        event = AuditEvent(action=action, outcome=outcome, actor=caller.actor,
                           tenant=caller.tenant, target=target, detail=detail or {},
                           remote=remote(request))
        await asyncio.to_thread(self._write, event)

    def refused_later(self, request: Request, reason: str, *, caller: Caller | None = None,
                      detail: dict[str, Any] | None = None, tenant: str = "") -> None:
        """Record a refused authentication in the background, rate-limited."""
        if self.audit is None:
            return
        now = time.monotonic()
        self._audit_allowance = min(self._audit_per_s, self._audit_allowance
                                    + (now - self._audit_at) * self._audit_per_s)
        self._audit_at = now
        if self._audit_allowance < 1:
            self._suppressed += 1
            return
        self._audit_allowance -= 1
        from fleetlm.state.audit import AuditEvent

        detail = dict(detail or {"reason": reason, "path": request.url.path})
        if self._suppressed:
            detail["suppressed"], self._suppressed = self._suppressed, 0
        event = AuditEvent(action="auth.refused", outcome="denied",
                           actor=caller.actor if caller else "anonymous",
                           tenant=caller.tenant if caller else tenant,
                           target=f"{request.method} {request.url.path}", detail=detail,
                           remote=remote(request))
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._write, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _write(self, event: Any) -> None:
        assert self.audit is not None
        try:
            self.audit.record(event)
        except Exception as e:  # noqa: BLE001 -- the request must not fail for the audit log
            log.error("audit: %s %s not recorded: %s", event.action, event.target, e)

    async def aclose(self) -> None:
        """Wait for the audit rows still being written; send the rate counts not yet
        shared."""
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks)
        await self.limiter.aclose()
