"""HTTP errors: the OpenAI error body, and the one map from fleetlm's errors to them.

Every error the API answers is an :class:`APIError` rendered by :func:`error_body` as
``{"error": {"message", "type", "param", "code"}}``. :func:`api_error` is the only place a
domain error becomes an HTTP one:

    EngineBusy       429  rate_limit_exceeded, Retry-After
    EngineUnavailable 503 engine_unavailable, Retry-After (a Ray engine replica died)
    AdapterNotFound  404  param: the field naming the adapter
    AdapterError     422  (an adapter that fails validation)
    ConfigError      400  param: ``ConfigError.param``, the request field the error names
    FleetLMError     500  its message
    anything else    500  only its type: never a traceback, never internals

The field at fault is carried by the error (``ConfigError.param``), never parsed back out of
its message. This module knows HTTP statuses and error shapes; it does not know routes,
requests or the engine.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError

from fleetlm.adapters.errors import AdapterError, AdapterNotFound
from fleetlm.errors import ConfigError, EngineBusy, EngineUnavailable, FleetLMError

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    """An HTTP error response: status, OpenAI error fields, and extra headers."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_body(e: APIError) -> dict[str, Any]:
    """The OpenAI error JSON (also sent as the last SSE payload of a failed stream)."""
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def api_error(e: BaseException, *, adapter_param: str = "model") -> APIError:
    """The HTTP error for ``e``. ``adapter_param`` is the request field that named the
    adapter: ``model`` for generation (not found: ``model_not_found``), ``name`` or ``file``
    for the adapter API (not found: ``adapter_not_found``)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineBusy):
        return APIError(429, str(e), "rate_limit_exceeded", code="engine_busy",
                        headers={"Retry-After": str(max(1, round(e.retry_after_s)))})
    if isinstance(e, EngineUnavailable):
        return APIError(503, str(e), "server_error", code="engine_unavailable",
                        headers={"Retry-After": str(max(1, round(e.retry_after_s)))})
    if isinstance(e, AdapterNotFound):
        code = "model_not_found" if adapter_param == "model" else "adapter_not_found"
        return APIError(404, str(e), INVALID_REQUEST, adapter_param, code)
    if isinstance(e, AdapterError):
        return APIError(422, str(e), INVALID_REQUEST, adapter_param, "invalid_adapter")
    if isinstance(e, ConfigError):
        return APIError(400, str(e), INVALID_REQUEST, e.param)
    if isinstance(e, FleetLMError):
        return APIError(500, str(e), "server_error")
    return APIError(500, f"internal error: {type(e).__name__}", "server_error")


def generation_failed(error: BaseException | None) -> APIError:
    """The HTTP error of a request the engine ended with ``finish_reason="error"``."""
    return api_error(error or FleetLMError("generation failed"))


def validation_error(e: RequestValidationError) -> APIError:
    """A request body that does not fit its schema: 400, every problem listed, ``param`` the
    first problem's field (``messages.0.role``). A body that is not JSON names the character
    where parsing stopped, and no field."""
    errs = e.errors()
    if errs and errs[0].get("type") == "json_invalid":
        at = [x for x in errs[0].get("loc", ()) if x != "body"]
        where = f" at character {at[0]}" if at else ""
        return APIError(400, f"the request body is not valid JSON{where} "
                             f"({errs[0].get('ctx', {}).get('error', 'JSON decode error')})",
                        INVALID_REQUEST, None, "invalid_json")
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body')}: {er.get('msg')}"
                    for er in errs)
    return APIError(400, msg, INVALID_REQUEST, ".".join(loc) or None)


def http_error(status: int, detail: Any, method: str, path: str) -> APIError:
    """Starlette's own HTTP errors (no such path, method not allowed, a body it could not
    read) as OpenAI errors."""
    if status == 404:
        return APIError(404, f"{method} {path}: no such endpoint (see /openapi.json for the "
                             "endpoints this server has)", INVALID_REQUEST, None, "not_found")
    if status == 405:
        return APIError(405, f"{method} {path}: method not allowed on this endpoint",
                        INVALID_REQUEST, None, "method_not_allowed")
    if status == 400:
        return APIError(400, f"the request body could not be read ({detail}); send UTF-8 JSON",
                        INVALID_REQUEST, None, "invalid_json")
    kind = INVALID_REQUEST if status < 500 else "server_error"
    return APIError(status, str(detail), kind)
