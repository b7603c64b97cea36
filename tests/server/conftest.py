"""A live fleetlm server on loopback (real default model, float32) for the server tests."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MODEL = "smollm2-135m"


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT (no /v1)
    engine: Any
    lm: Any
    root: Path  # the adapter store
    router: Any = None  # the hybrid router, when the server has routes


@contextlib.contextmanager
def live_server(root: Path, *, with_demo: bool,
                routes: dict[str, Any] | None = None) -> Iterator[LiveServer]:
    """Serve MODEL with the store at ``root`` (plus a random adapter "demo" if asked):
    4 KV rows, 2 waiting places, 2 hot adapter slots; ``routes``, a routes config as
    parsed YAML, adds the hybrid router (relative paths from ``root``)."""
    from fleetlm.adapters import AdapterStore
    from fleetlm.adapters.random import make_random_adapter
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model
    from fleetlm.server.app import create_app

    lm = load_model(MODEL, dtype="float32")
    if with_demo:
        make_random_adapter(root / "demo", lm.config, rank=8, alpha=16, seed=0, std=0.05)
    store = AdapterStore(root, lm.config, dtype=torch.float32, max_rank=16)
    engine = Engine(lm, EngineConfig(max_running=4, max_len=512, max_waiting=2,
                                     max_hot_adapters=2), store=store)
    router = None
    if routes is not None:
        from fleetlm.router.config import parse_routes
        from fleetlm.server.hybrid import Router

        router = Router.for_server(parse_routes(routes, base_dir=root), MODEL, store)
    engine.start()
    try:
        with serve_app(create_app(engine, MODEL, router)) as url:
            yield LiveServer(url, engine, lm, root, router)
    finally:
        engine.shutdown(10)
        if router is not None:
            router.ledger.close()


@contextlib.contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port, in a thread: its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        t.join(10)


def send_then_leave(url: str, path: str, body: dict[str, Any], engine: Any) -> float:
    """POST ``body`` on a raw socket, wait until the engine generates for it (admitted, then
    0.5 s), close the socket without reading the answer; the seconds until the engine has
    nothing running or waiting (an assertion error past 3 s)."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    sock = socket.create_connection((host, int(port)))
    try:
        sock.sendall(head + data)
        end = time.monotonic() + 60
        while engine.stats()["running"] == 0:  # admitted
            assert time.monotonic() < end
            time.sleep(0.02)
        time.sleep(0.5)  # generating
    finally:
        sock.close()  # the client goes away without reading an answer
    gone = time.monotonic()
    while engine.stats()["running"] or engine.stats()["waiting"]:
        assert time.monotonic() - gone < 3, "the request kept generating after its client left"
        time.sleep(0.02)
    return time.monotonic() - gone
