"""``fleetlm bench fuzz``: schemathesis against the server's own OpenAPI document.

A server is built in this process (:func:`fuzz_target`: the engine, an adapter store with
two random adapters, a route over a loopback stub upstream, the app of
:func:`fleetlm.server.app.create_app` served by uvicorn on loopback), its ``/openapi.json``
is read and completed where the document is silent (:func:`fuzz_document`), and schemathesis
generates requests for every operation, schema-valid ("positive") and schema-violating
("negative"), ``cases`` in all. Each answer is checked (:data:`CHECKS`): no status >= 500,
the status and content type the document declares, the body valid against the declared
schema, and every body OpenAI-shaped (:func:`openai_shape`): errors as ``{"error":
{"message", "type", "param", "code"}}``, completions, chunks and streams as OpenAI sends
them. Afterwards ``/health`` must answer 200 with nothing left running in the engine.

The model is by default ``tiny`` (:func:`fleetlm.bench.harness.tiny_model`): the embedded
model's tokenizer and chat template on random 2-layer weights. What is fuzzed is the HTTP
edge (parsing, validation, error mapping, prompts, the engine's bookkeeping, routes,
adapters), which is the same for any weights; the tiny model answers a generation in
milliseconds instead of a second, so the same minutes cover ten times more cases.

``tests/server/test_fuzz.py`` runs the same target, document and checks for a few hundred
cases inside the test suite. This module knows schemathesis and the OpenAI shapes; it does
not know how the server answers them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from fleetlm.config import StrictModel

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fleetlm.engine.engine import Engine
    from fleetlm.progress import Update
    from fleetlm.server.hybrid import Router

AppFactory = Callable[["Engine", str, "Router | None"], "FastAPI"]

GENERATION = ("/v1/chat/completions", "/v1/completions")
# the OpenAI error object: every answer >= 400 is exactly this
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string", "minLength": 1},
                       "type": {"type": "string", "minLength": 1},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}
FINISH_REASONS = (None, "stop", "length")
# how much of a body a failure report keeps
_EXCERPT = 2000


class FuzzBenchConfig(StrictModel):
    model: str = "tiny"  # "tiny" (see the module docstring), or any model `fleetlm serve` takes
    dtype: str = "float32"
    cases: int = Field(2000, ge=1)
    seed: int = 0
    max_len: int = Field(128, ge=16)  # prompt + generated tokens: short answers, fast cases
    request_timeout_s: float = Field(60.0, gt=0)  # no answer within it: a hung request
    route: bool = True  # also a route over a stub upstream (the hybrid router's path)
    keys: bool = False  # a state store and an admin key on every request (the gateway's path)


# -- the target --------------------------------------------------------------------------


def keyed_app(workdir: Path) -> tuple[AppFactory, dict[str, str], Any]:
    """A gateway over a new state store under ``workdir``: an admin key of a tenant with
    every limit set high (the checks run on every request, none refuses). Returns
    ``(make_app, headers, db)``; the caller closes ``db``."""
    from fleetlm.server.app import create_app
    from fleetlm.server.auth import Gateway
    from fleetlm.state import KeyStore, TenantPolicy, TenantStore, open_state

    db = open_state(workdir / "state.db")
    TenantStore(db).create("fuzz", TenantPolicy(rpm=10**9, tpm=10**9, budget_daily_usd=1e9,
                                                max_tokens=10**6, max_n=16))
    secret, _ = KeyStore(db).create("fuzz", "admin", name="fuzz")

    def make_app(engine: Any, name: str, router: Any) -> Any:
        return create_app(engine, name, router, gateway=Gateway(db))
    return make_app, {"Authorization": f"Bearer {secret}"}, db


@dataclass
class FuzzTarget:
    """A served app and what it serves: the base model's name, its adapters, its routes.
    ``headers`` go with every request (the place for an ``Authorization`` header)."""

    url: str  # http://127.0.0.1:PORT, no /v1
    app: Any
    engine: Any
    model: str
    adapters: list[str]
    routes: list[str]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """Every name a generation request may give as ``model``."""
        return [self.model, *self.adapters, *(f"{self.model}:{a}" for a in self.adapters),
                *self.routes]


@contextlib.contextmanager
def fuzz_target(model: str | Path, workdir: Path, *, name: str = "tiny", dtype: str = "float32",
                max_len: int = 128, adapters: int = 2, route: bool = True,
                make_app: AppFactory | None = None,
                headers: dict[str, str] | None = None) -> Iterator[FuzzTarget]:
    """Serve ``model`` (a folder, or any name ``load_model`` takes) as ``name`` on loopback:
    4 KV rows of ``max_len``, 32 waiting places, ``adapters`` random adapters in a store
    under ``workdir``, and with ``route`` the route :data:`~fleetlm.bench.harness.ROUTE` over
    a stub upstream. ``make_app(engine, name, router)`` builds the app (default
    :func:`fleetlm.server.app.create_app`); ``headers`` are the ones its clients must send."""
    import torch

    from fleetlm.adapters import AdapterStore
    from fleetlm.bench.harness import StubUpstream, make_store, routes_config, serve_in_thread
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model
    from fleetlm.server.app import create_app

    lm = load_model(str(model), dtype=dtype)
    root = workdir / "adapters"
    root.mkdir(parents=True, exist_ok=True)
    names = make_store(root, lm.config, adapters)
    store = AdapterStore(root, lm.config, dtype=torch.float32, max_rank=16)
    engine = Engine(lm, EngineConfig(max_running=4, max_waiting=32, max_len=max_len,
                                     max_hot_adapters=2), store=store)
    stub, router = None, None
    with contextlib.ExitStack() as stack:
        if route:
            from fleetlm.router.config import parse_routes
            from fleetlm.server.hybrid import Router

            stub = StubUpstream()
            stack.callback(stub.close)
            cfg = parse_routes(routes_config(stub.base_url, name, workdir / "ledger.sqlite3"),
                               base_dir=workdir)
            router = Router.for_server(cfg, name, store)
            stack.callback(router.ledger.close)
        engine.start()
        stack.callback(engine.shutdown, 10)
        app = (make_app or create_app)(engine, name, router)
        url = stack.enter_context(serve_in_thread(app))
        yield FuzzTarget(url, app, engine, name, names, list(router.routes) if router else [],
                         dict(headers or {}))


# -- the document ------------------------------------------------------------------------


def fuzz_document(doc: dict[str, Any], target: FuzzTarget) -> dict[str, Any]:
    """The server's OpenAPI document made fit to fuzz (a copy). What the document leaves
    out, added:

    - ``POST /v1/adapters`` reads its body itself, so it declares none: the JSON body
      (``name``, ``pin``) and the multipart upload (``name``, ``pin``, ``overwrite``, files);
    - the errors: every operation may answer 4XX with the OpenAI error object (the
      document's 422 is FastAPI's ``{"detail"}``, which this server never sends);
    - a generation endpoint's 200 may be ``text/event-stream`` (``stream: true``), and
      ``/metrics`` answers ``text/plain`` (Prometheus), not JSON.

    Hints, so that generated requests reach past validation: a ``model`` (and an adapter
    ``name``) is either one the server serves or any string, a message's ``role`` one of
    OpenAI's or any string."""
    doc = copy.deepcopy(doc)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["OpenAIError"] = ERROR_SCHEMA

    def hint(names: list[str]) -> dict[str, Any]:
        # an enum: schema-valid cases name what is served, schema-violating ones anything else
        return {"type": "string", "enum": names} if names else {"type": "string"}

    for body in ("ChatCompletionRequest", "CompletionRequest"):
        if body in schemas:
            schemas[body]["properties"]["model"] = hint(target.models)
    if "ChatMessage" in schemas:
        schemas["ChatMessage"]["properties"]["role"] = hint(
            ["system", "user", "assistant", "developer"])
    error = {"description": "OpenAI error", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}}
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            responses["4XX"] = error
            if path in GENERATION and "200" in responses:
                responses["200"].setdefault("content", {})["text/event-stream"] = {
                    "schema": {"type": "object", "required": ["data"],
                               "properties": {"data": {"type": "string"}}}}
            if path == "/metrics" and "200" in responses:
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
            if path == "/v1/adapters/{name}":
                for p in op.get("parameters", []):
                    if p.get("name") == "name" and method == "get":
                        p["schema"] = hint(target.adapters)
            if path == "/v1/adapters" and method == "post":
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {
                        "type": "object", "required": ["name"], "additionalProperties": False,
                        "properties": {"name": hint(target.adapters),
                                       "pin": {"type": "boolean"}}}},
                    "multipart/form-data": {"schema": {
                        "type": "object", "required": ["name", "file"],
                        "properties": {"name": {"type": "string"},
                                       "pin": {"type": "string"},
                                       "overwrite": {"type": "string"},
                                       "file": {"type": "array", "items": {
                                           "type": "string", "format": "binary"}}}}}}}
    return doc


