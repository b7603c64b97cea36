"""``fleetlm serve``: the model and every adapter in the store over an OpenAI-compatible
HTTP API, optionally behind the routes of a config file.

Wiring only: it builds the engine (:mod:`fleetlm.engine.engine`), the app
(:func:`fleetlm.server.app.create_app`) and the router (:class:`fleetlm.server.hybrid.Router`),
then runs the engine on this thread and uvicorn on a second one until a signal stops them.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from fleetlm.cli.options import (
    AdaptersDirArg,
    DTypeArg,
    DTypeOpt,
    ModelOpt,
    QuantArg,
    QuantOpt,
    fail,
)
from fleetlm.errors import FleetLMError

app = typer.Typer()


@app.command()
def serve(
    model: ModelOpt = "smollm2-135m",
    adapters_dir: AdaptersDirArg = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    dtype: DTypeArg = DTypeOpt.auto,
    quantize: QuantArg = QuantOpt.none,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together (KV cache rows).")] = 32,
    max_len: Annotated[int, typer.Option(help="Prompt + generated tokens per sequence.")] = 2048,
    max_hot_adapters: Annotated[int, typer.Option(help="Adapters held in the engine's LoRA slots.")] = 32,
    max_lora_rank: Annotated[int, typer.Option(help="Largest adapter rank accepted.")] = 16,
    config: Annotated[Path | None, typer.Option(help="Routes config (YAML): route names become models that answer with the small model or escalate to a large upstream (docs/router.md).")] = None,
) -> None:
    """Serve the model (and every adapter in the store) over an OpenAI-compatible HTTP API."""
    try:
        import uvicorn

        from fleetlm.adapters import AdapterStore
        from fleetlm.engine.engine import Engine, EngineConfig
        from fleetlm.models.loader import load_model
        from fleetlm.paths import default_adapters_dir
        from fleetlm.server.app import create_app

        routes_cfg = None
        if config is not None:
            from fleetlm.router.config import load_routes

            routes_cfg = load_routes(config)  # before the model: a bad file fails at once
        lm = load_model(model, dtype=dtype.value, quantize=quantize.value)
        root = adapters_dir or default_adapters_dir()
        store = AdapterStore(root, lm.config, dtype=lm.model.dtype, max_rank=max_lora_rank)
        engine = Engine(lm, EngineConfig(max_running=max_batch, max_len=max_len,
                                         max_hot_adapters=max_hot_adapters,
                                         max_lora_rank=max_lora_rank), store=store)
        name = model if "/" not in model and not model.endswith(".gguf") else lm.name
        router = None
        if routes_cfg is not None:
            from fleetlm.server.hybrid import Router

            router = Router.for_server(routes_cfg, name, store)
            for warning in router.upstreams.missing_keys():
                typer.echo(f"fleetlm: warning: {warning}", err=True)
            typer.echo(f"fleetlm: routes {', '.join(router.routes)}; ledger {router.ledger.path}",
                       err=True)
        typer.echo(f"fleetlm: serving {name!r} with adapters from {root} on http://{host}:{port}/v1",
                   err=True)
        server = uvicorn.Server(uvicorn.Config(create_app(engine, name, router), host=host, port=port,
                                               log_level="warning", timeout_graceful_shutdown=30))
        # The engine runs on this (main) thread and HTTP on a second one: torch's OpenMP
        # pool is much slower when forked from a second thread (see Engine.run). SIGTERM or
        # Ctrl-C: uvicorn stops accepting, lets requests in flight finish (30 s at most),
        # and its thread ends; a second Ctrl-C stops at once.
        def on_signal(sig: int, _frame: Any) -> None:
            if server.should_exit and sig == signal.SIGINT:
                server.force_exit = True
            server.should_exit = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        http = threading.Thread(target=server.run, name="fleetlm-http", daemon=True)
        http.start()
        try:
            engine.run(until=lambda: not http.is_alive())
        finally:
            engine.shutdown(timeout=30)
            if router is not None:
                router.ledger.close()  # every row recorded so far is committed
        if not server.started:
            raise FleetLMError(f"--host {host} --port {port}: the HTTP server did not start "
                               "(is the port in use? see the message above)")
        typer.echo("fleetlm: stopped", err=True)
    except FleetLMError as e:
        fail(e)
