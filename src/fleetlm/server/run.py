"""Running a server process: build the engine, the app and the routes from settings, then
run the engine on the calling (main) thread and HTTP on a second one until a signal.

    settings = ServeSettings(model="smollm2-135m", port=8000)
    served = build(settings, say=print)     # routes file checked before the model loads
    run(served)                             # returns after SIGTERM / Ctrl-C, requests drained

Why two threads: torch's OpenMP pool is much slower when forked from a second thread (see
``Engine.run``), so the engine keeps the main thread. SIGTERM or Ctrl-C: uvicorn stops
accepting, lets requests in flight finish (``grace_s`` at most) and its thread ends; a second
Ctrl-C stops at once. This module knows processes, threads and signals; what a request does
is the app's business (:mod:`fleetlm.server.app`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from fleetlm.config import StrictModel
from fleetlm.errors import FleetLMError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import LoadedModel
    from fleetlm.server.auth import Gateway
    from fleetlm.server.hybrid import Router
    from fleetlm.state.db import StateDB


class ServeSettings(StrictModel):
    """What ``fleetlm serve`` was asked for (its options, one field each)."""

    model: str = "smollm2-135m"
    adapters_dir: Path | None = None  # None: the user data folder (fleetlm.paths)
    # adapters in an object store (s3://..., any fsspec URL): adapters_dir (default: a
    # folder under the cache) then holds this process's copies (fleetlm.adapters.mirror)
    adapters_url: str | None = None
    # with adapters_url: seconds a local copy is served without asking the remote whether it
    # changed (0: ask on every request for the adapter; one listing of its folder each)
    adapters_refresh_s: float = Field(5.0, ge=0)
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    quantize: str = "auto"  # int8 where this CPU has a vector path for it
    compile: bool = True  # compiled decode steps, warmed up before serving
    prefix_cache_mb: float = Field(256.0, ge=0)  # shared prompt prefixes' keys and values
    speculative_tokens: int = Field(0, ge=0)  # draft tokens checked per step (0: off)
    draft_model: str | None = None  # proposes drafts where prompt lookup finds none
    max_batch: int = 32
    max_len: int = 2048
    max_hot_adapters: int = 32
    max_overtakes: int = Field(64, ge=0)  # EngineConfig.max_overtakes
    max_lora_rank: int = 16
    lora_dtype: Literal["auto", "float32", "bfloat16", "int8"] = "auto"
    config: Path | None = None  # routes config (YAML)
    grace_s: float = 30.0  # requests in flight get this long after a stop signal
    # the largest request body, and the largest adapter upload (its files), in MiB: over
    # them a request is refused with 413 (docs/limits.md)
    max_body_mb: float = Field(4.0, gt=0)
    max_upload_mb: float = Field(512.0, gt=0)
    # keys, tenants, the audit log and the cost ledger: None = $FLEETLM_STATE_DB, else
    # $FLEETLM_HOME/state.db (SQLite); postgresql://... when replicas share it
    state_db: str | None = None

    @field_validator("draft_model")
    @classmethod
    def _draft_needs_tokens(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and not info.data.get("speculative_tokens"):
            raise ValueError("a draft model proposes speculative tokens: set "
                             "--speculative-tokens N (N >= 1) too")
        return value


@dataclass
class Served:
    """A built server, ready to :func:`run`."""

    settings: ServeSettings
    name: str  # the base model's name in the API
    adapters_root: Path
    engine: Engine
    app: FastAPI
    router: Router | None
    state: StateDB


def adapters_root(settings: ServeSettings) -> Path:
    """The adapter store's folder: ``--adapters-dir`` or the user data folder; with
    ``--adapters-url``, the local copies' folder (default: one per URL under the cache)."""
    from fleetlm.adapters.mirror import store_root

    return store_root(settings.adapters_dir, settings.adapters_url)


def open_adapter_store(settings: ServeSettings, base_config: Any, dtype: Any) -> Any:
    """The adapter store of these settings: the folder, or a mirror of ``adapters_url``."""
    from fleetlm.adapters.mirror import open_adapter_store as open_store

    return open_store(settings.adapters_dir, settings.adapters_url, base_config,
                      refresh_s=settings.adapters_refresh_s, dtype=dtype,
                      max_rank=settings.max_lora_rank)


def engine_config(settings: ServeSettings) -> EngineConfig:
    """The engine settings ``fleetlm serve``'s options give (one engine, or each replica's)."""
    from fleetlm.engine.engine import EngineConfig

    s = settings
    return EngineConfig(max_running=s.max_batch, max_len=s.max_len,
                        max_hot_adapters=s.max_hot_adapters, max_overtakes=s.max_overtakes,
                        max_lora_rank=s.max_lora_rank, lora_dtype=s.lora_dtype,
                        compile=s.compile, prefix_cache_bytes=int(s.prefix_cache_mb * (1 << 20)),
                        speculative_tokens=s.speculative_tokens)


