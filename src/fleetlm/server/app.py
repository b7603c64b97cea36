"""The HTTP app: assembles the OpenAI-compatible API over one engine.

:func:`create_app` wires the rooms together: the local path
(:class:`~fleetlm.server.local.LocalModel`), the OpenAI endpoints
(:mod:`fleetlm.server.openai_routes`), the adapter API when the engine has a store
(:mod:`fleetlm.server.adapters_api`) and, with ``fleetlm serve --config``, the hybrid
router (:class:`~fleetlm.server.hybrid.Router`), whose route names are models too. Every
error becomes an OpenAI-shaped response through :mod:`fleetlm.server.errors` (never a
traceback); a generation request refused before it was tracked is counted by the
``fleetlm_refused_requests`` metric.

Request bodies are bounded before any handler reads them (:class:`BodyLimit`, pure ASGI):
``max_body_bytes`` for every request, ``max_upload_bytes`` (plus room for the multipart
framing) for a multipart upload to ``/v1/adapters``, whose handler enforces the exact cap on
the files themselves. The bytes are counted as they arrive, so a client that sends no
Content-Length (chunked) or a huge body is cut off at the limit with a 413, never buffered
whole (docs/limits.md).

This module knows how the pieces fit; what each endpoint does is in its own module, and
tokens, batching and adapters are the engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fleetlm.engine.engine import Engine
from fleetlm.errors import FleetLMError
from fleetlm.server.adapters_api import (
    UPLOAD_PATH,
    adapters_router,
    size_text,
    upload_too_large,
)
from fleetlm.server.audit_api import audit_router
from fleetlm.server.auth import Gateway
from fleetlm.server.errors import (
    INVALID_REQUEST,
    APIError,
    api_error,
    error_body,
    http_error,
    validation_error,
)
from fleetlm.server.local import LocalModel
from fleetlm.server.metrics import ServerMetrics
from fleetlm.server.openai_routes import GENERATION_PATHS, OpenAIRoutes

if TYPE_CHECKING:
    from fleetlm.server.hybrid import Router

MIB = 1 << 20
# JSON bodies: a 128k-token prompt for a large upstream is ~0.5 MB of text; 4 MiB leaves room
# for long multi-turn chats and still bounds what one request can make the server hold
DEFAULT_MAX_BODY_BYTES = 4 * MIB
# an adapter's files: a rank-16 LoRA of an 8B model on every projection is ~170 MB in float32
DEFAULT_MAX_UPLOAD_BYTES = 512 * MIB
# room for the multipart framing around the files (part headers, the name/pin fields)
_MULTIPART_SLACK = 1 * MIB
# before a 413, the rest of the body read and dropped, at most this much for this long
LINGER_BYTES = 16 * MIB
LINGER_S = 2.0
LINGER_IDLE_S = 0.25  # ... or until the client has sent nothing for this long

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def create_app(engine: Engine, model_name: str, routes: Router | None = None, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               gateway: Gateway | None = None) -> FastAPI:
    """The API over ``engine``; with ``routes`` (``fleetlm serve --config``) the route names
    are models too, answered by :class:`fleetlm.server.hybrid.Router`. ``max_body_bytes``
    bounds every request body, ``max_upload_bytes`` the files of one adapter upload.
    ``gateway`` checks keys, tenants' limits and records the audit log (None: an open
    server with no state store, as in tests and benchmarks)."""
    gateway = gateway or Gateway(None)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if routes is not None:
            await routes.aclose()  # the upstream connections; the ledger is closed by its owner
        await gateway.aclose()  # audit rows still being written

    # the OpenAPI document needs a key like everything but /health: served below
    app = FastAPI(title="fleetlm", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    metrics = ServerMetrics()
    local = LocalModel(engine, model_name, metrics)
    openai = OpenAIRoutes(engine, model_name, local, metrics, routes, gateway)
    _add_error_handlers(app, metrics, openai.label)

    def refused(path: str, status: int) -> None:
        if path in GENERATION_PATHS:
            metrics.refused.labels(model="unknown", code=str(status)).inc()

    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes,  # type: ignore[arg-type]
                       max_upload_bytes=max_upload_bytes, on_refused=refused)
    if engine.store is not None:
        app.include_router(adapters_router(engine, model_name, max_upload_bytes, gateway))
    if routes is not None:
        routes.attach(metrics, gateway)
    app.include_router(openai.router())
    app.include_router(audit_router(gateway))

    @app.get("/openapi.json", include_in_schema=False,
             dependencies=[Depends(gateway.authenticate)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    return app


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics,
                        label: Callable[[str], str]) -> None:
    """Every error answers OpenAI-shaped; expected errors are a response, not a traceback.
    ``label`` turns a refused request's ``model`` into its bounded metric label."""

    def respond(request: Request, err: APIError) -> JSONResponse:
        """The error response; a generation request refused before it was tracked is counted."""
        if request.url.path in GENERATION_PATHS and not getattr(request.state, "tracked", False):
            model = getattr(request.state, "model", None)
            metrics.refused.labels(model=label(model) if model else "unknown",
                                   code=str(err.status)).inc()
        return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return respond(request, e)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return respond(request, validation_error(e))

    @app.exception_handler(HTTPException)  # Starlette's: 404, 405, an unreadable body
    async def on_http(request: Request, e: HTTPException) -> JSONResponse:
        err = http_error(e.status_code, e.detail, request.method, request.url.path)
        err.headers.update(e.headers or {})
        return respond(request, err)

    @app.exception_handler(FleetLMError)
    async def on_fleetlm(request: Request, e: FleetLMError) -> JSONResponse:
        return respond(request, api_error(e))

    @app.exception_handler(Exception)
    async def on_any(request: Request, e: Exception) -> JSONResponse:
        return respond(request, api_error(e))