def load_schema(target: FuzzTarget, *, request_timeout_s: float = 60.0) -> Any:
    """The schemathesis schema of ``target`` (its document through :func:`fuzz_document`),
    sending to it with its headers; streams are read to their end."""
    import httpx
    import schemathesis

    r = httpx.get(f"{target.url}/openapi.json", headers=target.headers, timeout=30)
    r.raise_for_status()
    config = schemathesis.Config.from_dict({
        "base-url": target.url, "headers": target.headers, "request-timeout": request_timeout_s,
        "max-stream-events": 1_000_000, "generation": {"mode": "all"},
        "output": {"sanitization": {"enabled": False}}})  # reproductions keep their headers
    return schemathesis.openapi.from_dict(fuzz_document(r.json(), target), config=config)


# -- the checks ----------------------------------------------------------------------------


def _kind(value: Any, kind: type | tuple[type, ...], what: str, problems: list[str]) -> bool:
    if isinstance(value, bool) and kind in (int, (int, float)):
        problems.append(f"{what}: a boolean, expected {kind}")
        return False
    if not isinstance(value, kind):
        problems.append(f"{what}: {type(value).__name__} {str(value)[:80]!r}, expected "
                        f"{getattr(kind, '__name__', kind)}")
        return False
    return True


def error_problems(body: Any, where: str = "body") -> list[str]:
    """How ``body`` differs from ``{"error": {"message", "type", "param", "code"}}``."""
    problems: list[str] = []
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return [f"{where}: not an OpenAI error object: {str(body)[:200]!r}"]
    err = body["error"]
    missing = {"message", "type", "param", "code"} - set(err)
    if missing:
        problems.append(f"{where}.error: missing {sorted(missing)}")
    if _kind(err.get("message"), str, f"{where}.error.message", problems) and not err["message"]:
        problems.append(f"{where}.error.message: empty")
    _kind(err.get("type"), str, f"{where}.error.type", problems)
    for k in ("param", "code"):
        if err.get(k) is not None:
            _kind(err[k], str, f"{where}.error.{k}", problems)
    return problems


