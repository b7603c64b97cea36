"""One engine per Ray Serve replica: the engine deployment's class.

A replica builds the same engine ``fleetlm serve`` builds (model, adapter store on the shared
folder, compiled decode steps) and runs its loop on a thread of its own. The ingress calls
:meth:`EngineReplica.generate` through a streaming deployment handle with the adapter's
name as Serve's multiplexed model id, so Serve sends it to a replica that already holds the
adapter where there is one. The stream is: one :class:`Placement` (which replica, and
whether the adapter was already hot there), then the engine's events; a request the engine
refuses (bad settings, a full queue, an unknown or invalid adapter) yields the refusal as
an item instead, for the ingress to raise, so the HTTP answer is the one ``fleetlm serve``
gives.

Ray Serve keeps up to ``max_num_models_per_replica`` multiplexed ids per replica (LRU) and
routes by them; that number is the engine's ``max_hot_adapters``, so the set Serve routes
by is the set the engine keeps hot. The decorator is applied where the deployment is built
(:func:`fleetlm.cluster.deploy.engine_deployment`), with the configured number.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fleetlm.cluster")


@dataclass(frozen=True)
class Placement:
    """The first item of every stream: which replica took the request, and whether its
    adapter was already loaded there (False: this request loaded it)."""

    replica: str
    adapter_was_hot: bool


class EngineReplica:
    """The engine deployment's replica (decorated by :mod:`fleetlm.cluster.deploy`)."""

    def __init__(self, settings: dict[str, Any], threads: int, stream_interval: int = 1,
                 ) -> None:
        import threading

        from fleetlm.server.run import ServeSettings

        serve_settings = ServeSettings.model_validate(settings)
        self.replica = _replica_id()
        self.adapter_loads = 0
        self.stream_interval = stream_interval
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.engine: Any = None
        # Everything torch does in this process happens on this one thread: the model load,
        # the compiled graphs' warm-up and every step. OpenMP gives each thread that opens
        # parallel regions its own worker pool, and two pools on the same cores slow every
        # step (Engine.run; bench cluster: 0.56x -> 0.64x of the single process once the
        # model load moved onto this thread).
        self._thread = threading.Thread(target=self._run, args=(serve_settings, threads),
                                        name="fleetlm-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise self._failed

    def _run(self, settings: Any, threads: int) -> None:
        import torch

        from fleetlm.server.run import build_engine

        try:
            torch.set_num_threads(threads)
            self.engine = build_engine(settings, say=log.info)
        except BaseException as e:  # noqa: BLE001 -- re-raised by __init__ on Ray's thread
            self._failed = e
            return
        finally:
            self._ready.set()
        self.engine.run(until=lambda: False)  # until shutdown()

    async def _load_adapter(self, name: str) -> str:
        """Serve's multiplexed loader (an LRU miss): read the adapter into the warm tier now,
        off the event loop, so the request's first step does not wait for the disk. Errors
        are left for the engine's own check, which reports them as ``fleetlm serve`` does."""
        import asyncio

        self.adapter_loads += 1
        store = self.engine.store
        if store is not None:
            try:
                await asyncio.to_thread(store.get, name)
            except Exception:  # noqa: BLE001 -- submit() refuses it with the store's message
                log.debug("adapter %r did not load; the request will be refused", name)
        return name

    async def load_adapter(self, name: str) -> str:
        """Replaced by the multiplexed wrapper in the deployment class."""
        return await self._load_adapter(name)

    async def generate(self, prompt: list[int], params: Any, adapter: str | None,
                       ) -> AsyncIterator[Any]:
        """Placement, then the request's events (or its refusal); closing the stream (the
        ingress's client left) cancels the engine request."""
        hot = True
        if adapter is not None:
            before = self.adapter_loads
            await self.load_adapter(adapter)
            hot = self.adapter_loads == before
        yield Placement(self.replica, hot)
        events = self.engine.stream(prompt, params, adapter=adapter)
        try:
            first = await events.__anext__()
        except Exception as e:  # noqa: BLE001 -- a refusal: the ingress raises it
            yield e
            return
        yield [first]
        batch: list[Any] = []
        async for ev in events:
            batch.append(ev)
            if len(batch) >= self.stream_interval or ev.finish_reason is not None:
                yield batch
                batch = []
        if batch:
            yield batch

    def stats(self) -> dict[str, Any]:
        return {"replica": self.replica, "adapter_loads": self.adapter_loads,
                **self.engine.stats()}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread died is replaced."""
        if not self._thread.is_alive():
            raise RuntimeError(f"replica {self.replica}: the engine loop is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5)  # run() returns after its current step


def _replica_id() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 -- outside a replica (tests of the class itself)
        import os

        return f"pid-{os.getpid()}"
