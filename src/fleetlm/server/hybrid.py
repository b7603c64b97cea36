"""The hybrid router over HTTP: routes behind ``fleetlm serve --config FILE``.

A chat request whose ``model`` names a route goes through :meth:`Router.chat`:

1. the route's policy scores it. Policies that decide before generating (classifier,
   rules, random, always-*) score the prompt; ``confidence`` runs the small model first
   (with log-probabilities) and scores its answer: the probability of the chosen label when
   the answer is constrained to labels (the route's ``labels`` or the client's own
   ``{"type": "choice"}``), else the answer's token probabilities. A streaming request is
   held back only for what the policy reads: ``buffer_tokens`` tokens, or the whole answer
   when it scores a label or sets no buffer;
2. ``decide(score, threshold)``: small answers locally; large goes up the route's chain of
   upstreams. What goes up is built from the validated request, never the raw body
   (:mod:`~fleetlm.server.upstream_body`). Before anything leaves, with ``pii: redact``
   every free-text field of it (:mod:`~fleetlm.server.pii_fields`: messages, names, tool-call
   arguments, ``user``, ``metadata``, tool descriptions...) has its personal data replaced by
   ``<TYPE_N>`` placeholders (one mapping per request, held only in this request's memory)
   and the answer, streamed or not, gets the values back, tool calls included; with ``pii:
   block`` a request with personal data is refused. Parts that cannot be scanned (images,
   audio, files) are refused or dropped (``non_text_parts``). Detection failing or too much
   text to scan never lets a text out: ``block`` answers 503, ``redact`` answers with the
   small model, flagged;
3. when every upstream fails (down, timing out, 5xx after retries, or skipped because its
   circuit breaker is open), the small model's answer is sent, flagged as a fallback (or an
   error with ``on_large_failure: error``): never a hang;
4. every request is one ledger row: route, policy, score, decision, model, tokens, latency,
   cost, and the PII entity types and counts (never values).

The response says who answered: the ``model`` field (the small model's name, or the
upstream's) and the ``x-fleetlm-route`` header (``route=..; policy=..; score=..;
decision=..; model=..; overhead_ms=..``). A fallback also carries ``x-fleetlm-fallback``.
Non-streaming bodies repeat it under ``"fleetlm"``.

Before anything is generated, a route that can escalate refuses (400) a ``max_tokens`` or
``max_completion_tokens`` above the smallest ``max_tokens`` cap of its upstreams, and what
goes upstream carries the validated numbers (``max_tokens``, ``n``), not the client's raw
JSON values. Each upstream's circuit state is a gauge in ``/metrics``, read at scrape time.

This module knows routes, upstreams and HTTP; generating is the local path's
(:class:`~fleetlm.server.local.LocalModel`), and the task of a ``task: adapter`` route is read
from the adapter's task card (:mod:`fleetlm.adapters.task_card`): it knows nothing of tuning.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetlm.adapters.task_card import Row, Task, read_task_card, task_messages
from fleetlm.engine.engine import EngineEvent
from fleetlm.router.config import RouteConfig, RoutesConfig, UpstreamConfig
from fleetlm.router.ledger import Ledger, LedgerEntry, local_cost, upstream_cost
from fleetlm.router.policies import (
    AlwaysLarge,
    AlwaysSmall,
    ClassifierPolicy,
    ConfidencePolicy,
    Policy,
    RandomPolicy,
    RouteContext,
    Rule,
    RulesPolicy,
    decide,
)
from fleetlm.router.upstream import (
    CircuitOpen,
    StreamInterrupted,
    UpstreamClient,
    UpstreamResponse,
    UpstreamStream,
    UpstreamUnavailable,
)
from fleetlm.server.auth import Gateway, caller_of
from fleetlm.server.errors import (
    INVALID_REQUEST,
    APIError,
    api_error,
    error_body,
    generation_failed,
)
from fleetlm.server.limits import Budgets, budget_error
from fleetlm.server.local import (
    CLIENT_CLOSED,
    DEFAULT_MAX_TOKENS,
    ClientGone,
    LocalModel,
    adapter_of,
)
from fleetlm.server.pii_fields import (
    AnswerRestorer,
    PiiInputTooLarge,
    redact_body,
    restore_answer,
)
from fleetlm.server.protocol import ChatCompletionRequest, ChatMessage, sse
from fleetlm.server.upstream_body import upstream_body

if TYPE_CHECKING:
    from fleetlm.privacy.mapping import PiiMapping
    from fleetlm.privacy.pii import PiiRedactor
    from fleetlm.server.metrics import ServerMetrics
    from fleetlm.state.tenants import TenantPolicy

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-fleetlm-route"
FALLBACK_HEADER = "x-fleetlm-fallback"
_NOT_REASONS = ("fallback", "non_text_dropped")  # flags the fallback header does not list


def build_policy(cfg: RouteConfig) -> Policy:
    """The policy object a route's config describes (a classifier file is loaded now)."""
    if cfg.policy == "confidence":
        return ConfidencePolicy(cfg.aggregate, cfg.buffer_tokens)
    if cfg.policy == "classifier":
        from fleetlm.router.classifier import TrainedRouter

        assert cfg.classifier is not None  # the config requires it
        folder = cfg.classifier if cfg.classifier.is_dir() else cfg.classifier.parent
        return ClassifierPolicy(TrainedRouter.load(folder))
    if cfg.policy == "rules":
        return RulesPolicy([Rule(route=r.route, regex=r.regex, keywords=tuple(r.keywords),
                                 min_chars=r.min_chars, max_chars=r.max_chars)
                            for r in cfg.rules or ()], cfg.rules_default)
    if cfg.policy == "random":
        return RandomPolicy(cfg.seed)
    return AlwaysSmall() if cfg.policy == "always-small" else AlwaysLarge()