def _choice_problems(c: Any, where: str, chat: bool, chunk: bool) -> list[str]:
    problems: list[str] = []
    if not _kind(c, dict, where, problems):
        return problems
    _kind(c.get("index"), int, f"{where}.index", problems)
    if c.get("finish_reason") not in FINISH_REASONS or (not chunk and c["finish_reason"] is None):
        problems.append(f"{where}.finish_reason: {c.get('finish_reason')!r}")
    if chat:
        part = c.get("delta" if chunk else "message")
        if _kind(part, dict, f"{where}.{'delta' if chunk else 'message'}", problems):
            if part.get("content") is not None:
                _kind(part["content"], str, f"{where}.content", problems)
            if not chunk and part.get("role") != "assistant":
                problems.append(f"{where}.message.role: {part.get('role')!r}")
    elif not chunk or "text" in c:
        _kind(c.get("text"), str, f"{where}.text", problems)
    return problems


def completion_problems(body: Any, chat: bool, chunk: bool, where: str = "body") -> list[str]:
    """How ``body`` differs from an OpenAI (chat) completion or one chunk of its stream."""
    problems: list[str] = []
    if not _kind(body, dict, where, problems):
        return problems
    if "error" in body:
        problems += error_problems(body, where)
        if body.get("error", {}).get("type") == "server_error":
            problems.append(f"{where}: the stream ended with a server error: "
                            f"{body['error'].get('message')!r}")
        return problems
    want = ("chat.completion" if chat else "text_completion") + (".chunk" if chat and chunk else "")
    if body.get("object") != want:
        problems.append(f"{where}.object: {body.get('object')!r}, expected {want!r}")
    choices = body.get("choices")
    if _kind(choices, list, f"{where}.choices", problems):
        if not chunk and not choices:
            problems.append(f"{where}.choices: empty")
        for i, c in enumerate(choices):
            problems += _choice_problems(c, f"{where}.choices[{i}]", chat, chunk)
    usage = body.get("usage")
    if usage is not None and _kind(usage, dict, f"{where}.usage", problems):
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            _kind(usage.get(k), int, f"{where}.usage.{k}", problems)
    return problems


