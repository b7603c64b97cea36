"""Schemathesis against the server's own OpenAPI document, as part of the suite.

The app of ``create_app`` on the tiny random model (the embedded tokenizer and chat
template), with two adapters in its store and a route over a stub upstream, served on
loopback (:func:`fleetlm.bench.fuzz.fuzz_target`); its ``/openapi.json`` completed where it
is silent (:func:`fleetlm.bench.fuzz.fuzz_document`). Every operation gets generated
requests, schema-valid and schema-violating, and every answer must pass
:func:`fleetlm.bench.fuzz.checks`: no status >= 500, the declared status, content type and
schema, and OpenAI-shaped bodies (errors ``{"error": {"message", "type", "param", "code"}}``,
completions, streams). Afterwards the server must still be healthy, nothing left running.

``fleetlm bench fuzz`` runs the same for thousands of cases. Two variants of the server:
``open`` (no keys, as ``make serve``) and ``keyed`` (a state store with an admin key whose
tenant has every limit set, none reached; every request carries the key), so the gateway's
code is on the path of every generated request. The server bugs the fuzzer found are in
:data:`FOUND_BUGS`, each with its request and a test that it stays fixed.

The cases are driven by :func:`fleetlm.bench.fuzz.fuzz` (hypothesis over each operation's
strategy) rather than ``schemathesis.pytest.from_fixture``, which fails on pytest 9
(schemathesis 4.32 reads ``request.node._nodeid``); a failure still shows each distinct
problem with its request and a curl line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from fleetlm.bench.fuzz import (
    FuzzTarget,
    fuzz,
    fuzz_target,
    health_problems,
    keyed_app,
    load_schema,
)

pytestmark = pytest.mark.slow


@dataclass
class Variant:
    """One way to build and call the server: ``make_app(engine, name, router)`` (None:
    ``create_app``) and the headers every request carries."""

    name: str
    make_app: Callable[..., Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


VARIANTS = [Variant("open"), Variant("keyed")]


def _float32_zero(x: Any) -> bool:
    import numpy as np

    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < 1e-30 \
        and float(np.float32(x)) == 0.0


def _not_utf8(case: Any) -> bool:
    if not isinstance(case.body, bytes) or case.media_type != "application/json":
        return False
    try:
        case.body.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# Server bugs found by this fuzzer, now fixed: (name, predicate on a case, the request that
# showed it, the wrong answer it got). test_found_bug_stays_fixed sends each again.
FOUND_BUGS: list[tuple[str, Callable[[Any], bool], dict[str, Any], str]] = [
    ("temperature that is 0 in float32",
     lambda c: c.path in ("/v1/chat/completions", "/v1/completions")
     and isinstance(c.body, dict) and _float32_zero(c.body.get("temperature")),
     {"path": "/v1/chat/completions", "json": {
         "model": "tiny", "messages": [{"role": "user", "content": "hi"}],
         "temperature": 1e-300, "max_tokens": 2}},
     "500 internal error: RuntimeError (the sampler divides by a float32 temperature of 0; "
     "streamed: a server_error event)"),
    ("JSON body that is not UTF-8",
     lambda c: c.path in ("/v1/chat/completions", "/v1/completions") and _not_utf8(c),
     {"path": "/v1/chat/completions", "content": b'"\xff"',
      "headers": {"Content-Type": "application/json"}},
     '400 {"detail": "There was an error parsing the body"}: FastAPI\'s HTTPException, not '
     "an OpenAI error"),
    # not in the document, so never generated; found by hand next to the one above
    ("path the server does not have", lambda c: False,
     {"path": "/v1/embeddings", "json": {"model": "tiny", "input": "hi"}},
     '404 {"detail": "Not Found"} (and 405 {"detail": "Method Not Allowed"}): Starlette\'s '
     "HTTPException, not an OpenAI error"),
]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.name)
def target(request: pytest.FixtureRequest, tiny_base: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    variant: Variant = request.param
    workdir = tmp_path_factory.mktemp("fuzz")
    make_app, headers, db = variant.make_app, variant.headers, None
    if variant.name == "keyed":
        make_app, headers, db = keyed_app(workdir)
    try:
        with fuzz_target(tiny_base, workdir, name="tiny", max_len=96, make_app=make_app,
                         headers=headers) as t:
            yield t
    finally:
        if db is not None:
            db.close()


# generated requests per variant: ~10 operations, most of them to the two generation
# endpoints and the adapter upload (fleetlm.bench.fuzz._WEIGHTS); ~13 s on 2 cores
# (`fleetlm bench fuzz` runs thousands)
CASES = 150


def test_every_operation(target: FuzzTarget) -> None:
    """Generated requests to every operation of the document; every answer checked. A
    failure lists each distinct problem with the request that shows it (and a curl line)."""
    stats = fuzz(load_schema(target, request_timeout_s=60), target, CASES, seed=0)
    operations = {op.ok().label for op in load_schema(target).get_all_operations()}
    assert set(stats.cases) == operations, "every operation was fuzzed"
    assert stats.statuses.get("200", 0) > CASES // 10, f"too few cases got past validation: " \
                                                       f"{dict(stats.statuses)}"
    assert not stats.failures, json.dumps(list(stats.failures.values()), indent=1)[:20000]
    assert stats.server_errors == stats.schema_violations == stats.transport_errors == 0


def test_healthy_afterwards(target: FuzzTarget) -> None:
    """After the fuzzing: /health 200, nothing running or waiting, and a plain request
    still answered."""
    assert health_problems(target.url, target.headers) == []
    r = httpx.post(f"{target.url}/v1/chat/completions", headers=target.headers, timeout=60,
                   json={"model": target.model, "max_tokens": 3,
                         "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("bug", FOUND_BUGS, ids=[b[0] for b in FOUND_BUGS])
def test_found_bug_stays_fixed(bug: tuple[str, Any, dict[str, Any], str], target: FuzzTarget
                               ) -> None:
    from fleetlm.bench.fuzz import shape_problems

    request = dict(bug[2])
    path = request.pop("path")
    headers = {**target.headers, **request.pop("headers", {})}
    r = httpx.post(f"{target.url}{path}", headers=headers, timeout=60, **request)
    assert r.status_code < 500, f"{bug[0]}: {r.status_code} {r.text[:300]}"
    assert shape_problems("POST", path, r.status_code, r.headers.get("content-type", ""),
                          r.content) == [], f"{bug[0]}: {r.text[:300]}"
    if r.status_code == 200:
        json.loads(r.text)