@dataclass
class Route:
    name: str
    cfg: RouteConfig
    policy: Policy
    redactor: PiiRedactor | None  # None: pii off
    baseline: UpstreamConfig | None  # the first large upstream: the all-large baseline's prices
    task: tuple[Task, list[str]] | None = None  # task: adapter -- the task and its labels


@dataclass
class _Request:
    """What one routed request has gathered so far; becomes its ledger row."""

    route: Route
    request_id: str
    tenant: str  # from the caller's key ("" on an open server), never from a header
    client: Request | None = None  # the HTTP request: a non-streaming answer watches it
    started: float = field(default_factory=time.perf_counter)
    overhead_s: float = 0.0  # the router's own time: scoring, PII, restoring (no model time)
    local_s: float = 0.0  # time the small model worked on this request
    score: float | None = None
    decision: str = "small"
    model: str = ""
    upstream: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    upstream_cost: float = 0.0
    pii: dict[str, int] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    recorded: bool = False  # its ledger row is written
    upstream_messages: list[dict[str, Any]] | None = None  # task: adapter -- what goes upstream
    policy: TenantPolicy | None = None  # the caller's tenant's limits (None: none)

    def header(self) -> str:
        score = "none" if self.score is None else f"{self.score:.4f}"
        return (f"route={self.route.name}; policy={self.route.cfg.policy}; score={score}; "
                f"decision={self.decision}; model={self.model}; "
                f"overhead_ms={1000 * self.overhead_s:.2f}")

    def headers(self) -> dict[str, str]:
        h = {ROUTE_HEADER: self.header()}
        if self.decision == "fallback":
            h[FALLBACK_HEADER] = ",".join(f for f in self.flags if f not in _NOT_REASONS) \
                or "fallback"
        return h

    def info(self) -> dict[str, Any]:
        return {"route": self.route.name, "policy": self.route.cfg.policy, "score": self.score,
                "decision": self.decision, "model": self.model, "flags": list(self.flags)}