def stream_problems(text: str, chat: bool) -> list[str]:
    """How a server-sent-events body differs from an OpenAI stream: ``data: {json}`` events,
    each a chunk (or a last error object), then ``data: [DONE]``."""
    events = [e for e in text.replace("\r\n", "\n").split("\n\n") if e.strip()]
    if not events or events[-1].strip() != "data: [DONE]":
        return [f"stream: does not end with 'data: [DONE]' (last event "
                f"{events[-1][:120] if events else ''!r})"]
    problems: list[str] = []
    for i, e in enumerate(events[:-1]):
        if not e.startswith("data: "):
            problems.append(f"stream event {i}: not a data line: {e[:120]!r}")
            continue
        try:
            chunk = json.loads(e[6:])
        except ValueError:
            problems.append(f"stream event {i}: not JSON: {e[:120]!r}")
            continue
        problems += completion_problems(chunk, chat, True, f"stream event {i}")
    return problems[:10]


def shape_problems(method: str, path: str, status: int, content_type: str, content: bytes
                   ) -> list[str]:
    """How one answer differs from what OpenAI (or this API's own endpoints) would send.
    ``path`` is the operation's path template (``/v1/adapters/{name}``)."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    text = content.decode("utf-8", "replace")
    if status >= 300 and status != 499:
        if ctype != "application/json":
            return [f"an error answered as {ctype or 'no content type'!r}, not JSON"]
        try:
            return error_problems(json.loads(text))
        except ValueError:
            return [f"an error body that is not JSON: {text[:200]!r}"]
    if path == "/metrics":
        return [] if ctype == "text/plain" else [f"/metrics answered {ctype!r}"]
    if ctype == "text/event-stream":
        if path not in GENERATION:
            return [f"{path} answered a stream"]
        return stream_problems(text, path == GENERATION[0])
    try:
        body = json.loads(text)
    except ValueError:
        return [f"a {status} body that is not JSON: {text[:200]!r}"]
    if path in GENERATION:
        return completion_problems(body, path == GENERATION[0], False)
    problems: list[str] = []
    if path in ("/v1/models", "/v1/adapters") and method == "GET":
        if body.get("object") != "list" or not isinstance(body.get("data"), list):
            return [f"{path}: not an OpenAI list: {text[:200]!r}"]
        want = "model" if path == "/v1/models" else "adapter"
        for i, d in enumerate(body["data"]):
            if not isinstance(d, dict) or not isinstance(d.get("id"), str) \
                    or d.get("object") != want:
                problems.append(f"data[{i}]: not a {want} entry: {str(d)[:120]!r}")
    elif path.startswith("/v1/adapters"):
        if not isinstance(body, dict) or body.get("object") != "adapter" \
                or not isinstance(body.get("id"), str):
            problems.append(f"not an adapter entry: {text[:200]!r}")
    elif path == "/health" and (not isinstance(body, dict) or body.get("status") != "ok"):
        problems.append(f"/health: {text[:200]!r}")
    return problems


def openai_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check: :func:`shape_problems` of the answer, raised as one failure."""
    ctype = (response.headers.get("content-type") or [""])[0]
    problems = shape_problems(case.method.upper(), case.path, response.status_code, ctype,
                              response.content)
    if problems:
        raise AssertionError("not OpenAI-shaped: " + "; ".join(problems))
    return None


