"""The gateway over a live server: keys and roles, tenants' patterns, caps, rates and
budgets, the ledger's tenant, the audit log, and the OpenAI SDK with a key.

One server (the embedded model, float32) with a state store in SQLite, two adapters, and
two routes escalating to a stub upstream; keys and tenants are made with the state API,
as ``fleetlm keys create`` does. The key cache is off (``cache_ttl_s=0``), so a revocation
is seen at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.openai_stub import Reply, stub_starter
from tests.server.conftest import MODEL, serve_app

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import torch

    from fleetlm.adapters import AdapterStore
    from fleetlm.adapters.random import make_random_adapter
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model
    from fleetlm.router.config import parse_routes
    from fleetlm.router.ledger import Ledger
    from fleetlm.server.app import create_app
    from fleetlm.server.auth import Gateway
    from fleetlm.server.hybrid import Router
    from fleetlm.state import KeyStore, TenantPolicy, TenantStore, open_state

    tmp = tmp_path_factory.mktemp("gateway")
    db = open_state(tmp / "state.db")
    tenants, keys = TenantStore(db), KeyStore(db)
    tenants.create("acme")
    tenants.create("limited", TenantPolicy(models=[MODEL], adapters=["demo"], routes=["echo"],
                                           max_tokens=4, max_n=1))
    tenants.create("slow", TenantPolicy(rpm=2))
    tenants.create("tok", TenantPolicy(tpm=5))
    tenants.create("broke", TenantPolicy(budget_daily_usd=0.0))
    tenants.create("thrifty", TenantPolicy(budget_monthly_usd=1e-6))
    k: dict[str, Any] = {}
    for name, tenant, role in (("admin", "acme", "admin"), ("user", "acme", "user"),
                               ("limited", "limited", "user"), ("slow", "slow", "user"),
                               ("tok", "tok", "user"), ("broke", "broke", "user"),
                               ("thrifty", "thrifty", "user"), ("revoked", "acme", "user"),
                               ("expiring", "acme", "user")):
        expires = time.time() + 1.0 if name == "expiring" else None
        k[name], key = keys.create(tenant, role, name=name, expires=expires)
        k[name + "_id"] = key.id
    keys.revoke(k["revoked_id"])

    lm = load_model(MODEL, dtype="float32")
    for i, name in enumerate(("demo", "other")):
        make_random_adapter(tmp / "adapters" / name, lm.config, rank=4, alpha=8, seed=i, std=0.05)
    store = AdapterStore(tmp / "adapters", lm.config, dtype=torch.float32, max_rank=16)
    engine = Engine(lm, EngineConfig(max_running=4, max_len=512), store=store)
    engine.start()
    stubs = stub_starter()
    echo = next(stubs)(Reply("from the large model"))
    common = {"small": MODEL, "policy": "always-large", "pii": "off", "large": ["up"]}
    cfg = parse_routes({
        "upstreams": {"up": {"base_url": echo.base_url, "model": "big",
                             "price_per_1m_input": 1.0, "price_per_1m_output": 2.0,
                             "max_tokens": 64}},
        "routes": {"echo": common, "strict": {**common, "over_budget": "error"}},
    }, base_dir=tmp)
    ledger = Ledger(db)
    router = Router.for_server(cfg, MODEL, store, ledger=ledger)
    gateway = Gateway(db, cache_ttl_s=0.0)
    try:
        with serve_app(create_app(engine, MODEL, router, gateway=gateway)) as url:
            yield {"url": url, "keys": k, "db": db, "echo": echo, "ledger": ledger,
                   "engine": engine, "gateway": gateway, "root": tmp / "adapters"}
    finally:
        ledger.close()
        for _ in stubs:
            pass
        engine.shutdown(10)
        db.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(gw: dict[str, Any], key: str | None, model: str = MODEL, **kw: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 3, "temperature": 0, **kw}
    body = {k: v for k, v in body.items() if v is not None}
    return httpx.post(f"{gw['url']}/v1/chat/completions", json=body,
                      headers=auth(key) if key else {}, timeout=120)


def error_of(r: httpx.Response) -> dict[str, Any]:
    """The OpenAI error object, checked field by field."""
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


def audit_rows(gw: dict[str, Any], **kw: Any) -> list[Any]:
    from fleetlm.state import AuditLog

    for _ in range(50):  # refusals are recorded in the background
        rows = AuditLog(gw["db"]).query(**kw)
        if rows:
            return rows
        time.sleep(0.05)
    return rows


# -- who may call -------------------------------------------------------------------------


def test_health_answers_without_a_key(gw):
    r = httpx.get(f"{gw['url']}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize("key,code", [
    (None, "missing_api_key"),
    ("flm-not-a-real-key", "invalid_api_key"),
    ("sk-" + "x" * 4000, "invalid_api_key"),
    ("revoked", "revoked_api_key"),
])
@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
    ("GET", "/v1/adapters"), ("DELETE", "/v1/adapters/demo"), ("GET", "/metrics"),
    ("GET", "/v1/audit"), ("GET", "/openapi.json"),
])
def test_every_endpoint_but_health_needs_a_valid_key(gw, key, code, method, path):
    key = gw["keys"].get(key, key) if key else None
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2} if method == "POST" else None
    r = httpx.request(method, gw["url"] + path, json=body,
                      headers=auth(key) if key else {}, timeout=30)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    err = error_of(r)
    assert err["code"] == code and err["type"] == "invalid_request_error"
    if key:
        assert key not in r.text  # never echoed


def test_an_expired_key_is_refused(gw):
    key = gw["keys"]["expiring"]
    left = gw["keys"]["expiring_id"]
    from fleetlm.state import KeyStore

    expires = KeyStore(gw["db"]).get(left).expires
    time.sleep(max(0.0, expires - time.time() + 0.05))
    r = httpx.get(f"{gw['url']}/v1/models", headers=auth(key), timeout=10)
    assert r.status_code == 401 and error_of(r)["code"] == "expired_api_key"


def test_a_malformed_authorization_header_is_a_401_not_a_crash(gw):
    for value in ("Bearer", "Basic dXNlcjpwYXNz", "Token flm-x", "Bearer flm-é€", "Bearer a b"):
        r = httpx.get(f"{gw['url']}/v1/models",
                      headers={"Authorization": value.encode("utf-8")}, timeout=10)
        assert r.status_code == 401, (value, r.text)
        error_of(r)


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/demo"), ("GET", "/metrics"),
    ("GET", "/v1/audit"),
])
def test_a_user_key_is_refused_on_admin_endpoints(gw, method, path):
    r = httpx.request(method, gw["url"] + path, json={"name": "demo"} if method == "POST" else None,
                      headers=auth(gw["keys"]["user"]), timeout=30)
    assert r.status_code == 403, r.text
    err = error_of(r)
    assert err["code"] == "admin_only" and err["type"] == "permission_error"
    assert gw["keys"]["user_id"] in err["message"]
    assert (gw["root"] / "demo").is_dir()  # nothing was done


def test_an_admin_key_manages_adapters_and_every_action_is_audited(gw):
    from fleetlm.adapters.random import make_random_adapter

    admin, since = auth(gw["keys"]["admin"]), time.time()
    make_random_adapter(gw["root"] / "extra", gw["engine"].lm.config, rank=4, alpha=8, seed=7,
                        std=0.05)
    r = httpx.post(f"{gw['url']}/v1/adapters", json={"name": "extra", "pin": True},
                   headers=admin, timeout=60)
    assert r.status_code == 201 and r.json()["pinned"] is True
    r = httpx.delete(f"{gw['url']}/v1/adapters/missing", headers=admin, timeout=30)
    assert r.status_code == 404
    r = httpx.delete(f"{gw['url']}/v1/adapters/extra", headers=admin, timeout=30)
    assert r.status_code == 200 and r.json()["deleted"] is True
    rows = [e for e in audit_rows(gw, since=since, action="adapter.")]
    got = [(e.action, e.target, e.outcome, e.actor, e.tenant) for e in rows]
    aid = gw["keys"]["admin_id"]
    assert got == [("adapter.pin", "extra", "ok", aid, "acme"),
                   ("adapter.delete", "missing", "error", aid, "acme"),
                   ("adapter.delete", "extra", "ok", aid, "acme")]
    assert rows[1].detail["status"] == 404 and rows[0].remote == "127.0.0.1"
    # the admin reads them over HTTP too, filtered
    r = httpx.get(f"{gw['url']}/v1/audit", params={"since": "1h", "action": "adapter.delete"},
                  headers=admin, timeout=10)
    assert r.status_code == 200
    assert [(e["action"], e["target"]) for e in r.json()["data"]][-2:] == [
        ("adapter.delete", "missing"), ("adapter.delete", "extra")]
    r = httpx.get(f"{gw['url']}/v1/audit", params={"since": "yesterday"}, headers=admin,
                  timeout=10)
    assert r.status_code == 400 and error_of(r)["param"] == "since"


def test_refused_authentications_are_audited_without_the_key(gw):
    since = time.time()
    bad = "flm-ZZZZZZZZ-this-is-wrong"
    r = httpx.get(f"{gw['url']}/v1/models", headers=auth(bad), timeout=10)
    assert r.status_code == 401
    rows = audit_rows(gw, since=since, action="auth.refused")
    assert rows, "no auth.refused row"
    row = rows[-1]
    assert row.outcome == "denied" and row.target == "GET /v1/models"
    assert row.detail["reason"] == "invalid_api_key"
    assert row.detail["key_prefix"] == bad[:8] and bad not in repr(row)


# -- what a tenant may do -----------------------------------------------------------------


def test_a_tenant_calls_only_what_its_patterns_allow(gw):
    key = gw["keys"]["limited"]
    assert chat(gw, key).status_code == 200
    assert chat(gw, key, "demo").status_code == 200
    for model in ("other", f"{MODEL}:other", "strict"):
        r = chat(gw, key, model)
        assert r.status_code == 403, (model, r.text)
        err = error_of(r)
        assert err["code"] == "model_not_allowed" and err["param"] == "model"
    listed = {m["id"] for m in httpx.get(f"{gw['url']}/v1/models", headers=auth(key),
                                         timeout=10).json()["data"]}
    assert listed == {MODEL, "demo", "echo"}
    r = httpx.get(f"{gw['url']}/v1/adapters/other", headers=auth(key), timeout=10)
    assert r.status_code == 404


def test_a_tenant_caps_max_tokens_and_n(gw):
    key = gw["keys"]["limited"]
    r = chat(gw, key, max_tokens=5)
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
    r = chat(gw, key, max_tokens=None, max_completion_tokens=9)
    assert r.status_code == 400 and error_of(r)["param"] == "max_completion_tokens"
    r = chat(gw, key, n=2)
    assert r.status_code == 400 and error_of(r)["param"] == "n"
    # no limit sent: the tenant's cap applies, locally and upstream
    r = chat(gw, key, max_tokens=None, ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    before = len(gw["echo"].bodies)
    r = chat(gw, key, "echo", max_tokens=None)
    assert r.status_code == 200 and gw["echo"].bodies[before]["max_tokens"] == 4


def test_a_route_without_max_tokens_goes_upstream_capped(gw):
    before = len(gw["echo"].bodies)
    r = chat(gw, gw["keys"]["user"], "echo", max_tokens=None)
    assert r.status_code == 200
    assert gw["echo"].bodies[before]["max_tokens"] == 64  # the upstream's cap


def test_requests_per_minute_answer_429_with_retry_after(gw):
    key = gw["keys"]["slow"]
    assert [chat(gw, key).status_code for _ in range(2)] == [200, 200]
    r = chat(gw, key)
    assert r.status_code == 429
    err = error_of(r)
    assert err["code"] == "tenant_rpm_exceeded" and err["type"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert chat(gw, gw["keys"]["user"]).status_code == 200  # other tenants go on


def test_tokens_per_minute_answer_429_once_spent(gw):
    key = gw["keys"]["tok"]
    assert chat(gw, key).status_code == 200  # the prompt alone is over 5 tokens
    r = chat(gw, key)
    assert r.status_code == 429 and error_of(r)["code"] == "tenant_tpm_exceeded"
    assert int(r.headers["retry-after"]) >= 1


def test_over_budget_the_small_model_answers_or_402(gw):
    before = len(gw["echo"].bodies)
    r = chat(gw, gw["keys"]["broke"], "echo")
    assert r.status_code == 200
    assert r.headers["x-fleetlm-fallback"] == "over_daily_budget"
    assert r.json()["model"] == MODEL and len(gw["echo"].bodies) == before
    r = chat(gw, gw["keys"]["broke"], "strict")
    assert r.status_code == 402
    err = error_of(r)
    assert err["code"] == "budget_exceeded" and err["type"] == "insufficient_quota"
    assert len(gw["echo"].bodies) == before  # nothing went upstream
    gw["ledger"].flush()
    rows = [e for e in gw["ledger"].query() if e.tenant == "broke"]
    assert [(e.route, e.decision) for e in rows] == [("echo", "fallback"), ("strict", "blocked")]
    assert "over_daily_budget" in rows[0].flags
    assert rows[1].flags == ["over_daily_budget"]


def test_a_budget_stops_escalations_once_spent(gw):
    key = gw["keys"]["thrifty"]
    r = chat(gw, key, "echo")  # 11 + 7 tokens at $1 / $2 per 1M: $2.5e-5, over $1e-6
    assert r.status_code == 200 and "x-fleetlm-fallback" not in r.headers
    r = chat(gw, key, "echo")
    assert r.headers.get("x-fleetlm-fallback") == "over_monthly_budget"
    assert gw["ledger"].spend("thrifty", 0.0) == pytest.approx(2.5e-5)


def test_the_ledger_tenant_comes_from_the_key_never_a_header(gw):
    r = chat(gw, gw["keys"]["user"], "echo", max_tokens=2)
    assert r.status_code == 200
    r = httpx.post(f"{gw['url']}/v1/chat/completions",
                   json={"model": "echo", "messages": [{"role": "user", "content": "x"}],
                         "max_tokens": 2},
                   headers={**auth(gw["keys"]["user"]), "x-fleetlm-tenant": "forged"},
                   timeout=60)
    assert r.status_code == 200
    gw["ledger"].flush()
    tenants = [e.tenant for e in gw["ledger"].query()][-2:]
    assert tenants == ["acme", "acme"]


def test_the_openai_sdk_works_with_a_key(gw):
    import openai

    client = openai.OpenAI(base_url=f"{gw['url']}/v1", api_key=gw["keys"]["user"])
    out = client.chat.completions.create(model=MODEL, max_tokens=3, temperature=0,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert out.choices[0].message.content is not None and out.usage.completion_tokens <= 3
    assert {m.id for m in client.models.list()} >= {MODEL, "demo", "echo"}
    bad = openai.OpenAI(base_url=f"{gw['url']}/v1", api_key="flm-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.code == "invalid_api_key"
    user = openai.OpenAI(base_url=f"{gw['url']}/v1", api_key=gw["keys"]["limited"],
                         max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        user.chat.completions.create(model="other", max_tokens=2,
                                     messages=[{"role": "user", "content": "Hi"}])


# -- when keys are needed -----------------------------------------------------------------


def test_an_open_server_closes_once_a_key_exists(gw, state_url):
    """On SQLite and on PostgreSQL: the store is what the gateway reads keys from."""
    import asyncio

    from fleetlm.server.app import create_app
    from fleetlm.server.auth import Gateway
    from fleetlm.state import KeyStore, TenantStore, open_state

    db = open_state(state_url)
    try:
        gateway = Gateway(db, cache_ttl_s=0.0)
        assert "open" in gateway.describe()
        app = create_app(gw["engine"], MODEL, gateway=gateway)

        async def get(headers: dict[str, str]) -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://test") as c:
                return await c.get("/v1/models", headers=headers)

        assert asyncio.run(get({})).status_code == 200
        assert asyncio.run(get(auth("sk-anything"))).status_code == 200  # ignored while open
        TenantStore(db).create("ops")
        secret, key = KeyStore(db).create("ops", "admin")
        assert asyncio.run(get({})).status_code == 401
        assert asyncio.run(get(auth(secret))).status_code == 200
        KeyStore(db).revoke(key.id)  # the last key revoked: still closed, not open again
        assert asyncio.run(get({})).status_code == 401
        assert asyncio.run(get(auth(secret))).json()["error"]["code"] == "revoked_api_key"
    finally:
        db.close()


def test_a_non_loopback_server_needs_a_key_even_with_none(gw, tmp_path):
    import asyncio

    from fleetlm.server.app import create_app
    from fleetlm.server.auth import Gateway, is_loopback
    from fleetlm.state import open_state

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.com")
    db = open_state(tmp_path / "state.db")
    try:
        gateway = Gateway(db, require_keys=True)
        assert "none exists yet" in gateway.describe()
        app = create_app(gw["engine"], MODEL, gateway=gateway)

        async def go() -> tuple[int, int]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://test") as c:
                return ((await c.get("/health")).status_code,
                        (await c.get("/v1/models")).status_code)

        assert asyncio.run(go()) == (200, 401)
    finally:
        db.close()


def test_health_answers_within_a_second_while_a_hostile_upload_is_refused(gw, tmp_path):
    """Defect 2 over HTTP: an uploaded adapter_config.json whose target_modules is a
    catastrophic-backtracking regex is refused, and the server answers meanwhile."""
    import json
    import threading

    from fleetlm.adapters.random import make_random_adapter

    folder = tmp_path / "hostile"
    make_random_adapter(folder, gw["engine"].lm.config, rank=4, alpha=8, seed=3, std=0.05)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["target_modules"] = "(([a-z_.0-9])+)+Z"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    files = [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    since, result = time.time(), {}

    def upload() -> None:
        result["r"] = httpx.post(f"{gw['url']}/v1/adapters", data={"name": "hostile"},
                                 files=files, headers=auth(gw["keys"]["admin"]), timeout=60)

    t = threading.Thread(target=upload)
    t.start()
    slowest = 0.0
    while t.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(f"{gw['url']}/health", timeout=5).status_code == 200
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.02)
    t.join()
    r = result["r"]
    assert r.status_code == 422, r.text
    assert error_of(r)["code"] == "invalid_adapter"
    assert slowest < 1.0
    assert not (gw["root"] / "hostile").exists()
    rows = audit_rows(gw, since=since, action="adapter.add")
    assert [(e.target, e.outcome, e.detail["status"]) for e in rows] == [
        ("hostile", "error", 422)]
    assert rows[0].detail["files"] == sorted(p.name for p in folder.iterdir())