class Router:
    """The routes of one server: policies, PII redactors, the upstream client, the ledger."""

    def __init__(self, config: RoutesConfig, routes: dict[str, Route], upstreams: UpstreamClient,
                 ledger: Ledger) -> None:
        self.config, self.routes, self.upstreams, self.ledger = config, routes, upstreams, ledger
        self.metrics: ServerMetrics | None = None
        self.skipped: Counter | None = None  # upstreams skipped (open circuit), once attached
        self.gateway: Gateway | None = None  # tenants' rates and budgets, once attached

    @classmethod
    def build(cls, config: RoutesConfig, *, served: Iterable[str],
              check_small: Callable[[str], None], upstreams: UpstreamClient | None = None,
              ledger: Ledger | None = None,
              task_card: Callable[[str], tuple[Task, list[str]]] | None = None) -> Router:
        """Check the routes against what the server serves and load what they need (classifier
        files, the PII analyzer) now, so a bad config fails at start-up, not on a request.
        ``check_small(model)`` raises when the server cannot answer ``model``;
        ``task_card(model)`` reads the tuned task of a ``task: adapter`` route's small model."""
        from fleetlm.errors import ConfigError

        config.check_model_names(served)
        routes: dict[str, Route] = {}
        problems: list[str] = []
        for name, cfg in config.routes.items():
            try:
                check_small(cfg.small)
            except Exception as e:  # noqa: BLE001 -- reported with the route's field
                problems.append(f"routes.{name}.small: {e}")
                continue
            task = None
            if cfg.task == "adapter":
                try:
                    if task_card is None:
                        raise ConfigError("this server has no adapter store")
                    task = task_card(cfg.small)
                except Exception as e:  # noqa: BLE001 -- reported with the route's field
                    problems.append(f"routes.{name}.task: {e}")
                    continue
            redactor = None
            pii = cfg.pii_config()
            if pii is not None:
                from fleetlm.privacy.pii import PiiRedactor

                redactor = PiiRedactor(pii).load()  # spaCy + presidio, once per process
            routes[name] = Route(name, cfg, build_policy(cfg), redactor, config.first_large(name),
                                 task)
        if problems:
            raise ConfigError("the routes config does not match this server:\n  "
                              + "\n  ".join(problems))
        return cls(config, routes, upstreams or UpstreamClient(config.upstreams),
                   ledger or Ledger(config.ledger_path))

    @classmethod
    def for_server(cls, config: RoutesConfig, model_name: str, store: Any,
                   ledger: Ledger | None = None) -> Router:
        """The router of a server running ``model_name`` with the adapter ``store``, writing
        to ``ledger`` (None: the routes config's ledger_path, else the state store's)."""
        from fleetlm.errors import ConfigError

        def check_small(model: str) -> None:
            adapter = adapter_of(model, model_name, store)
            if adapter is not None:
                store.validate(adapter)  # AdapterNotFound / AdapterError: reported at start-up

        def task_card(model: str) -> tuple[Task, list[str]]:
            adapter = adapter_of(model, model_name, store)
            if adapter is None:
                raise ConfigError(f"task: adapter needs an adapter as small model, not the "
                                  f"base {model!r}")
            return read_task_card(store.resolve(adapter))

        served = [model_name] + ([a.name for a in store.list()] if store is not None else [])
        return cls.build(config, served=served, check_small=check_small, task_card=task_card,
                         ledger=ledger)

    def attach(self, metrics: ServerMetrics, gateway: Gateway | None = None) -> None:
        """Count into ``metrics``, and add the upstreams' circuit gauges to its registry;
        count tenants' tokens into ``gateway``'s limiter and check their budgets against
        this router's ledger."""
        self.metrics, self.gateway = metrics, gateway
        if gateway is not None:
            gateway.budgets = Budgets(self.ledger.spend)
        self.skipped = Counter("fleetlm_upstream_skipped", "Large upstreams skipped without a "
                               "request because their circuit breaker was open",
                               ["route", "upstream"], registry=metrics.registry)
        metrics.registry.register(_CircuitCollector(self.upstreams))

    def models(self, now: int) -> list[dict[str, Any]]:
        """The routes as /v1/models entries."""
        return [{"id": r.name, "object": "model", "created": now, "owned_by": "fleetlm-router",
                 "root": r.cfg.small, "route": {"small": r.cfg.small, "large": list(r.cfg.large),
                                                "policy": r.cfg.policy, "pii": r.cfg.pii}}
                for r in self.routes.values()]

    async def aclose(self) -> None:
        await self.upstreams.aclose()

    # -- one request -------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request, local: LocalModel) -> Any:
        route = self.routes[req.model]
        caller = caller_of(request)
        rr = _Request(route, request_id=f"route-{uuid.uuid4().hex[:16]}", tenant=caller.tenant,
                      client=request, policy=caller.policy)
        small_req = req.model_copy(update={"model": route.cfg.small})
        cap = caller.policy.max_tokens if caller.policy is not None else None
        if cap is not None and req.max_tokens is None and req.max_completion_tokens is None:
            small_req.max_tokens = min(cap, DEFAULT_MAX_TOKENS)  # the tenant's cap
        if route.cfg.labels and req.response_format is None:
            small_req = small_req.model_copy(update={"response_format": {
                "type": "choice", "choices": list(route.cfg.labels)}})
        prompt: str | None = None
        self._check_upstream_limits(route, req)
        if route.task is not None:
            small_req, prompt = self._task_request(rr, req, small_req)
        request.state.tracked = True  # the local path and the ledger count it from here
        try:
            if route.policy.needs_answer:
                return await self._confidence(rr, req, small_req, request, local)
            t = time.perf_counter()
            ctx = RouteContext(prompt=prompt) if prompt is not None else \
                RouteContext.from_messages([m.model_dump() for m in req.messages])
            if _slow(route.policy):  # a transformer forward: off the event loop
                rr.score = await asyncio.to_thread(route.policy.score, ctx)
            else:
                rr.score = route.policy.score(ctx)
            decision = decide(rr.score, route.cfg.threshold_value)
            rr.overhead_s += time.perf_counter() - t
            if decision == "small":
                return await self._small(rr, small_req, local, None)
            return await self._escalate(rr, req, small_req, request, local, None)
        except Exception as e:
            self._record(rr, error=api_error(e))  # refused or failed: still one ledger row
            raise
        except asyncio.CancelledError:  # the client went away before the answer
            rr.flags.append("cancelled")
            self._record(rr)
            raise

    def _check_upstream_limits(self, route: Route, req: ChatCompletionRequest) -> None:
        """Refuse (400) a token limit the route's upstreams would not be sent: below 1, or
        above the smallest ``max_tokens`` cap of the chain (the request must fit whichever
        upstream answers). A request that sets none is sent without (the upstream's default)."""
        if not route.cfg.large:
            return  # never escalates
        caps = [(c, n) for n in route.cfg.large
                if (c := self.upstreams.upstreams[n].max_tokens) is not None]
        cap, name = min(caps) if caps else (None, "")
        for field_name in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, field_name)
            if value is not None and value < 1:
                raise APIError(400, f"{field_name}={value}: must be >= 1", INVALID_REQUEST,
                               field_name)
            if value is not None and cap is not None and value > cap:
                raise APIError(400, f"{field_name}={value}: route {route.name!r} may escalate "
                                    f"to upstream {name!r}, which allows at most {cap} "
                                    f"(upstreams.{name}.max_tokens in the routes config); send "
                                    f"{field_name} <= {cap}", INVALID_REQUEST, field_name)

    def _default_max_tokens(self, route: Route, policy: TenantPolicy | None) -> int | None:
        """What goes upstream as ``max_tokens`` for a request that sets none: the smallest
        of the tenant's cap and the chain's upstream caps (None: no cap anywhere)."""
        caps = [self.upstreams.upstreams[n].max_tokens for n in route.cfg.large]
        caps.append(policy.max_tokens if policy is not None else None)
        known = [c for c in caps if c is not None]
        return min(known) if known else None

    @staticmethod
    def _task_request(rr: _Request, req: ChatCompletionRequest,
                      small_req: ChatCompletionRequest) -> tuple[ChatCompletionRequest, str]:
        """``task: adapter``: the small model's request as in tuning (system prompt, the text,
        the labels as a constraint), the large model's messages (the labels listed), and the
        text the policies score."""
        assert rr.route.task is not None
        task, labels = rr.route.task
        text = next((m.text() for m in reversed(req.messages) if m.role == "user"), "")
        if not text.strip():
            raise APIError(400, f"messages: route {rr.route.name!r} classifies the last user "
                                "message's text; send one", INVALID_REQUEST, "messages")
        ex = Row(text=text)
        rr.upstream_messages = task_messages(ex, task, labels=labels)
        small = small_req.model_copy(update={
            "messages": [ChatMessage(**m) for m in task_messages(ex, task)],
            "response_format": {"type": "choice", "choices": labels}})
        return small, text

    async def _confidence(self, rr: _Request, req: ChatCompletionRequest,
                          small_req: ChatCompletionRequest, request: Request,
                          local: LocalModel) -> Any:
        route = rr.route
        if req.n > 1:
            raise APIError(400, f"n={req.n}: route {route.name!r} scores one answer of the "
                                "small model (policy confidence); send n=1", INVALID_REQUEST,
                           "n")
        labelled = (small_req.response_format or {}).get("type") == "choice"
        probe = small_req.model_copy(update={"logprobs": True,
                                             "top_logprobs": req.top_logprobs if req.logprobs else 0})
        t = time.perf_counter()
        ids, (stream,) = await local.open_chat(probe)
        need = None if (labelled or not req.stream) else route.cfg.buffer_tokens
        held: list[EngineEvent] = []
        tokens = 0
        async for ev in stream:
            held.append(ev)
            tokens += ev.token_id is not None
            if ev.finish_reason is not None or (need is not None and tokens >= need):
                break
        rr.local_s += time.perf_counter() - t
        last = held[-1] if held else None
        if last is not None and last.finish_reason == "error":
            raise generation_failed(last.error)
        done = last is not None and last.finish_reason is not None
        t = time.perf_counter()
        if labelled and done:
            lps = [ev.constrained_logprob for ev in held if ev.constrained_logprob is not None]
            ctx = RouteContext(prompt="", label_prob=math.exp(sum(lps)) if lps else 0.0)
        else:
            ctx = RouteContext(prompt="", token_logprobs=[ev.logprob for ev in held
                                                          if ev.logprob is not None])
        rr.score = route.policy.score(ctx)
        decision = decide(rr.score, route.cfg.threshold_value)
        rr.overhead_s += time.perf_counter() - t
        if decision == "small":
            return await self._small(rr, small_req, local, (ids, held, None if done else stream))
        if not done:
            await stream.aclose()  # type: ignore[attr-defined]  # cancels the small request
        answer = (ids, held, None) if done else None
        return await self._escalate(rr, req, small_req, request, local, answer)

    # -- the small model ---------------------------------------------------------------

    async def _small(self, rr: _Request, small_req: ChatCompletionRequest, local: LocalModel,
                     answer: tuple[list[int], list[EngineEvent], AsyncIterator[EngineEvent] | None]
                     | None) -> Any:
        """Answer with the small model: the held answer (``(ids, events so far, the rest of
        the stream or None)``) or a new request."""
        rr.model = small_req.model
        if rr.decision != "fallback":
            rr.decision = "small"
        t = time.perf_counter()
        if answer is None:
            ids, streams = await local.open_chat(small_req)
        else:
            ids, held, rest = answer
            streams = [_chain(held, rest)]
        rr.prompt_tokens = len(ids)
        if small_req.stream:
            observed = [_observe(s, rr) for s in streams]

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                try:
                    async for c in local.chat_chunks(small_req, observed):
                        yield c
                finally:
                    rr.local_s += time.perf_counter() - t
                    self._record(rr)
            return sse(chunks(), rr.headers())
        try:
            results = await local.collect_all(streams, rr.client)
        except ClientGone:  # its choices are cancelled; the ledger row says so
            rr.local_s += time.perf_counter() - t
            rr.flags.append("cancelled")
            self._record(rr)
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it
        rr.local_s += time.perf_counter() - t
        body = local.chat_body(small_req, ids, results)
        rr.completion_tokens = body["usage"]["completion_tokens"]
        self._record(rr)
        body["fleetlm"] = rr.info()
        return JSONResponse(body, headers=rr.headers())

    async def _fallback(self, rr: _Request, small_req: ChatCompletionRequest, local: LocalModel,
                        answer: tuple[list[int], list[EngineEvent], None] | None,
                        reason: str) -> Any:
        rr.decision = "fallback"
        rr.upstream = None
        rr.flags += ["fallback", reason]  # the reason also names the x-fleetlm-fallback header
        return await self._small(rr, small_req, local, answer)

    # -- the large model ---------------------------------------------------------------

    async def _escalate(self, rr: _Request, req: ChatCompletionRequest,
                        small_req: ChatCompletionRequest, request: Request, local: LocalModel,
                        answer: tuple[list[int], list[EngineEvent], None] | None) -> Any:
        route = rr.route
        over = None
        if self.gateway is not None and self.gateway.budgets is not None:
            over = await self.gateway.budgets.exceeded(rr.tenant, rr.policy)
        if over is not None:
            assert rr.policy is not None
            reason = f"over_{over}_budget"  # over_daily_budget / over_monthly_budget
            if route.cfg.over_budget == "error":
                rr.decision = "blocked"
                rr.flags.append(reason)
                raise budget_error(rr.tenant, over, rr.policy)
            return await self._fallback(rr, small_req, local, answer, reason)
        rr.decision = "large"
        pii_on = route.redactor is not None
        messages = None if rr.upstream_messages is None else \
            [ChatMessage(**m) for m in rr.upstream_messages]  # task: adapter, labels listed
        body, dropped = upstream_body(req, messages,
                                      non_text=route.cfg.non_text_parts if pii_on else None)
        if dropped:
            rr.flags.append("non_text_dropped")
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            limit = self._default_max_tokens(route, rr.policy)
            if limit is not None:  # never uncapped when a cap exists
                body["max_tokens"] = limit
        mapping: PiiMapping | None = None
        if route.redactor is not None:
            t = time.perf_counter()
            try:
                redacted, hits = await asyncio.to_thread(_redact_body, route.redactor, body)
            except Exception as e:  # noqa: BLE001 -- fail closed: nothing leaves
                rr.overhead_s += time.perf_counter() - t
                reason = "pii_input_too_large" if isinstance(e, PiiInputTooLarge) \
                    else "pii_detection_failed"
                log.error("route %s: personal-data detection failed (%s: %s); nothing escalated",
                          route.name, type(e).__name__, e)
                if route.cfg.pii == "block":
                    rr.decision = "blocked"
                    rr.flags.append(reason)
                    raise APIError(503, f"route {route.name!r}: personal-data detection failed "
                                        f"({reason}), so the request was not sent to the large "
                                        "model (pii: block); retry later, send less text, or "
                                        "contact the operator", "server_error", None,
                                   "pii_detection_failed") from None
                return await self._fallback(rr, small_req, local, answer, reason)
            rr.overhead_s += time.perf_counter() - t
            mapping, rr.pii = redacted, redacted.counts()
            if route.cfg.pii == "block" and rr.pii:
                rr.decision = "blocked"
                found = ", ".join(f"{k} x{v}" for k, v in sorted(rr.pii.items()))
                fields = ", ".join(dict.fromkeys(hits))
                first = hits[0].split(".")[0] if hits else "messages"
                raise APIError(400, f"{first}: route {route.name!r} escalates this request, "
                                    f"and it contains personal data ({found}) in {fields}; "
                                    "with pii: block it is not sent. Remove the personal data, "
                                    "or use a route with pii: redact", INVALID_REQUEST, first,
                               "pii_blocked")
        try:
            result = await self.upstreams.first_available(
                route.cfg.large, body, stream=req.stream,  # type: ignore[call-overload]
                deadline_s=route.cfg.deadline_s)
        except UpstreamUnavailable as e:
            log.warning("route %s: %s", route.name, e)
            self._count_failures(route, e.failures)
            if route.cfg.on_large_failure == "error":
                rr.decision = "blocked"
                rr.flags.append("upstream_unavailable")
                raise APIError(502, f"route {route.name!r}: {e}", "upstream_error", None,
                               "upstream_unavailable") from None
            return await self._fallback(rr, small_req, local, answer, "upstream_unavailable")
        self._count_failures(route, result.failures)
        rr.upstream = result.upstream
        if isinstance(result, UpstreamResponse):
            return self._large_body(rr, result, mapping)
        rr.model = f"{result.upstream}/{self.upstreams.upstreams[result.upstream].model}"
        return sse(self._large_chunks(rr, result, mapping), rr.headers())

    def _large_body(self, rr: _Request, result: UpstreamResponse, mapping: PiiMapping | None
                    ) -> JSONResponse:
        data = result.response
        rr.model = f"{result.upstream}/{data.get('model') or self.upstreams.upstreams[result.upstream].model}"
        if mapping is not None:
            t = time.perf_counter()
            restore_answer(data, mapping)
            rr.overhead_s += time.perf_counter() - t
        self._usage(rr, result)
        self._record(rr)
        data["fleetlm"] = rr.info()
        return JSONResponse(data, headers=rr.headers())

    async def _large_chunks(self, rr: _Request, stream: UpstreamStream,
                            mapping: PiiMapping | None) -> AsyncIterator[dict[str, Any]]:
        restorer = AnswerRestorer(mapping) if mapping is not None else None
        try:
            async for chunk in stream:
                if restorer is not None:
                    t = time.perf_counter()
                    restorer.feed(chunk)
                    rr.overhead_s += time.perf_counter() - t
                yield chunk
            last = restorer.flush() if restorer is not None else None
            if last is not None:  # an unfinished placeholder at the very end: sent as it came
                yield last
        except StreamInterrupted as e:
            log.warning("route %s: %s", rr.route.name, e)
            rr.flags.append("stream_interrupted")
            yield error_body(APIError(502, f"route {rr.route.name!r}: {e}", "upstream_error",
                                       None, "stream_interrupted"))
        finally:
            await stream.aclose()
            self._usage(rr, stream)
            self._record(rr)

    def _usage(self, rr: _Request, result: UpstreamResponse | UpstreamStream) -> None:
        u = result.usage
        rr.prompt_tokens, rr.completion_tokens = u.prompt_tokens, u.completion_tokens
        if u.estimated:
            rr.flags.append("usage_estimated")
        assert rr.upstream is not None
        rr.upstream_cost = upstream_cost(self.upstreams.upstreams[rr.upstream],
                                         u.prompt_tokens, u.completion_tokens)

    def _count_failures(self, route: Route, failures: Iterable[Any]) -> None:
        if self.metrics is not None:
            for f in failures:
                if isinstance(f, CircuitOpen) and self.skipped is not None:  # no request sent
                    self.skipped.labels(route=route.name, upstream=f.upstream).inc()
                else:
                    self.metrics.upstream_failures.labels(route=route.name,
                                                          upstream=f.upstream).inc()

    # -- the ledger --------------------------------------------------------------------

    def _record(self, rr: _Request, error: APIError | None = None) -> None:
        """One ledger row (and the route metrics) for a finished request."""
        if rr.recorded:
            return
        rr.recorded = True
        decision = rr.decision if rr.decision in ("small", "large", "fallback") else "blocked"
        if error is not None and decision != "blocked":
            decision = "blocked"
            rr.flags.append(f"error_{error.status}")
        latency_ms = 1000 * (time.perf_counter() - rr.started)
        cost = local_cost(self.config.local_cost_per_hour, 1000 * rr.local_s) + rr.upstream_cost
        baseline = None
        if rr.route.baseline is not None:
            baseline = upstream_cost(rr.route.baseline, rr.prompt_tokens, rr.completion_tokens)
        entry = LedgerEntry(route=rr.route.name, decision=decision,  # type: ignore[arg-type]
                            model=rr.model, request_id=rr.request_id, tenant=rr.tenant,
                            policy=rr.route.cfg.policy, score=rr.score, upstream=rr.upstream,
                            prompt_tokens=rr.prompt_tokens,
                            completion_tokens=rr.completion_tokens, latency_ms=latency_ms,
                            cost_usd=cost, baseline_cost_usd=baseline, pii=dict(rr.pii),
                            flags=list(dict.fromkeys(rr.flags)))
        try:
            self.ledger.record(entry)
        except Exception as e:  # noqa: BLE001 -- the answer must not fail for the ledger
            log.error("route %s: ledger row not recorded: %s", rr.route.name, e)
        if self.gateway is not None and rr.policy is not None:
            self.gateway.limiter.add_tokens(rr.tenant, rr.prompt_tokens + rr.completion_tokens)
            if self.gateway.budgets is not None and rr.upstream_cost:
                self.gateway.budgets.add(rr.tenant, rr.upstream_cost)
        if self.metrics is not None:
            self.metrics.route_requests.labels(route=rr.route.name, decision=decision).inc()
            self.metrics.router_overhead.labels(route=rr.route.name).observe(rr.overhead_s)


