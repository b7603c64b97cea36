"""The HTTP app: assembles the OpenAI-compatible API over one engine.

:func:`create_app` wires the rooms together: the local path
(:class:`~fleetlm.server.local.LocalModel`), the OpenAI endpoints
(:mod:`fleetlm.server.openai_routes`), the adapter API when the engine has a store
(:mod:`fleetlm.server.adapters_api`) and, with ``fleetlm serve --config``, the hybrid
router (:class:`~fleetlm.server.hybrid.Router`), whose route names are models too. Every
error becomes an OpenAI-shaped response through :mod:`fleetlm.server.errors` (never a
traceback); a generation request refused before it was tracked is counted by the
``fleetlm_refused_requests`` metric.

This module knows how the pieces fit; what each endpoint does is in its own module, and
tokens, batching and adapters are the engine's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fleetlm.engine.engine import Engine
from fleetlm.errors import FleetLMError
from fleetlm.server.adapters_api import adapters_router
from fleetlm.server.errors import APIError, api_error, error_body, validation_error
from fleetlm.server.local import LocalModel
from fleetlm.server.metrics import ServerMetrics
from fleetlm.server.openai_routes import GENERATION_PATHS, OpenAIRoutes

if TYPE_CHECKING:
    from fleetlm.server.hybrid import Router


def create_app(engine: Engine, model_name: str, routes: Router | None = None) -> FastAPI:
    """The API over ``engine``; with ``routes`` (``fleetlm serve --config``) the route names
    are models too, answered by :class:`fleetlm.server.hybrid.Router`."""
    lifespan = None
    if routes is not None:
        router = routes

        @contextlib.asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            yield
            await router.aclose()  # the upstream connections; the ledger is closed by its owner

    app = FastAPI(title="fleetlm", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = ServerMetrics()
    _add_error_handlers(app, metrics)
    if engine.store is not None:
        app.include_router(adapters_router(engine, model_name))
    if routes is not None:
        routes.attach(metrics)
    local = LocalModel(engine, model_name, metrics)
    app.include_router(OpenAIRoutes(engine, model_name, local, metrics, routes).router())
    return app


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Every error answers OpenAI-shaped; expected errors are a response, not a traceback."""

    def respond(request: Request, err: APIError) -> JSONResponse:
        """The error response; a generation request refused before it was tracked is counted."""
        if request.url.path in GENERATION_PATHS and not getattr(request.state, "tracked", False):
            model = getattr(request.state, "model", None) or "unknown"
            metrics.refused.labels(model=model, code=str(err.status)).inc()
        return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return respond(request, e)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return respond(request, validation_error(e))

    @app.exception_handler(FleetLMError)
    async def on_fleetlm(request: Request, e: FleetLMError) -> JSONResponse:
        return respond(request, api_error(e))

    @app.exception_handler(Exception)
    async def on_any(request: Request, e: Exception) -> JSONResponse:
        return respond(request, api_error(e))
