"""``fleetlm serve --ray`` on a local Ray cluster started here (one per module): two engine
replicas of one thread each and two ingress replicas over the tiny model, state in the test
run's PostgreSQL. Checked against the single-process server on the same files: the same
greedy text and the same refusals, requests spread over both replicas, adapter affinity,
keys that hold across ingress replicas, a killed replica, and scaling to zero and back."""

from __future__ import annotations

import concurrent.futures
import contextlib
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("ray.serve")

from fleetlm.cluster import deploy  # noqa: E402
from fleetlm.cluster.settings import ClusterSettings  # noqa: E402
from fleetlm.server.run import ServeSettings  # noqa: E402
from tests.server.conftest import serve_app  # noqa: E402

pytestmark = pytest.mark.slow

ADAPTERS = [f"task{i}" for i in range(8)]
HOT = 4  # hot adapters per replica: the 8 fit on 2 replicas only if each keeps its own


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def files(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fleetlm.adapters.random import make_random_adapter
    from fleetlm.models.loader import load_model

    root = tmp_path_factory.mktemp("cluster") / "adapters"
    cfg = load_model(str(tiny_base), dtype="float32").config
    for i, name in enumerate(ADAPTERS):  # wide enough that each adapter changes the text
        make_random_adapter(root / name, cfg, rank=4, alpha=8, seed=i, std=0.3)
    return root


@pytest.fixture(scope="module")
def settings(tiny_base: Path, files: Path, postgres_server: Any) -> ServeSettings:
    url = postgres_server.url(postgres_server.create_database())
    return ServeSettings(model=str(tiny_base), adapters_dir=files, port=free_port(),
                         dtype="float32", quantize="none", compile=False, max_batch=4,
                         max_len=256, max_hot_adapters=HOT, state_db=url,
                         prefix_cache_mb=0)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Any]:
    """The large model: a recording OpenAI-compatible stub on loopback."""
    from tests.openai_stub import Reply, stub_starter

    starter = stub_starter()
    yield next(starter)(Reply("from the large model"))
    for _ in starter:
        pass


@pytest.fixture(scope="module")
def routes_file(upstream: Any, files: Path) -> Path:
    """Route "echo": always the large model ($1 / $2 per 1M tokens), PII off; the ledger is
    the state store's table (PostgreSQL here), shared by every ingress replica."""
    import yaml

    path = files.parent / "routes.yaml"
    path.write_text(yaml.safe_dump({
        "upstreams": {"up": {"base_url": upstream.base_url, "model": "big",
                             "price_per_1m_input": 1.0, "price_per_1m_output": 2.0,
                             "max_tokens": 64}},
        "routes": {"echo": {"small": ADAPTERS[7], "policy": "always-large", "pii": "off",
                            "large": ["up"]}}}))
    return path


@pytest.fixture(scope="module")
def cluster() -> ClusterSettings:
    return ClusterSettings(min_replicas=2, max_replicas=2, num_cpus=2, ingress_replicas=2,
                           look_back_period_s=2, metrics_interval_s=0.5,
                           upscale_delay_s=0, downscale_delay_s=1,
                           downscale_to_zero_delay_s=2)


@pytest.fixture(scope="module")
def ray_url(settings: ServeSettings, cluster: ClusterSettings, routes_file: Path,
            ) -> Iterator[str]:
    """``fleetlm serve --ray`` as a user runs it (it starts the local cluster); this process
    then joins that cluster to look at and act on the replicas."""
    import ray

    url = f"http://127.0.0.1:{settings.port}"
    cmd = [sys.executable, "-m", "fleetlm", "serve", "--ray", "--model", settings.model,
           "--adapters-dir", str(settings.adapters_dir), "--port", str(settings.port),
           "--dtype", "float32", "--quantize", "none", "--no-compile", "--max-batch", "4",
           "--max-len", "256", "--max-hot-adapters", str(HOT), "--prefix-cache-mb", "0",
           "--state-db", str(settings.state_db), "--min-replicas", "2", "--max-replicas", "2",
           "--ingress-replicas", "2", "--config", str(routes_file),
           # several tokens per replica-to-ingress message: the greedy-text and stream
           # checks below then cover the grouping (one per message is the default)
           "--stream-interval", "3"]
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, _tail(log)
            assert time.time() < deadline, "fleetlm serve --ray did not answer in 240 s"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(1)
        ray.init(address="auto", log_to_driver=False)
        yield url
    finally:
        ray.shutdown()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
        out = _tail(log)
        log.close()
    assert code == 0, out
    assert "serving on http://127.0.0.1" in out and "fleetlm: stopped" in out, out


