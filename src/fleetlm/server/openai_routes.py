"""The OpenAI-compatible endpoints, as thin handlers.

    GET  /health                 status, the model's name and the engine's counters
    GET  /v1/models              the base model, each adapter in the store, each route
    GET  /metrics                Prometheus text
    POST /v1/chat/completions    a route's name goes to the hybrid router, any other model
                                 to the local path
    POST /v1/completions         the local path only (routes answer chat)

Each handler names the request's model for the refusal metric (a bounded label: a model
this server serves keeps its name, see :meth:`~fleetlm.server.metrics.ServerMetrics.
model_label`), hands the request on, and marks it tracked once the local path has submitted
it (from then on the request metric counts it). A non-streaming answer is collected while
the client is watched: if it disconnects, its choices are cancelled and the engine frees
their rows at its next step (a stream is cancelled by the server when a write fails). Prompts, sampling and response bodies are :class:`~fleetlm.server.local.
LocalModel`'s; routing is :class:`~fleetlm.server.hybrid.Router`'s; this module knows only
which of them answers.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from fleetlm.engine.engine import Engine, EngineEvent
from fleetlm.server.auth import Caller, Gateway, caller_of
from fleetlm.server.errors import INVALID_REQUEST, APIError
from fleetlm.server.limits import check_caps, check_target
from fleetlm.server.local import CLIENT_CLOSED, DEFAULT_MAX_TOKENS, ClientGone, LocalModel
from fleetlm.server.metrics import ServerMetrics
from fleetlm.server.protocol import ChatCompletionRequest, CompletionRequest, sse

if TYPE_CHECKING:
    from fleetlm.server.hybrid import Router

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


class OpenAIRoutes:
    """The handlers of one app: ``router()`` registers them."""

    def __init__(self, engine: Engine, model_name: str, local: LocalModel,
                 metrics: ServerMetrics, routes: Router | None = None,
                 gateway: Gateway | None = None) -> None:
        self.engine, self.model_name, self.local = engine, model_name, local
        self.metrics, self.routes = metrics, routes
        self.gateway = gateway or Gateway(None)

    def router(self) -> APIRouter:
        """Every endpoint: /health open, /metrics for admins, the rest for any key."""
        r, g = APIRouter(), self.gateway
        user, admin = [Depends(g.authenticate)], [Depends(g.admin)]
        r.add_api_route("/health", self.health, methods=["GET"])
        r.add_api_route("/v1/models", self.models, methods=["GET"], dependencies=user)
        r.add_api_route("/metrics", self.prometheus, methods=["GET"], dependencies=admin)
        r.add_api_route("/v1/chat/completions", self.chat, methods=["POST"], response_model=None,
                        dependencies=user)
        r.add_api_route("/v1/completions", self.completions, methods=["POST"],
                        response_model=None, dependencies=user)
        return r

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, **self.engine.stats()}

    async def models(self, request: Request) -> dict[str, Any]:
        """What this server answers, less what the caller's tenant may not call."""
        now, name, store = int(time.time()), self.model_name, self.engine.store
        policy = caller_of(request).policy
        data = []
        if policy is None or policy.allows_model(name):
            data.append({"id": name, "object": "model", "created": now, "owned_by": "fleetlm"})
            if store is not None:
                data += [{"id": a.name, "object": "model", "created": now,
                          "owned_by": "fleetlm", "parent": name, "root": f"{name}:{a.name}"}
                         for a in store.list() if policy is None or policy.allows_adapter(a.name)]
        if self.routes is not None:
            data += [m for m in self.routes.models(now)
                     if policy is None or policy.allows_route(m["id"])]
        return {"object": "list", "data": data}

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(self.engine), media_type="text/plain; version=0.0.4")

    def served(self, model: str) -> bool:
        """Whether ``model`` names what this server answers: its model, a route, or an
        adapter in the store (alone or as ``base:adapter``). A stat of the folder, no read."""
        if model == self.model_name or (self.routes is not None and model in self.routes.routes):
            return True
        base, sep, adapter = model.partition(":")  # as local.adapter_of reads it
        if not sep:
            adapter = model
        elif base != self.model_name:
            return False
        store = self.engine.store
        return store is not None and store.exists(adapter)

    def label(self, model: str) -> str:
        """The refusal metric's (bounded) label for ``model``."""
        return self.metrics.model_label(model, served=self.served(model))

    def admit(self, req: ChatCompletionRequest | CompletionRequest, request: Request,
              route: bool, default_max_tokens: int) -> Caller:
        """The caller's tenant may call this model with these caps, and is within its rate
        (else 403 / 400 / 429). A local request that sets no token limit gets the smaller of
        the default and the tenant's cap (a route applies the cap itself, see hybrid.py)."""
        caller = caller_of(request)
        policy = caller.policy
        if policy is None:
            return caller
        if route:
            check_target(policy, route=req.model, model=None, adapter=None)
        else:
            check_target(policy, route=None, model=self.model_name,
                         adapter=self.local.adapter(req.model))
        asked = getattr(req, "max_completion_tokens", None)
        field = "max_completion_tokens" if asked is not None else "max_tokens"
        asked = asked if asked is not None else req.max_tokens
        check_caps(policy, max_tokens=asked, n=req.n, field=field)
        if asked is None and policy.max_tokens is not None and not route:
            req.max_tokens = min(policy.max_tokens, default_max_tokens)
        self.gateway.limiter.admit(caller.tenant, policy)
        return caller

    def metered(self, caller: Caller, prompt_tokens: int, streams: list[AsyncIterator[EngineEvent]]
                ) -> list[AsyncIterator[EngineEvent]]:
        """``streams``, counting their tokens into the tenant's tokens per minute."""
        if caller.policy is None or caller.policy.tpm is None:
            return streams
        limiter = self.gateway.limiter
        limiter.add_tokens(caller.tenant, prompt_tokens)
        return [_counted(s, lambda n: limiter.add_tokens(caller.tenant, n)) for s in streams]

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Any:
        request.state.model = req.model  # labelled (bounded) only if it is refused
        is_route = self.routes is not None and req.model in self.routes.routes
        caller = self.admit(req, request, is_route, DEFAULT_MAX_TOKENS)
        if self.routes is not None and is_route:
            return await self.routes.chat(req, request, self.local)
        ids, streams = await self.local.open_chat(req)
        streams = self.metered(caller, len(ids), streams)
        request.state.tracked = True  # from here on, the request metric counts it
        if req.stream:
            return sse(self.local.chat_chunks(req, streams))
        try:
            results = await self.local.collect_all(streams, request)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it
        return self.local.chat_body(req, ids, results)

    async def completions(self, req: CompletionRequest, request: Request) -> Any:
        request.state.model = req.model  # labelled (bounded) only if it is refused
        if self.routes is not None and req.model in self.routes.routes:
            raise APIError(400, f"model {req.model!r} is a route; routes answer "
                                "/v1/chat/completions only", INVALID_REQUEST, "model",
                           "route_chat_only")
        caller = self.admit(req, request, False, 16)
        ids, echo, streams = await self.local.open_completion(req)
        streams = self.metered(caller, len(ids), streams)
        request.state.tracked = True  # from here on, the request metric counts it
        if req.stream:
            return sse(self.local.completion_chunks(req, ids, echo, streams))
        try:
            results = await self.local.collect_all(streams, request)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it
        return self.local.completion_body(req, ids, echo, results)



async def _counted(stream: AsyncIterator[EngineEvent], add: Any) -> AsyncIterator[EngineEvent]:
    """``stream``, calling ``add(completion tokens)`` when it ends; closing it closes
    ``stream`` (which cancels its engine request)."""
    try:
        async for ev in stream:
            if ev.finish_reason is not None:
                add(ev.completion_tokens)
            yield ev
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
