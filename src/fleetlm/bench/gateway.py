"""``fleetlm bench gateway``: what keys and tenants' limits cost a request.

Two servers over one engine (the embedded model), in one process: one open (no keys), one
with a state store, a key and a tenant whose every limit is set (patterns, caps, requests
and tokens per minute, budgets) but never reached. The same requests go to both,
interleaved in pairs (A B, B A, ...), so drift on a busy 2-core machine hits both alike;
the overhead is the median of the pairs' differences (keyed minus open), per endpoint,
beside the two medians:

    GET  /v1/models            auth + the tenant's pattern filter, no generation
    POST /v1/completions       auth + patterns + caps + rate window, 1 generated token

It also times the gateway's own work in-process (the key found in its cache, the rate
window updated), which is what every request pays once the key is cached. Target (issue
13): auth + limits add <= 0.5 ms p50 per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from fleetlm.bench.common import environment, median, percentile, write_json
from fleetlm.progress import Progress

TARGET_MS = 0.5


def _in_process(gateway: Any, secret: str, policy: Any, calls: int) -> dict[str, float]:
    """Microseconds per call of the gateway's request path with the key cached."""
    from fastapi.security import HTTPAuthorizationCredentials
    from starlette.requests import Request

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
             "query_string": b"", "client": ("127.0.0.1", 1), "server": ("test", 80)}
    creds = HTTPAuthorizationCredentials(scheme="Bearer", credentials=secret)

    async def go() -> list[float]:
        times = []
        for _ in range(calls):
            req = Request(dict(scope))
            t = time.perf_counter()
            caller = await gateway.authenticate(req, creds)
            gateway.limiter.admit(caller.tenant, policy)
            gateway.limiter.add_tokens(caller.tenant, 10)
            times.append(time.perf_counter() - t)
        return times

    times = asyncio.run(go())[calls // 10:]  # the first ones fill the cache
    return {"p50_us": 1e6 * median(times), "p99_us": 1e6 * (percentile(times, 99) or 0.0)}


def run_gateway(requests: int = 1000, model: str = "smollm2-135m",
                out: Path | None = None) -> dict[str, Any]:
    """Interleaved requests to an open and a keyed server; the JSON report."""
    from fleetlm.bench.harness import serve_in_thread
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model
    from fleetlm.server.app import create_app
    from fleetlm.server.auth import Gateway
    from fleetlm.state import KeyStore, TenantPolicy, TenantStore, open_state

    lm = load_model(model, dtype="float32")
    engine = Engine(lm, EngineConfig(max_running=4, max_len=256))
    stack = contextlib.ExitStack()  # closed in reverse: servers, store, folder, engine
    engine.start()
    stack.callback(engine.shutdown, 10)
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fleetlm-bench-gateway-"))
    db = open_state(Path(tmp) / "state.db")
    stack.callback(db.close)
    big = 10**9
    policy = TenantPolicy(models=[model, "smollm2-*"], adapters=["*"], routes=["*"], rpm=big,
                          tpm=big, budget_daily_usd=1e6, budget_monthly_usd=1e6,
                          max_tokens=4096, max_n=16)
    with stack:
        TenantStore(db).create("bench", policy)
        secret, _ = KeyStore(db).create("bench", "user", name="bench")
        keyed = Gateway(db)
        urls = [stack.enter_context(serve_in_thread(create_app(engine, lm.name, gateway=g)))
                for g in (Gateway(None), keyed)]
        result = _measure(urls, secret, lm.name, requests)
        result["in_process"] = _in_process(keyed, secret, policy, 20_000)
    result["pass"] = all(e["pass"] for e in result["endpoints"].values())
    result["environment"] = environment()
    write_json(result, out)
    return result


def _measure(urls: list[str], secret: str, name: str, requests: int) -> dict[str, Any]:
    """The interleaved requests to the open (``urls[0]``) and keyed server, per endpoint."""
    import httpx

    endpoints = {
        "GET /v1/models": ("GET", "/v1/models", None),
        "POST /v1/completions": ("POST", "/v1/completions",
                                 {"model": name, "prompt": "Hi", "max_tokens": 1,
                                  "temperature": 0}),
    }
    result: dict[str, Any] = {"bench": "gateway", "requests_per_endpoint": requests,
                              "target_overhead_ms_p50": TARGET_MS, "endpoints": {}}
    with httpx.Client(timeout=60) as client, Progress("bench gateway") as progress:
        for label, (method, path, body) in endpoints.items():
            update = progress.task(label, requests)
            times: list[list[float]] = [[], []]
            headers = [{}, {"Authorization": f"Bearer {secret}"}]
            for i in range(requests + 20):  # 20 warm-up rounds, not counted
                for side in (0, 1) if i % 2 == 0 else (1, 0):
                    t = time.perf_counter()
                    r = client.request(method, urls[side] + path, json=body,
                                       headers=headers[side])
                    dt = time.perf_counter() - t
                    if r.status_code != 200:
                        raise RuntimeError(f"{label} answered {r.status_code}: {r.text}")
                    if i >= 20:
                        times[side].append(dt)
                if i >= 20:
                    update(i - 19)
            open_ms, keyed_ms = (1e3 * median(t) for t in times)
            paired = 1e3 * median([b - a for a, b in zip(*times, strict=True)])
            result["endpoints"][label] = {
                "open_p50_ms": open_ms, "keyed_p50_ms": keyed_ms,
                "open_p99_ms": 1e3 * (percentile(times[0], 99) or 0.0),
                "keyed_p99_ms": 1e3 * (percentile(times[1], 99) or 0.0),
                "overhead_p50_ms": paired, "difference_of_medians_ms": keyed_ms - open_ms,
                "pass": paired <= TARGET_MS}
    return result