def checks() -> list[Any]:
    """What every answer is checked with: no 5xx, the declared status, content type and
    schema, and :func:`openai_shape`."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance,
            response_schema_conformance, openai_shape]


def health_problems(url: str, headers: dict[str, str] | None = None, wait_s: float = 30.0
                    ) -> list[str]:
    """Why the server at ``url`` is not healthy: ``/health`` not 200, or requests still
    running or waiting in its engine ``wait_s`` after the last answer."""
    import httpx

    deadline = time.monotonic() + wait_s
    while True:
        try:
            r = httpx.get(f"{url}/health", headers=headers, timeout=10)
        except httpx.HTTPError as e:
            return [f"/health: {type(e).__name__}: {e}"]
        if r.status_code != 200:
            return [f"/health answered {r.status_code}: {r.text[:200]}"]
        stats = r.json()
        if not stats.get("running") and not stats.get("waiting"):
            return []
        if time.monotonic() > deadline:
            return [f"{stats.get('running')} requests still running and {stats.get('waiting')} "
                    f"waiting {wait_s:g} s after the last answer"]
        time.sleep(0.2)


# -- the run -------------------------------------------------------------------------------

# share of the cases each operation gets; operations without inputs stop after one case
# and leave theirs to the others
_WEIGHTS = {"POST /v1/chat/completions": 8, "POST /v1/completions": 6, "POST /v1/adapters": 3,
            "GET /v1/adapters/{name}": 1, "DELETE /v1/adapters/{name}": 1}


@dataclass
class FuzzStats:
    """What a run saw: per operation and mode, the cases; per status, the answers; the
    failures (deduplicated by operation, checks and status, with a count)."""

    cases: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    statuses: Counter[str] = field(default_factory=Counter)
    statuses_by_operation: dict[str, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))
    server_errors: int = 0
    schema_violations: int = 0
    transport_errors: int = 0
    skipped: int = 0  # generated, not sent (fuzz's ``skip``)
    failures: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.cases.values())


def _excerpt(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):  # exactly as sent: a repr of the bytes
        return repr(bytes(value[:_EXCERPT])) + ("..." if len(value) > _EXCERPT else "")
    if isinstance(value, Mapping):
        value = dict(value)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        value = text = repr(value)
    return value if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."


def _record_failure(stats: FuzzStats, case: Any, mode: str, target: FuzzTarget,
                    names: list[str], messages: list[str], status: int | None,
                    response_text: str) -> None:
    key = (case.operation.label, ",".join(sorted(set(names))), str(status))
    if key in stats.failures:
        stats.failures[key]["count"] += 1
        return
    try:
        curl = case.as_curl_command(headers=target.headers, base_url=target.url)
    except Exception as e:  # noqa: BLE001 -- a report must not stop the run
        curl = f"(no curl command: {type(e).__name__})"
    stats.failures[key] = {
        "operation": case.operation.label, "mode": mode, "checks": sorted(set(names)),
        "status": status, "messages": [m[:_EXCERPT] for m in messages],
        "request": {"method": case.method.upper(), "path": case.formatted_path,
                    "query": _excerpt(case.query), "headers": _excerpt(case.headers),
                    "media_type": case.media_type, "body": _excerpt(case.body)},
        "response": response_text[:_EXCERPT], "curl": curl[:4 * _EXCERPT], "count": 1}


def run_case(case: Any, mode: str, target: FuzzTarget, stats: FuzzStats, session: Any,
             timeout_s: float) -> None:
    """Send one case, check its answer, count it; failures are recorded, never raised."""
    import requests
    from schemathesis.core.failures import FailureGroup

    label = case.operation.label
    stats.cases[label][mode] += 1
    try:
        response = case.call(session=session, headers=target.headers, timeout=timeout_s)
    except requests.RequestException as e:
        stats.transport_errors += 1
        _record_failure(stats, case, mode, target, ["no_answer"],
                        [f"{type(e).__name__}: {e}"], None, "")
        return
    status = response.status_code
    stats.statuses[str(status)] += 1
    stats.statuses_by_operation[label][str(status)] += 1
    if status >= 500:
        stats.server_errors += 1
    try:
        case.validate_response(response, checks=checks(), headers=target.headers)
    except FailureGroup as group:
        failures = list(group.exceptions)
    except AssertionError as e:
        failures = [e]  # type: ignore[list-item]
    else:
        return
    names = [getattr(f, "title", type(f).__name__) for f in failures]
    # a 5xx is counted above (and is undocumented, of course); anything else is a violation
    of_5xx = ("ServerError", "UndefinedStatusCode") if status >= 500 else ()
    if any(type(f).__name__ not in of_5xx for f in failures):
        stats.schema_violations += 1
    _record_failure(stats, case, mode, target, names, [str(f) for f in failures], status,
                    response.text)


def _given(op: Any, mode: Any, n: int, seed: int, body: Callable[[Any], None]
           ) -> Callable[[], None]:
    """A hypothesis test calling ``body`` on up to ``n`` cases of ``op`` in ``mode``."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, given, settings

    @hypothesis.seed(seed)
    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate], verbosity=hypothesis.Verbosity.quiet)
    @given(case=op.as_strategy(mode))
    def test(case: Any) -> None:
        body(case)

    return test  # type: ignore[no-any-return]