# ------------------------------------------------------------------------------ helpers

_CIRCUIT_VALUE = {"closed": 0.0, "half-open": 1.0, "open": 2.0}


class _CircuitCollector(Collector):
    """Each upstream's circuit breaker as gauges, read when /metrics is scraped."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("fleetlm_upstream_circuit_state", "Each large upstream's "
                                  "circuit breaker: 0 closed, 1 half-open (a probe may go), "
                                  "2 open (skipped)", labels=["upstream"])
        failures = GaugeMetricFamily("fleetlm_upstream_consecutive_failures", "Failed calls "
                                     "to each large upstream since its last success",
                                     labels=["upstream"])
        for name, breaker in self.client.breakers.items():
            state.add_metric([name], _CIRCUIT_VALUE[breaker.state])
            failures.add_metric([name], breaker.consecutive)
        yield state
        yield failures


def _slow(policy: Policy) -> bool:
    """A classifier on the full MiniLM (~20 ms a prompt on a CPU); its static-embedding
    variant and every other policy take well under a millisecond."""
    if not isinstance(policy, ClassifierPolicy):
        return False
    # the policy sees a PromptScorer; a TrainedRouter also names its embedding model
    return not str(getattr(policy.router, "embedding_model", "")).endswith(":static")


def _redact_body(redactor: PiiRedactor, body: dict[str, Any]) -> tuple[PiiMapping, list[str]]:
    """Every free-text field of ``body`` redacted in place under one new mapping (runs in a
    thread); the mapping and the paths of the fields that held personal data. The fields
    are detected in one batch (one model forward for the whole request): a first walk
    collects them, a second writes the redacted texts back in the same order."""
    from fleetlm.privacy.mapping import PiiMapping

    texts: list[str] = []

    def collect(text: str) -> str:
        texts.append(text)
        return text

    redact_body(body, collect)  # collects the fields (and checks the size cap) unchanged
    mapping = PiiMapping()
    redacted = iter(redactor.redact_many(texts, mapping))
    hits = redact_body(body, lambda text: next(redacted))
    return mapping, hits


async def _chain(held: list[EngineEvent], rest: AsyncIterator[EngineEvent] | None
                 ) -> AsyncIterator[EngineEvent]:
    """The events already read, then the rest of the stream (closing it closes the rest)."""
    try:
        for ev in held:
            yield ev
        if rest is not None:
            async for ev in rest:
                yield ev
    finally:
        if rest is not None:
            await rest.aclose()  # type: ignore[attr-defined]


async def _observe(stream: AsyncIterator[EngineEvent], rr: _Request) -> AsyncIterator[EngineEvent]:
    """``stream``, adding its completion tokens to the request's count as it ends."""
    async for ev in stream:
        if ev.finish_reason is not None:
            rr.completion_tokens += ev.completion_tokens
        yield ev