def _tail(log: Any) -> str:
    log.seek(0)
    return str(log.read())[-4000:]


@pytest.fixture(scope="module")
def single_url(settings: ServeSettings) -> Iterator[str]:
    from fleetlm.server.run import build

    served = build(settings.model_copy(update={"state_db": None}), say=lambda _: None)
    served.engine.start()
    try:
        with serve_app(served.app) as url:
            yield url
    finally:
        served.engine.shutdown(10)
        served.state.close()


def complete(url: str, model: str, prompt: str = "The weather today", **kw: Any,
             ) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def stats(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/health", timeout=30)
    assert r.status_code == 200
    return dict(r.json())


def test_greedy_text_and_refusals_match_the_single_process_server(ray_url: str,
                                                                  single_url: str,
                                                                  settings: ServeSettings,
                                                                  ) -> None:
    texts = set()
    for model in [settings.model, *ADAPTERS]:
        got, want = complete(ray_url, model), complete(single_url, model)
        assert got.status_code == want.status_code == 200, got.text
        g, w = got.json(), want.json()
        assert g["choices"][0]["text"] == w["choices"][0]["text"]
        assert g["choices"][0]["finish_reason"] == w["choices"][0]["finish_reason"] == "length"
        assert g["usage"] == w["usage"] and g["model"] == model
        texts.add(g["choices"][0]["text"])
    assert len(texts) >= 8  # the adapters really change the answer
    # streamed chat: the same deltas as the single-process server's answer
    body = {"model": ADAPTERS[3], "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 6, "temperature": 0}
    want_chat = httpx.post(f"{single_url}/v1/chat/completions", json=body, timeout=60).json()
    with httpx.stream("POST", f"{ray_url}/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == want_chat["choices"][0]["message"]["content"]
    # refusals: the same status and error fields
    for model, kw in (("no-such-adapter", {}), (ADAPTERS[0], {"temperature": -1}),
                      (ADAPTERS[0], {"top_p": 2})):
        got, want = complete(ray_url, model, **kw), complete(single_url, model, **kw)
        assert got.status_code == want.status_code and got.status_code in (400, 404), got.text
        ge, we = got.json()["error"], want.json()["error"]
        assert (ge["type"], ge["param"], ge["code"]) == (we["type"], we["param"], we["code"])
    models = httpx.get(f"{ray_url}/v1/models", timeout=30).json()["data"]
    assert {m["id"] for m in models} >= {settings.model, *ADAPTERS}


def per_ingress(url: str) -> dict[str, dict[str, Any]]:
    """/health of each ingress replica (Serve picks one per call): its counters by id."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(40):
        s = stats(url)
        seen[s["ingress"]] = s
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    return seen


def test_requests_spread_over_replicas_and_follow_their_adapters(ray_url: str) -> None:
    for name in ADAPTERS:  # warm-up: each adapter lands on a replica
        assert complete(ray_url, name, max_tokens=2).status_code == 200
    time.sleep(2.0)  # the routers learn where each adapter is (pushed every 0.1 s)
    before = per_ingress(ray_url)
    rng = random.Random(0)
    picks = [rng.choice(ADAPTERS) for _ in range(40)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda m: complete(ray_url, m, max_tokens=2).status_code, picks))
    assert codes == [200] * len(picks)
    after = per_ingress(ray_url)
    served = {k: sum(s["replicas"].get(k, 0) for s in after.values())
              for s0 in after.values() for k in s0["replicas"]}
    assert len(served) == 2 and min(served.values()) >= 4, served  # both replicas work
    asked = sum(after[i]["adapter_requests"] - before[i]["adapter_requests"] for i in after)
    hot = sum(after[i]["adapter_hot_hits"] - before[i]["adapter_hot_hits"] for i in after)
    assert asked == len(picks)
    # after warm-up nearly every request finds its adapter hot where Serve sends it
    assert hot / asked >= 0.9, (hot, asked, after)


def test_keys_hold_across_ingress_replicas(ray_url: str, settings: ServeSettings) -> None:
    from fleetlm.state.db import open_state
    from fleetlm.state.keys import KeyStore
    from fleetlm.state.tenants import TenantStore

    db = open_state(settings.state_db)
    try:
        TenantStore(db).create("acme")
        secret, _ = KeyStore(db).create("acme", "user", name="cluster")
        old, old_key = KeyStore(db).create("acme", "user", name="old")
        KeyStore(db).revoke(old_key.id)
    finally:
        db.close()
    time.sleep(5.5)  # each ingress re-reads whether keys exist every cache_ttl_s (5 s)
    body = {"model": ADAPTERS[1], "prompt": "x", "max_tokens": 2, "temperature": 0}
    # keys now exist: both ingress replicas (Serve picks one per request) refuse a missing
    # or revoked key and take the good one, all read from the one PostgreSQL store
    answered_by = set()
    for _ in range(8):
        for key, want in ((None, 401), (old, 401), (secret, 200)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(f"{ray_url}/v1/completions", json=body, headers=headers, timeout=60)
            assert r.status_code == want, r.text
        answered_by.add(stats(ray_url)["ingress"])
    assert len(answered_by) == 2


def test_an_adapter_replaced_through_the_ingress_is_never_served_stale(
        ray_url: str, single_url: str, settings: ServeSettings, files: Path) -> None:
    admin = _auth(settings, role="admin")
    old, new = ADAPTERS[5], ADAPTERS[6]
    body = {"prompt": "The weather today", "max_tokens": 8, "temperature": 0}

    def text(url: str, model: str) -> str:
        r = httpx.post(f"{url}/v1/completions", json={**body, "model": model}, headers=admin,
                       timeout=60)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    for _ in range(4):  # hot on whichever replicas Serve picks
        before = text(ray_url, old)
    want = text(single_url, new)
    assert before != want
    upload = [("files", (p.name, p.read_bytes())) for p in sorted((files / new).iterdir())
              if p.is_file()]
    r = httpx.post(f"{ray_url}/v1/adapters", data={"name": old, "overwrite": "true"},
                   files=upload, headers=admin, timeout=60)
    assert r.status_code == 201, r.text
    # every replica notices the replaced folder on its next request for it
    assert [text(ray_url, old) for _ in range(6)] == [want] * 6


def test_a_tenant_budget_is_spent_once_across_ingress_replicas(
        ray_url: str, settings: ServeSettings, upstream: Any) -> None:
    from fleetlm.router.ledger import Ledger
    from fleetlm.state.db import open_state
    from fleetlm.state.keys import KeyStore
    from fleetlm.state.tenants import TenantPolicy, TenantStore

    db = open_state(settings.state_db)
    try:
        TenantStore(db).create("thrifty", TenantPolicy(budget_daily_usd=1e-6))
        secret, _ = KeyStore(db).create("thrifty", "user")
    finally:
        db.close()
    key = {"Authorization": f"Bearer {secret}"}
    body = {"model": "echo", "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 3, "temperature": 0}
    before = len(upstream.bodies)
    r = httpx.post(f"{ray_url}/v1/chat/completions", json=body, headers=key, timeout=60)
    # 11 + 7 tokens at $1 / $2 per 1M: $2.5e-5, over the $1e-6 a day
    assert r.status_code == 200 and "x-fleetlm-fallback" not in r.headers, r.text
    assert r.json()["choices"][0]["message"]["content"] == "from the large model"
    time.sleep(2.5)  # each ingress re-reads a tenant's spend from the ledger every 2 s
    answered_by: set[str] = set()
    sent = 0
    # until both ingress replicas were seen (Ray picks one per request: 8 in a row on the
    # same one happened), at least 8: the small model answers, nothing escalates
    while sent < 8 or (len(answered_by) < 2 and sent < 40):
        r = httpx.post(f"{ray_url}/v1/chat/completions", json=body, headers=key, timeout=60)
        assert r.status_code == 200 and r.headers["x-fleetlm-fallback"] == "over_daily_budget"
        answered_by.add(stats(ray_url)["ingress"])
        sent += 1
    assert len(upstream.bodies) == before + 1 and len(answered_by) == 2
    db = open_state(settings.state_db)
    try:
        ledger = Ledger(db)
        rows = [e for e in ledger.query() if e.tenant == "thrifty"]
        ledger.close()
    finally:
        db.close()
    assert sorted(e.decision for e in rows) == ["fallback"] * sent + ["large"]
    assert sum(e.cost_usd for e in rows) == pytest.approx(2.5e-5)


def test_a_tenant_rate_limit_holds_across_ingress_replicas(
        ray_url: str, settings: ServeSettings) -> None:
    from fleetlm.state.db import open_state
    from fleetlm.state.keys import KeyStore
    from fleetlm.state.tenants import TenantPolicy, TenantStore

    db = open_state(settings.state_db)
    try:
        TenantStore(db).create("steady", TenantPolicy(rpm=6))
        secret, _ = KeyStore(db).create("steady", "user")
    finally:
        db.close()
    key = {"Authorization": f"Bearer {secret}"}
    body = {"model": ADAPTERS[1], "prompt": "x", "max_tokens": 1, "temperature": 0}
    codes = []
    for _ in range(7):  # Serve spreads them over both ingress replicas
        r = httpx.post(f"{ray_url}/v1/completions", json=body, headers=key, timeout=60)
        codes.append(r.status_code)
        time.sleep(1.3)  # each ingress shares its counts through the store every second
    # six for the tenant, not six per ingress replica
    assert codes == [200] * 6 + [429], codes
    assert r.json()["error"]["code"] == "tenant_rpm_exceeded"


def _engine_replicas() -> list[Any]:
    import ray

    return [ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "#engine#" in a["name"]]


def test_a_killed_replica_fails_its_requests_with_503_and_is_replaced(
        ray_url: str, cluster: ClusterSettings, settings: ServeSettings) -> None:
    import ray

    auth = _auth(settings)
    replicas = _engine_replicas()
    assert len(replicas) == 2
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(httpx.post, f"{ray_url}/v1/completions",
                               json={**body, "model": ADAPTERS[i % 8]}, headers=auth,
                               timeout=120) for i in range(8)]
        time.sleep(0.5)  # every request placed and generating (200 tokens take seconds)
        ray.kill(replicas[0], no_restart=False)
        results = [f.result() for f in futures]
    codes = sorted(r.status_code for r in results)
    # the killed replica's requests fail, the other replica's finish
    assert set(codes) == {200, 503}, codes
    for r in results:
        if r.status_code == 503:
            err = r.json()["error"]
            assert err["code"] == "engine_unavailable" and "retry" in err["message"]
            assert r.headers["retry-after"] == "1"
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"
    deadline = time.time() + 120
    while deploy.replica_count(cluster) < 2 and time.time() < deadline:
        time.sleep(1)
    assert deploy.replica_count(cluster) == 2
    r = httpx.post(f"{ray_url}/v1/completions", json={**body, "model": ADAPTERS[0],
                                                      "max_tokens": 2}, headers=auth, timeout=60)
    assert r.status_code == 200


def _auth(settings: ServeSettings, role: str = "user") -> dict[str, str]:
    """A key of its own (keys exist once the keys test ran; harmless otherwise)."""
    from fleetlm.state.db import open_state
    from fleetlm.state.keys import KeyStore
    from fleetlm.state.tenants import TenantStore

    db = open_state(settings.state_db)
    try:
        if TenantStore(db).get("acme") is None:
            TenantStore(db).create("acme")
        secret, _ = KeyStore(db).create("acme", role)
    finally:
        db.close()
    return {"Authorization": f"Bearer {secret}"}


def test_scale_to_zero_and_back(ray_url: str, settings: ServeSettings,
                                cluster: ClusterSettings) -> None:
    auth = _auth(settings)
    to_zero = cluster.model_copy(update={"min_replicas": 0, "initial_replicas": None})
    deploy.start(settings, to_zero)  # the same application, new autoscaling bounds
    deadline = time.time() + 90
    while deploy.replica_count(to_zero) > 0 and time.time() < deadline:
        time.sleep(0.5)
    assert deploy.replica_count(to_zero) == 0
    t0 = time.perf_counter()
    r = httpx.post(f"{ray_url}/v1/completions", json={"model": ADAPTERS[2], "prompt": "Hi",
                                                      "max_tokens": 3, "temperature": 0},
                   headers=auth, timeout=180)
    cold_s = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert deploy.replica_count(to_zero) >= 1
    print(f"cold start from zero replicas: {cold_s:.1f} s to the answer")