def fuzz(schema: Any, target: FuzzTarget, cases: int, seed: int = 0,
         request_timeout_s: float = 60.0, progress: Update | None = None,
         skip: Callable[[Any], bool] | None = None) -> FuzzStats:
    """About ``cases`` generated requests over every operation of ``schema``, half
    schema-valid and half schema-violating where the operation has inputs to violate;
    operations share the cases by :data:`_WEIGHTS` (1 for the rest), and what an exhausted
    operation cannot use goes to the others, round after round. A case for which
    ``skip(case)`` holds (a known bug, say) is counted in ``skipped`` and not sent."""
    import requests
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    stats = FuzzStats()
    pairs = [(op.ok(), mode) for op in schema.get_all_operations()
             for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    weight = {(op.label, m): _WEIGHTS.get(op.label, 1) for op, m in pairs}
    exhausted: set[tuple[str, Any]] = set()
    session = requests.Session()

    def tick(case: Any, mode: str) -> None:
        if skip is not None and skip(case):
            stats.skipped += 1
            return
        run_case(case, mode, target, stats, session, request_timeout_s)
        if progress is not None:
            progress(stats.total, info=f"{stats.server_errors} >= 500, "
                                       f"{len(stats.failures)} distinct failures")

    def generated() -> int:
        return stats.total + stats.skipped

    rnd = 0
    while generated() < cases and len(exhausted) < len(pairs):
        live = [(op, m) for op, m in pairs if (op.label, m) not in exhausted]
        left, total_w = cases - generated(), sum(weight[(op.label, m)] for op, m in live)
        for op, mode in live:
            share = min(max(1, round(left * weight[(op.label, mode)] / total_w)),
                        cases - generated())
            if share <= 0:
                break
            before = generated()
            try:
                _given(op, mode, share, seed * 1000 + rnd, functools.partial(tick, mode=mode.value))()
            except Unsatisfiable:
                pass  # nothing schema-violating to send (an operation without inputs)
            if generated() - before < share:
                exhausted.add((op.label, mode))
        rnd += 1
    session.close()
    return stats


def machine() -> dict[str, Any]:
    """:func:`fleetlm.bench.common.environment` plus the CPU's vector flags."""
    from fleetlm.bench.common import environment

    info = environment()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                info["cpu_flags"] = sorted(f for f in line.split(":", 1)[1].split()
                                           if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))
                break
    except OSError:
        pass
    return info


