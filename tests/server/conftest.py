"""A live fleetlm server on loopback (real default model, float32) for the server tests."""

from __future__ import annotations

import contextlib
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
    import uvicorn

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, MODEL, router), host="127.0.0.1",
                                        port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", engine, lm, root, router)
    finally:
        srv.should_exit = True
        t.join(10)
        engine.shutdown(10)
        if router is not None:
            router.ledger.close()