def open_gateway(settings: ServeSettings, say: Callable[[str], None]) -> tuple[StateDB, Gateway]:
    """The state store (a bad URL fails here, before any model loads) and the gateway on it."""
    from fleetlm.server.auth import Gateway, is_loopback
    from fleetlm.state.db import open_state

    state = open_state(settings.state_db)
    gateway = Gateway(state, require_keys=not is_loopback(settings.host))
    say(f"fleetlm: state store {state.display_url}; {gateway.describe()}")
    return state, gateway


def build_engine(settings: ServeSettings, say: Callable[[str], None]) -> Engine:
    """Load the model (and the draft model), open the adapter store, build the engine and
    compile its decode steps: what one process, or one engine replica, serves."""
    from fleetlm.engine.engine import Engine
    from fleetlm.models.loader import load_model

    s = settings
    lm = load_model(s.model, dtype=s.dtype, quantize=s.quantize)
    draft = (load_model(s.draft_model, dtype=s.dtype, quantize=s.quantize)
             if s.draft_model else None)
    store = open_adapter_store(s, lm.config, lm.model.dtype)
    engine = Engine(lm, engine_config(s), store=store, draft=draft)
    say(f"fleetlm: {lm.name} {str(lm.dtype).removeprefix('torch.')}, weights {lm.quantize}, "
        f"{'compiling decode steps' if engine.lm.model.decode_compiled else 'eager'}")
    if engine.runner.lora is not None:
        lora = engine.runner.lora
        say(f"fleetlm: {lora.num_slots} hot adapter slots of rank <= {lora.max_rank}, "
            f"{str(lora.dtype).removeprefix('torch.')} (--lora-dtype {s.lora_dtype}), "
            f"{lora.nbytes() / 2**20:.0f} MiB")
    warm = engine.warmup()
    if engine.lm.model.decode_compiled:
        say(f"fleetlm: decode steps compiled in {warm:.1f} s (cached for the next start in "
            f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'the inductor cache')})")
    elif s.compile:
        say("fleetlm: decode steps run eagerly (compilation off or failed; see above)")
    return engine


def api_name(settings: ServeSettings, lm: LoadedModel) -> str:
    """The base model's name in the API: the embedded name as given, else the model's."""
    m = settings.model
    return m if "/" not in m and not m.endswith(".gguf") else lm.name


def assemble(settings: ServeSettings, engine: Any, name: str, state: StateDB,
             gateway: Gateway, routes_cfg: Any, say: Callable[[str], None],
             ) -> tuple[FastAPI, Router | None]:
    """The app over ``engine`` (an :class:`Engine`, or anything with its serving surface:
    the Ray ingress's remote engine), with the routes of ``routes_cfg`` when given."""
    from fleetlm.server.app import create_app

    s = settings
    router = None
    if routes_cfg is not None:
        from fleetlm.router.ledger import Ledger
        from fleetlm.server.hybrid import Router

        # the routes file's ledger_path, else the ledger table of the state store
        ledger = Ledger(routes_cfg.ledger_path if routes_cfg.ledger_path else state)
        router = Router.for_server(routes_cfg, name, engine.store, ledger=ledger)
        for warning in router.upstreams.missing_keys():
            say(f"fleetlm: warning: {warning}")
        say(f"fleetlm: routes {', '.join(router.routes)}; ledger {router.ledger.path}")
    app = create_app(engine, name, router, max_body_bytes=int(s.max_body_mb * (1 << 20)),
                     max_upload_bytes=int(s.max_upload_mb * (1 << 20)), gateway=gateway)
    return app, router


def load_routes_file(settings: ServeSettings) -> Any:
    """The routes config of ``--config`` (None without one), read before any model loads
    so a bad file fails at once."""
    if settings.config is None:
        return None
    from fleetlm.router.config import load_routes

    return load_routes(settings.config)


def build(settings: ServeSettings, say: Callable[[str], None]) -> Served:
    """Load the model, open the adapter store, check the routes against them and assemble
    the app. ``say`` receives the start-up lines (warnings, where things are)."""
    routes_cfg = load_routes_file(settings)
    state, gateway = open_gateway(settings, say)
    engine = build_engine(settings, say)
    name = api_name(settings, engine.lm)
    app, router = assemble(settings, engine, name, state, gateway, routes_cfg, say)
    return Served(settings, name, adapters_root(settings), engine, app, router, state)


def run(served: Served) -> None:
    """Serve until SIGTERM or Ctrl-C; then drain, stop the engine and close the ledger.
    A server that could not start (port in use) is a FleetLMError naming --host/--port."""
    import uvicorn

    s = served.settings
    server = uvicorn.Server(uvicorn.Config(served.app, host=s.host, port=s.port,
                                           log_level="warning",
                                           timeout_graceful_shutdown=int(s.grace_s)))

    def on_signal(sig: int, _frame: Any) -> None:
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True  # a second Ctrl-C: stop now
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    http = threading.Thread(target=server.run, name="fleetlm-http", daemon=True)
    http.start()
    try:
        served.engine.run(until=lambda: not http.is_alive())
    finally:
        served.engine.shutdown(timeout=s.grace_s)
        if served.router is not None:
            served.router.ledger.close()  # every row recorded so far is committed
        served.state.close()
    if not server.started:
        raise FleetLMError(f"--host {s.host} --port {s.port}: the HTTP server did not start "
                           "(is the port in use? see the message above)")
