"""The OpenAI-compatible HTTP API over one :class:`~fleetlm.engine.engine.Engine`.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /metrics``. ``model`` is the base model's name, an
adapter in the store, ``base:adapter``, or a route of ``--config`` (chat only; answered by
:mod:`fleetlm.server.routing`). Errors are OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``): unknown model 404, bad parameter
400 naming the field, adapter that fails validation 422, queue full 429 with
``Retry-After``; never a traceback. A client that disconnects mid-stream cancels its
request (the engine frees its cache row at the next step).

This module knows HTTP and OpenAI shapes; tokens, batching and adapters are the engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fleetlm.adapters.errors import AdapterError, AdapterNotFound
from fleetlm.engine.engine import Engine, EngineEvent
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.errors import ConfigError, EngineBusy, FleetLMError
from fleetlm.server.metrics import ServerMetrics
from fleetlm.server.schemas import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from fleetlm.server.routing import Router

DEFAULT_MAX_TOKENS = 256
_GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def _error_body(e: APIError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def _param_of(message: str) -> str | None:
    # our ConfigErrors start with the field name: "temperature=-1: must be ..." / "prompt: ..."
    body = message.split(": ", 1)[-1] if message.startswith("invalid ") else message
    head = body.split(":", 1)[0].split("=", 1)[0].strip()
    return head if head.isidentifier() else None


def _api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineBusy):
        return APIError(429, str(e), "rate_limit_exceeded", code="engine_busy",
                        headers={"Retry-After": str(max(1, round(e.retry_after_s)))})
    if isinstance(e, AdapterNotFound):
        return APIError(404, str(e), "invalid_request_error", "model", "model_not_found")
    if isinstance(e, AdapterError):
        return APIError(422, str(e), "invalid_request_error", "model", "invalid_adapter")
    if isinstance(e, ConfigError):
        return APIError(400, str(e), "invalid_request_error", _param_of(str(e)))
    if isinstance(e, FleetLMError):
        return APIError(500, str(e), "server_error")
    return APIError(500, f"internal error: {type(e).__name__}", "server_error")


def resolve_model(model: str, model_name: str, store: Any) -> str | None:
    """The adapter a ``model`` field names on a server running ``model_name`` with ``store``
    (None: the base model). Unknown: 404; an adapter failing validation: AdapterError."""
    if model == model_name:
        return None
    adapter = model
    if ":" in model:
        base, adapter = model.split(":", 1)
        if base != model_name:
            raise APIError(404, f"model {model!r}: unknown base {base!r} (this server runs "
                                f"{model_name!r})", "invalid_request_error", "model",
                           "model_not_found")
    if store is None:
        raise APIError(404, f"model {model!r} does not exist; this server serves "
                            f"{model_name!r} and no adapters", "invalid_request_error",
                       "model", "model_not_found")
    store.validate(adapter)  # AdapterNotFound -> 404, AdapterError -> 422
    return str(adapter)


@dataclass(frozen=True)
class LocalChat:
    """The local chat path, as the router calls it: ``open(req)`` submits (prompt ids, one
    event stream per choice), ``body`` builds the JSON of finished choices, ``chunks`` the
    SSE payloads of running ones, ``collect`` drains one stream."""

    open: Callable[[ChatCompletionRequest], Awaitable[tuple[list[int], list[AsyncIterator[EngineEvent]]]]]
    body: Callable[[ChatCompletionRequest, list[int], list[list[EngineEvent]]], dict[str, Any]]
    chunks: Callable[[ChatCompletionRequest, list[AsyncIterator[EngineEvent]]], AsyncIterator[dict[str, Any]]]
    collect: Callable[[AsyncIterator[EngineEvent]], Awaitable[list[EngineEvent]]]


def create_app(engine: Engine, model_name: str, routes: Router | None = None) -> FastAPI:
    """The API over ``engine``; with ``routes`` (``fleetlm serve --config``) the route names
    are models too, answered by :class:`fleetlm.server.routing.Router`."""
    lifespan = None
    if routes is not None:
        router = routes

        @contextlib.asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            yield
            await router.aclose()  # the upstream connections; the ledger is closed by its owner

    app = FastAPI(title="fleetlm", docs_url=None, redoc_url=None, lifespan=lifespan)
    tok = engine.lm.tokenizer
    store = engine.store
    metrics = ServerMetrics()

    def respond(request: Request, err: APIError) -> JSONResponse:
        """The error response; a generation request refused before it was tracked is counted."""
        if request.url.path in _GENERATION_PATHS and not getattr(request.state, "tracked", False):
            model = getattr(request.state, "model", None) or "unknown"
            metrics.refused.labels(model=model, code=str(err.status)).inc()
        return JSONResponse(_error_body(err), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, e: APIError) -> JSONResponse:
        return respond(request, e)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body')}: {er.get('msg')}"
                        for er in errs)
        return respond(request, APIError(400, msg, "invalid_request_error", ".".join(loc) or None))

    @app.exception_handler(FleetLMError)
    async def _on_fleetlm(request: Request, e: FleetLMError) -> JSONResponse:
        return respond(request, _api_error(e))  # expected errors: a response, not a traceback

    @app.exception_handler(Exception)
    async def _on_any(request: Request, e: Exception) -> JSONResponse:
        return respond(request, _api_error(e))

    def resolve(model: str) -> str | None:
        return resolve_model(model, model_name, store)

    def sampling(req: Any, max_tokens: int | None, logprobs: int | None, seed: int | None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return SamplingParams(max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
                              prompt_logprobs=prompt_logprobs,
                              temperature=req.temperature, top_p=req.top_p, seed=seed,
                              stop=stop, presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty,
                              logprobs=logprobs, response_format=req.response_format,
                              ignore_eos=req.ignore_eos).validate(engine.lm.config.vocab_size)

    def seeds(req: Any) -> list[int | None]:
        return [None if req.seed is None else req.seed + i for i in range(req.n)]

    async def start(ids: list[int], params: SamplingParams, adapter: str | None,
                    ) -> AsyncIterator[EngineEvent]:
        """Submit now (so errors surface before any response byte) and return the stream."""
        gen = engine.stream(ids, params, adapter=adapter)
        first = await gen.__anext__()  # raises ConfigError / EngineBusy / AdapterError

        async def rest() -> AsyncIterator[EngineEvent]:
            yield first
            async for ev in gen:
                yield ev
        return rest()

    async def start_all(ids: list[int], params: list[SamplingParams], adapter: str | None
                        ) -> list[AsyncIterator[EngineEvent]]:
        """Submit the n choices together; if any is refused, cancel the others."""
        got = await asyncio.gather(*(start(ids, p, adapter) for p in params),
                                   return_exceptions=True)
        errors = [g for g in got if isinstance(g, BaseException)]
        if errors:
            for g in got:
                if not isinstance(g, BaseException):
                    await g.aclose()  # type: ignore[attr-defined]
            raise errors[0]
        return list(got)  # type: ignore[arg-type]

    async def collect(stream: AsyncIterator[EngineEvent]) -> list[EngineEvent]:
        return [ev async for ev in stream]

    def check_end(ev: EngineEvent) -> None:
        if ev.finish_reason == "error":
            raise _failure(ev)

    def token_text(i: int) -> str:
        return str(tok.decode([i])) if tok is not None else ""

    def token_text_of(ids: list[int]) -> str:
        return str(tok.decode(ids)) if tok is not None else ""

    def completion_logprobs(events: list[EngineEvent], prompt: list[int] | None) -> dict[str, Any]:
        """Legacy completions logprobs; with ``prompt`` (echo) the prompt's tokens come first,
        the first of them with no logprob (nothing precedes it)."""
        toks: list[int] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if prompt is not None:
            scored = next((e.prompt_logprobs for e in events if e.prompt_logprobs is not None), [])
            toks += prompt
            lps += [None] + [lp for lp, _ in scored]
            tops += [None] + [{token_text(t): v for t, v in alts} for _, alts in scored]
        for e in events:
            if e.token_id is not None:
                toks.append(e.token_id)
                lps.append(e.logprob)
                tops.append({token_text(t): v for t, v in e.top_logprobs})
        texts = [token_text(t) for t in toks]
        offsets, at = [], 0
        for t in texts:
            offsets.append(at)
            at += len(t)
        return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(events: list[EngineEvent]) -> dict[str, Any]:
        content = []
        for ev in events:
            if ev.token_id is None or ev.logprob is None:
                continue
            t = token_text(ev.token_id)
            content.append({"token": t, "logprob": ev.logprob, "bytes": list(t.encode()),
                            "top_logprobs": [{"token": token_text(i), "logprob": lp,
                                              "bytes": list(token_text(i).encode())}
                                             for i, lp in ev.top_logprobs]})
        return {"content": content}

    if store is not None:
        from fleetlm.server.adapters_api import adapters_router  # it imports APIError from here

        app.include_router(adapters_router(engine, model_name))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": model_name, "object": "model", "created": now, "owned_by": "fleetlm"}]
        if store is not None:
            data += [{"id": a.name, "object": "model", "created": now, "owned_by": "fleetlm",
                      "parent": model_name, "root": f"{model_name}:{a.name}"} for a in store.list()]
        if routes is not None:
            data += routes.models(now)
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(engine), media_type="text/plain; version=0.0.4")

    async def open_chat(req: ChatCompletionRequest) -> tuple[list[int], list[AsyncIterator[EngineEvent]]]:
        """Submit a chat request for ``req.model`` (base or adapter): its prompt ids and one
        event stream per choice. Refusals raise before anything is generated."""
        adapter = resolve(req.model)
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, f"model {model_name!r} has no chat template; use /v1/completions",
                           "invalid_request_error", "messages")
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        k = (req.top_logprobs or 0) if req.logprobs else None
        track = metrics.request(req.model, len(ids))
        params = [sampling(req, req.max_completion_tokens or req.max_tokens or None, k, s)
                  for s in seeds(req)]
        return ids, [track.wrap(st) for st in await start_all(ids, params, adapter)]

    def chat_body(req: ChatCompletionRequest, ids: list[int],
                  results: list[list[EngineEvent]]) -> dict[str, Any]:
        """The chat.completion JSON of finished choices."""
        choices, completion = [], 0
        for i, evs in enumerate(results):
            check_end(evs[-1])
            completion += evs[-1].completion_tokens
            choices.append({"index": i, "message": {"role": "assistant",
                                                    "content": "".join(e.text for e in evs)},
                            "logprobs": chat_logprobs(evs) if req.logprobs else None,
                            "finish_reason": evs[-1].finish_reason})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": req.model, "choices": choices,
                "usage": _usage(len(ids), completion)}

    def chat_chunks(req: ChatCompletionRequest, streams: list[AsyncIterator[EngineEvent]]
                    ) -> AsyncIterator[dict[str, Any]]:
        """The chat.completion.chunk payloads of running choices."""
        return _chat_chunks(streams, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req,
                            chat_logprobs)

    local = LocalChat(open=open_chat, body=chat_body, chunks=chat_chunks, collect=collect)
    if routes is not None:
        routes.attach(metrics)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        request.state.model = req.model
        if routes is not None and req.model in routes.routes:
            return await routes.chat(req, request, local)
        ids, streams = await open_chat(req)
        request.state.tracked = True  # from here on, the request metric counts it
        if req.stream:
            return _sse(chat_chunks(req, streams))
        return chat_body(req, ids, list(await asyncio.gather(*(collect(s) for s in streams))))

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        request.state.model = req.model
        if routes is not None and req.model in routes.routes:
            raise APIError(400, f"model {req.model!r} is a route; routes answer "
                                "/v1/chat/completions only", "invalid_request_error", "model",
                           "route_chat_only")
        adapter = resolve(req.model)
        prompt_text = None
        if isinstance(req.prompt, list) and req.prompt and all(isinstance(t, int) for t in req.prompt):
            ids = [int(t) for t in req.prompt]  # token ids, as OpenAI allows
        else:
            prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            if len(prompts) != 1 or not isinstance(prompts[0], str):
                raise APIError(400, "prompt: send one prompt (a string or a list of token ids) "
                                    "per request", "invalid_request_error", "prompt")
            if tok is None:
                raise APIError(400, "this model has no tokenizer", "invalid_request_error", "prompt")
            ids = list(tok(prompts[0])["input_ids"])
            prompt_text = prompts[0]
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: must be >= 1 (0 only with echo, to score the "
                                "prompt)", "invalid_request_error", "max_tokens")
        if prompt_text is None:
            prompt_text = token_text_of(ids)
        # echo: the prompt comes back with the answer; with logprobs, every prompt token's
        # logprob (the engine scores the prompt in its prefill)
        plp = (req.logprobs if req.logprobs is not None else 0) if req.echo else None
        track = metrics.request(req.model, len(ids))
        params = [sampling(req, 16 if req.max_tokens is None else req.max_tokens, req.logprobs,
                           s, plp) for s in seeds(req)]
        streams = [track.wrap(st) for st in await start_all(ids, params, adapter)]
        request.state.tracked = True  # from here on, the request metric counts it
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = prompt_text if req.echo else None
        if req.stream:
            return _sse(_completion_chunks(streams, rid, created, req, ids, echo,
                                           completion_logprobs))
        results = await asyncio.gather(*(collect(s) for s in streams))
        choices, completion = [], 0
        for i, evs in enumerate(results):
            check_end(evs[-1])
            completion += evs[-1].completion_tokens
            text = (echo or "") + "".join(e.text for e in evs)
            lp = completion_logprobs(evs, ids if req.echo else None) \
                if req.logprobs is not None else None
            choices.append({"index": i, "text": text, "logprobs": lp,
                            "finish_reason": evs[-1].finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": _usage(len(ids), completion)}

    return app


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(chunks: AsyncIterator[dict[str, Any]], headers: dict[str, str] | None = None
         ) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for c in chunks:
            yield f"data: {json.dumps(c)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _merged(streams: list[AsyncIterator[EngineEvent]]) -> AsyncIterator[tuple[int, EngineEvent]]:
    """Events of n streams as they come, tagged with the choice index; closing it closes all."""
    queue: asyncio.Queue[tuple[int, EngineEvent | None]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[EngineEvent]) -> None:
        try:
            async for ev in s:
                await queue.put((i, ev))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    live = len(tasks)
    try:
        while live:
            i, ev = await queue.get()
            if ev is None:
                live -= 1
                continue
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()  # a client that went away: the streams' cleanup cancels the requests


def _failure(ev: EngineEvent) -> APIError:
    """The API error for an event that ended its request with finish_reason "error"."""
    return _api_error(ev.error or FleetLMError("generation failed"))


async def _chunks(streams: list[AsyncIterator[EngineEvent]], base: dict[str, Any],
                  include_usage: bool, choice: Callable[[int, EngineEvent], dict[str, Any] | None],
                  ) -> AsyncIterator[dict[str, Any]]:
    """SSE payloads of n merged streams: ``choice(index, event)`` (None: nothing to send),
    an error body if a request fails, and a final usage chunk when asked for."""
    prompt, completion = 0, 0
    async for i, ev in _merged(streams):
        if ev.finish_reason == "error":
            yield _error_body(_failure(ev))
            return
        c = choice(i, ev)
        if c is not None:
            yield {**base, "choices": [c]}
        if ev.finish_reason:
            prompt = ev.prompt_tokens
            completion += ev.completion_tokens
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(prompt, completion)}


async def _chat_chunks(streams: list[AsyncIterator[EngineEvent]], rid: str, created: int,
                       req: ChatCompletionRequest, chat_logprobs: Any) -> AsyncIterator[dict[str, Any]]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
    for i in range(len(streams)):
        yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}

    def choice(i: int, ev: EngineEvent) -> dict[str, Any] | None:
        delta = {"content": ev.text} if ev.token_id is not None else {}
        if not (delta or ev.finish_reason):
            return None
        lp = chat_logprobs([ev]) if req.logprobs and ev.token_id is not None else None
        return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}

    usage = bool(req.stream_options and req.stream_options.include_usage)
    async for chunk in _chunks(streams, base, usage, choice):
        yield chunk


async def _completion_chunks(streams: list[AsyncIterator[EngineEvent]], rid: str, created: int,
                             req: CompletionRequest, prompt: list[int], echo: str | None,
                             logprobs: Callable[[list[EngineEvent], list[int] | None], Any],
                             ) -> AsyncIterator[dict[str, Any]]:
    base = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
    echoed: set[int] = set()

    def choice(i: int, ev: EngineEvent) -> dict[str, Any] | None:
        if ev.token_id is None and not ev.finish_reason:
            return None
        first = echo is not None and i not in echoed  # the prompt rides on the first chunk
        echoed.add(i)
        lp = logprobs([ev], prompt if first else None) if req.logprobs is not None else None
        text = ((echo or "") if first else "") + ev.text
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason}

    usage = bool(req.stream_options and req.stream_options.include_usage)
    async for chunk in _chunks(streams, base, usage, choice):
        yield chunk
