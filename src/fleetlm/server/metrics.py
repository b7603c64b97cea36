"""Prometheus metrics of one server, on a private registry (several apps per process in tests).

Counted as the server consumes engine events (:meth:`ServerMetrics.request` wraps a
request's choice streams): requests by ``model`` (base, adapter, ``base:adapter``) and
``status``, prompt and completion tokens, time to first token and inter-token latency.
Sampled at scrape time from ``engine.stats()`` and the adapter store: queue depth, batch
size, hot and warm adapters, tokens generated.

Requests refused before generation starts (unknown model, bad parameter, queue full) are
counted apart, by model and HTTP status, in ``fleetlm_refused_requests``.

Label values are bounded: every series costs memory for the life of the process, and a
refused request's ``model`` is whatever the client wrote. :meth:`ServerMetrics.model_label`
keeps the name of a model the server serves; of the rest, the first
``MAX_UNKNOWN_MODEL_LABELS`` short, plain names are kept (a typo in a client's config shows
up by name) and every other is counted as ``"other"``. The request metrics only ever see
models that were served.

This module knows metric names and what they count; it does not know HTTP, routes' logic
or the engine's internals (only ``engine.stats()`` and the events it streams).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from fleetlm.engine.engine import Engine, EngineEvent

# seconds; a 135M model on a laptop CPU is ~10-50 ms per token, prefill up to seconds
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 1.0)

# worst first: a request's status is the worst of its choices'
_STATUSES = ("error", "cancelled", "length", "stop")

OTHER_MODEL = "other"  # the label of every model name past the bound
MAX_UNKNOWN_MODEL_LABELS = 16  # names the server does not serve, kept as they were sent
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._:/-]{1,64}")  # what such a name may look like


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fleetlm_requests", "Generation requests by model and outcome "
                                "(stop, length, cancelled, error)", ["model", "status"], registry=r)
        self.refused = Counter("fleetlm_refused_requests", "Generation requests answered with "
                               "an HTTP error before generating (404, 400, 422, 429, ...)",
                               ["model", "code"], registry=r)
        self.prompt_tokens = Counter("fleetlm_prompt_tokens", "Prompt tokens (once per request, "
                                     "as usage reports them)", ["model"], registry=r)
        self.completion_tokens = Counter("fleetlm_completion_tokens", "Generated tokens (of a "
                                         "cancelled choice: those sent)", ["model"], registry=r)
        self.ttft = Histogram("fleetlm_time_to_first_token_seconds", "From request start to "
                              "the first generated token", ["model"], buckets=_TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("fleetlm_inter_token_latency_seconds", "Between consecutive "
                             "tokens of one choice", ["model"], buckets=_ITL_BUCKETS, registry=r)
        self.waiting = Gauge("fleetlm_queue_depth", "Requests waiting", registry=r)
        self.running = Gauge("fleetlm_running", "Sequences in the batch", registry=r)
        self.hot = Gauge("fleetlm_hot_adapters", "Adapters in the engine's stacked buffers",
                         registry=r)
        self.warm = Gauge("fleetlm_warm_adapters", "Adapters loaded in the store's RAM tier",
                          registry=r)
        # the router (fleetlm serve --config)
        self.route_requests = Counter("fleetlm_route_requests", "Routed requests by route and "
                                      "decision (small, large, fallback, blocked)",
                                      ["route", "decision"], registry=r)
        self.router_overhead = Histogram("fleetlm_router_overhead_seconds", "The router's own "
                                         "time per request: scoring, PII redaction and "
                                         "restoring (no model or upstream time)", ["route"],
                                         buckets=_OVERHEAD_BUCKETS, registry=r)
        self.upstream_failures = Counter("fleetlm_upstream_failures", "Large upstreams that "
                                         "failed a routed request (after their retries)",
                                         ["route", "upstream"], registry=r)
        self.generated = Gauge("fleetlm_generated_tokens", "Tokens generated since start",
                               registry=r)
        # speculative decoding (--speculative-tokens): accepted / proposed is the draft hit rate
        self.drafted = Gauge("fleetlm_draft_tokens_proposed", "Draft tokens checked by the "
                             "model since start (speculative decoding)", registry=r)
        self.draft_accepted = Gauge("fleetlm_draft_tokens_accepted", "Draft tokens the model "
                                    "agreed with since start (speculative decoding)", registry=r)
        self._unknown_models: set[str] = set()
        self._unknown_lock = threading.Lock()

    def model_label(self, model: str, *, served: bool) -> str:
        """The ``model`` label of a request for ``model`` (``served``: a model this server
        answers). At most MAX_UNKNOWN_MODEL_LABELS other names ever get their own label."""
        if served:
            return model
        with self._unknown_lock:
            if model in self._unknown_models:
                return model
            if len(self._unknown_models) < MAX_UNKNOWN_MODEL_LABELS \
                    and _PLAIN_NAME.fullmatch(model):
                self._unknown_models.add(model)
                return model
        return OTHER_MODEL

    def request(self, model: str, prompt_tokens: int) -> RequestMetrics:
        """Start timing one request (call before submitting it to the engine)."""
        return RequestMetrics(self, model, prompt_tokens)

    def render(self, engine: Engine) -> bytes:
        s = engine.stats()
        self.waiting.set(s["waiting"])
        self.running.set(s["running"])
        self.hot.set(len(s["hot_adapters"]))
        self.warm.set(len(engine.store.warm_names()) if engine.store is not None else 0)
        self.generated.set(s["generated_tokens"])
        self.drafted.set(s["draft_tokens_proposed"])
        self.draft_accepted.set(s["draft_tokens_accepted"])
        return bytes(generate_latest(self.registry))


class RequestMetrics:
    """One request's n choice streams; the request is counted once, when the last ends."""

    def __init__(self, metrics: ServerMetrics, model: str, prompt_tokens: int) -> None:
        self.m, self.model, self.prompt_tokens = metrics, model, prompt_tokens
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.open = 0
        self.status = "stop"

    def wrap(self, stream: AsyncIterator[EngineEvent]) -> AsyncIterator[EngineEvent]:
        """``stream``, observed: token timings as events pass, the outcome when it ends or
        its consumer goes away (a closed or cancelled stream counts as ``cancelled``)."""
        self.open += 1
        return self._observe(stream)

    async def _observe(self, stream: AsyncIterator[EngineEvent]) -> AsyncIterator[EngineEvent]:
        status, last, seen, tokens = "cancelled", None, 0, None
        try:
            async for ev in stream:
                if ev.token_id is not None:
                    now = time.perf_counter()
                    if self.first_token is None:
                        self.first_token = now
                        self.m.ttft.labels(model=self.model).observe(now - self.start)
                    if last is not None:
                        self.m.itl.labels(model=self.model).observe(now - last)
                    last = now
                    seen += 1
                if ev.finish_reason:
                    status = ev.finish_reason if ev.finish_reason in _STATUSES else "error"
                    tokens = ev.completion_tokens  # the engine's count, as usage reports it
                yield ev
        finally:
            self.m.completion_tokens.labels(model=self.model).inc(seen if tokens is None else tokens)
            self._end(status)

    def _end(self, status: str) -> None:
        if _STATUSES.index(status) < _STATUSES.index(self.status):
            self.status = status
        self.open -= 1
        if self.open == 0:
            self.m.requests.labels(model=self.model, status=self.status).inc()
            self.m.prompt_tokens.labels(model=self.model).inc(self.prompt_tokens)