class _TooLarge(Exception):
    """Raised into the app by :class:`BodyLimit`'s ``receive`` once the body is over."""


class BodyLimit:
    """Pure ASGI middleware: a request body over its limit is answered 413 (OpenAI-shaped,
    naming the limit and the ``fleetlm serve`` option that sets it) and the connection is
    closed. A declared Content-Length over the limit is refused before a byte is read; else
    the ``http.request`` messages are counted as the app reads them, and at the first one
    past the limit the app's ``receive`` raises, whatever the app answers is dropped, and
    the 413 goes out instead. Nothing is buffered here."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *,
                 max_body_bytes: int, max_upload_bytes: int,
                 on_refused: Callable[[str, int], None] | None = None) -> None:
        self.app, self.max_body, self.max_upload = app, max_body_bytes, max_upload_bytes
        self.on_refused = on_refused

    def limit(self, scope: Scope) -> tuple[int, APIError]:
        """The byte limit of this request, and the error that refuses it."""
        headers = dict(scope.get("headers") or ())
        ctype = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if scope["path"] == UPLOAD_PATH and scope["method"] == "POST" \
                and ctype == b"multipart/form-data":
            return self.max_upload + _MULTIPART_SLACK, upload_too_large(self.max_upload)
        return self.max_body, APIError(
            413, f"the request body is larger than the limit of {size_text(self.max_body)}; send "
                 "a smaller body, or raise the limit with `fleetlm serve --max-body-mb`",
            INVALID_REQUEST, None, "request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, err = self.limit(scope)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # a body too large to drain is left unread: the client may see a reset
            await self.refuse(scope, receive, send, err, linger=int(declared) <= LINGER_BYTES)
            return
        received, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, over
            if over:
                raise _TooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to a cut-off body: the 413 replaces it
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self.refuse(scope, receive, send, err)

    async def refuse(self, scope: Scope, receive: Receive, send: Send, err: APIError, *,
                     linger: bool = True) -> None:
        """The 413, then the connection closes. With ``linger``, the rest of the body is
        first read and dropped (at most ``LINGER_BYTES``, for at most ``LINGER_S``, until the
        client pauses ``LINGER_IDLE_S``): closing with unread bytes in the socket makes the
        kernel reset the connection, and a client still sending would see a reset instead of
        the 413. (It must come first: once the response is sent, the server reads nothing
        more of the request.)"""
        if self.on_refused is not None:
            self.on_refused(scope["path"], err.status)
        if linger:
            await _drain(receive)
        response = JSONResponse(error_body(err), status_code=err.status,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


async def _drain(receive: Receive) -> None:
    """Read and drop what is left of a request body (bounded, see :meth:`BodyLimit.refuse`)."""
    drained, end = 0, time.monotonic() + LINGER_S
    with contextlib.suppress(Exception):  # a timeout or a disconnect: stop draining
        while drained < LINGER_BYTES:
            left = end - time.monotonic()
            if left <= 0:
                return
            message = await asyncio.wait_for(receive(), min(left, LINGER_IDLE_S))
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