def run(cfg: FuzzBenchConfig, out: Path | None) -> dict[str, Any]:
    """The whole benchmark: build the target, fuzz it, check its health, print and write."""
    from rich.console import Console
    from rich.table import Table

    from fleetlm.bench.common import write_json
    from fleetlm.bench.harness import tiny_model
    from fleetlm.progress import Progress

    console = Console(stderr=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fleetlm-bench-fuzz-") as tmp, \
            Progress("bench fuzz") as p:
        work = Path(tmp)
        model: str | Path = cfg.model
        name = cfg.model if "/" not in cfg.model else Path(cfg.model).name
        if cfg.model == "tiny":
            p.say("bench fuzz: writing the tiny model (smollm2-135m's tokenizer, random weights)")
            model = tiny_model(work / "tiny")
        make_app, headers, db = keyed_app(work) if cfg.keys else (None, None, None)
        with contextlib.ExitStack() as stack:
            if db is not None:
                stack.callback(db.close)
            target = stack.enter_context(fuzz_target(
                model, work, name=name, dtype=cfg.dtype, max_len=cfg.max_len, route=cfg.route,
                make_app=make_app, headers=headers))
            schema = load_schema(target, request_timeout_s=cfg.request_timeout_s)
            started = time.perf_counter()
            stats = fuzz(schema, target, cfg.cases, cfg.seed, cfg.request_timeout_s,
                         p.task("cases", cfg.cases))
            fuzz_s = time.perf_counter() - started
            unhealthy = health_problems(target.url, target.headers)
    failures = sorted(stats.failures.values(), key=lambda f: (-(f["status"] or 999), -f["count"]))
    result: dict[str, Any] = {
        "config": cfg.model_dump(),
        "model_note": "tiny: smollm2-135m's tokenizer and chat template on random 2-layer "
                      "weights; the HTTP edge is what is fuzzed" if cfg.model == "tiny" else
                      cfg.model,
        "environment": machine(),
        "duration_s": round(time.perf_counter() - t0, 1), "fuzz_s": round(fuzz_s, 1),
        "cases": stats.total, "cases_per_s": round(stats.total / fuzz_s, 1) if fuzz_s else None,
        "cases_per_operation": {k: dict(v) for k, v in sorted(stats.cases.items())},
        "status_codes": dict(sorted(stats.statuses.items())),
        "status_codes_per_operation": {k: dict(sorted(v.items()))
                                       for k, v in sorted(stats.statuses_by_operation.items())},
        "server_errors": stats.server_errors, "schema_violations": stats.schema_violations,
        "no_answer": stats.transport_errors,
        "healthy_after": not unhealthy, "health_problems": unhealthy,
        "failures": failures,
        "pass": stats.server_errors == 0 and stats.schema_violations == 0
                and stats.transport_errors == 0 and not unhealthy}
    t = Table(title=f"fleetlm bench fuzz: {stats.total} cases in {fuzz_s:.0f} s")
    for col in ("operation", "positive", "negative", "statuses"):
        t.add_column(col)
    for op, by_mode in result["cases_per_operation"].items():
        t.add_row(op, str(by_mode.get("positive", 0)), str(by_mode.get("negative", 0)),
                  " ".join(f"{k}:{v}" for k, v in result["status_codes_per_operation"]
                           .get(op, {}).items()))
    console.print(t)
    console.print(f"  >= 500: {stats.server_errors}   schema violations: "
                  f"{stats.schema_violations}   no answer: {stats.transport_errors}   "
                  f"healthy after: {not unhealthy}")
    for f in failures[:10]:
        console.print(f"  FAIL x{f['count']} {f['operation']} ({f['mode']}) {f['status']}: "
                      f"{', '.join(f['checks'])}\n    {f['curl'][:400]}")
    write_json(result, out)
    return result
