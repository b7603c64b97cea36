"""What the ingress's HTTP app sees of the engine replicas: an engine's serving surface.

:class:`RemoteEngine` offers the app what it uses of :class:`~fleetlm.engine.engine.Engine`
-- ``stream``, ``stats``, ``store``, ``lm`` (the tokenizer and chat template),
``config.max_len``, ``pin_adapter``/``unpin_adapter`` -- and sends each request to the
engine deployment through a streaming Ray Serve handle, with the adapter's name as the
multiplexed model id. Refusals come back as the engine's own errors (so the HTTP answers are
those of ``fleetlm serve``); a replica that dies before or during a request ends it with
:class:`~fleetlm.errors.EngineUnavailable` (HTTP 503, Retry-After), and Ray Serve replaces
the replica. Per request the ingress counts where it ran and whether its adapter was
already hot there (``stats()``: ``adapter_requests``, ``adapter_hot_hits``, ``replicas``).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fleetlm.cluster.replica import Placement
from fleetlm.engine.engine import EngineConfig, EngineEvent
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.errors import ConfigError, EngineUnavailable

PIN_REFUSED = ("pinning is per engine replica and not available with --ray yet; the "
               "replicas keep their adapters hot by traffic (LRU)")


class RemoteEngine:
    """The engine deployment behind ``handle`` (a Serve DeploymentHandle), for the app."""

    def __init__(self, handle: Any, lm: Any, config: EngineConfig, store: Any,
                 affinity: bool = True) -> None:
        import uuid

        self.handle, self.lm, self.config, self.store = handle, lm, config, store
        self.ingress = uuid.uuid4().hex[:8]  # which ingress replica answered /health
        self.affinity = affinity  # False: adapters are not routed by (bench cluster)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.generated_tokens = 0
        self.requests = 0
        self.adapter_requests = 0
        self.adapter_hot_hits = 0
        self.replicas: Counter[str] = Counter()

    async def stream(self, prompt: list[int], params: SamplingParams, *,
                     adapter: str | None = None,
                     request_id: str | None = None) -> AsyncIterator[EngineEvent]:
        """The request's events from a replica; closing the iterator early cancels it
        there. Raises the engine's refusals on the first ``__anext__``."""
        if adapter is not None and self.store is not None:
            self.store.validate(adapter)  # an unknown name never reaches a replica
        model_id = adapter if adapter is not None and self.affinity else ""
        call = self.handle.options(stream=True, multiplexed_model_id=model_id)
        gen = call.generate.remote(prompt, params, adapter)
        finished = False
        with self._lock:
            self.in_flight += 1
        try:
            placement = await _next(gen, None)
            self._placed(placement, adapter)
            while not finished:
                item = await _next(gen, placement)
                if isinstance(item, BaseException):
                    finished = True
                    raise item  # the engine's refusal, as the engine raised it
                # a message holds one or more events (the replica's stream_interval)
                with self._lock:
                    self.generated_tokens += sum(ev.token_id is not None for ev in item)
                for ev in item:
                    finished = ev.finish_reason is not None
                    yield ev
        except _Started as e:  # after the first event: the stream ends with the error
            finished = True
            yield EngineEvent(request_id or "", None, "", finish_reason="error", error=e)
        except EngineUnavailable:
            finished = True
            raise
        finally:
            with self._lock:
                self.in_flight -= 1
            if not finished:
                gen.cancel()

    def _placed(self, placement: Any, adapter: str | None) -> None:
        if not isinstance(placement, Placement):
            raise EngineUnavailable(f"the engine replica answered {type(placement).__name__} "
                                    "where a placement was expected")
        with self._lock:
            self.requests += 1
            self.replicas[placement.replica] += 1
            if adapter is not None:
                self.adapter_requests += 1
                self.adapter_hot_hits += placement.adapter_was_hot

    def stats(self) -> dict[str, Any]:
        """The ingress's view: requests in flight and counts since start (the replicas'
        own queues are theirs; see docs/scale-out.md)."""
        with self._lock:
            return {"waiting": 0, "running": self.in_flight, "kv_rows": 0, "kv_rows_free": 0,
                    "hot_adapters": {}, "steps": 0, "generated_tokens": self.generated_tokens,
                    "draft_tokens_proposed": 0, "draft_tokens_accepted": 0,
                    "ingress": self.ingress, "requests": self.requests,
                    "adapter_requests": self.adapter_requests,
                    "adapter_hot_hits": self.adapter_hot_hits,
                    "replicas": dict(self.replicas)}

    def pin_adapter(self, name: str) -> None:
        raise ConfigError(f"adapter {name!r}: {PIN_REFUSED}", param="pin")

    def unpin_adapter(self, name: str) -> None:
        """Nothing is pinned with --ray, so nothing to unpin."""


class _Started(EngineUnavailable):
    """A replica failed after the request's first event: the stream ends with an error
    event instead of an exception (the client already has a 200)."""


async def _next(gen: Any, placement: Placement | None) -> Any:
    """The next item of a replica's stream; Ray's own failures (the replica died, none could
    be started, the call was rejected) become EngineUnavailable."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        cls = EngineUnavailable if placement is None else _Started
        raise cls("the engine replica ended the request's stream before its last event") \
            from None
    except Exception as e:  # noqa: BLE001 -- Ray's exception types vary by failure
        where = "before it started" if placement is None else f"on {placement.replica}"
        cls = EngineUnavailable if placement is None else _Started
        raise cls(f"the engine replica failed {where} ({type(e).__name__}); Ray Serve "
                  "replaces it: retry the request") from e
