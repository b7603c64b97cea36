"""The client of the large upstreams: any OpenAI-compatible ``/chat/completions`` endpoint.

    client = UpstreamClient(cfg.upstreams)                 # no connection until a call
    res = await client.first_available(["big", "backup"], body)              # a dict answer
    res = await client.first_available(["big", "backup"], body, stream=True)
    async for chunk in res: ...                            # chunk dicts, as the upstream sent them
    res.upstream, res.usage, res.failures                  # who answered, tokens, who failed first
    await client.aclose()

What each call guarantees, so a request never hangs:

- ``model`` is replaced by the upstream's model; ``Authorization: Bearer`` comes from the
  environment variable named by ``api_key_env``, read at call time (a missing variable is
  that upstream's failure, with a message naming the variable).
- One attempt is bounded by ``timeout_s``: connect + whole answer, or for a stream connect +
  first content chunk; afterwards each gap between chunks is bounded by ``stream_gap_s``.
- 429 (Retry-After honoured up to ``max_backoff_s``; a longer one moves on at once), 5xx and
  connection errors are retried with exponential backoff and jitter, at most
  ``max_attempts`` times. A timed-out attempt is not retried (an upstream slow once is slow
  again); other 4xx and malformed answers are not retried either.
- ``first_available`` tries the chain in order within an optional overall ``deadline_s``
  and raises :class:`UpstreamUnavailable` listing every upstream's failure when none
  answered; the caller then sends the small model's answer, flagged as a fallback.
- Streams fail over only before the first content chunk (chunks before it, e.g. the role,
  are held back). Once content has been handed out, a failure raises
  :class:`StreamInterrupted` instead of switching models mid-answer.
- Each upstream has a circuit breaker (:class:`CircuitBreaker`): after ``circuit_failures``
  consecutive failed calls it is skipped at once, without a request, for
  ``circuit_cooldown_s`` (a :class:`CircuitOpen` failure: the chain moves on, so an outage
  does not cost every escalation the full timeout); then one call is let through as a
  probe, and its success closes the circuit, its failure opens it again. A failed call is
  one that timed out, could not connect, got 429 or 5xx after its retries or a malformed
  answer; a 4xx answer (the request's fault) shows the upstream is up.
- Token usage comes from the upstream's ``usage`` (streams are asked for it with
  ``stream_options.include_usage``); when absent, it is estimated (characters / 4) and
  :attr:`Usage.estimated` is set.

This module knows HTTP and the OpenAI wire format; it knows nothing about policies, PII or
the ledger (the caller redacts before and records after).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

import httpx

from fleetlm.errors import ConfigError, FleetLMError
from fleetlm.router.config import UpstreamConfig

CHARS_PER_TOKEN = 4  # the usage estimate when an upstream reports none
T = TypeVar("T")


class UpstreamError(FleetLMError):
    """One upstream failed (after its retries). ``reason`` says how, for logs and errors."""

    def __init__(self, upstream: str, reason: str, *, status: int | None = None,
                 attempts: int = 0):
        super().__init__(f"{upstream}: {reason}")
        self.upstream, self.reason, self.status, self.attempts = upstream, reason, status, attempts


class StreamInterrupted(UpstreamError):
    """A stream failed after content was handed out; the answer is incomplete. ``usage``
    estimates what was consumed so far (for the ledger)."""

    def __init__(self, upstream: str, reason: str, usage: Usage):
        super().__init__(upstream, f"stream interrupted after content was sent: {reason}")
        self.usage = usage


class CircuitOpen(UpstreamError):
    """An upstream skipped without a request: its circuit is open."""

    def __init__(self, upstream: str, failures: int, retry_in_s: float):
        super().__init__(upstream, f"skipped: circuit open after {failures} consecutive "
                                   f"failures; the next probe in {retry_in_s:.1f}s")
        self.retry_in_s = retry_in_s


class UpstreamUnavailable(FleetLMError):
    """No upstream of the chain answered; ``failures`` holds one error per upstream."""

    def __init__(self, failures: Sequence[UpstreamError]):
        self.failures = list(failures)
        detail = "; ".join(str(f) for f in self.failures) or "the route names no upstream"
        super().__init__(f"no large upstream answered ({detail})")


class UpstreamKeyMissing(ConfigError):
    """``api_key_env`` names a variable that is not set."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False  # True: counted as characters / 4, the upstream sent no usage

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class UpstreamResponse:
    """A non-streaming answer: the upstream's JSON as it sent it."""

    upstream: str
    response: dict[str, Any]
    usage: Usage
    attempts: int  # HTTP requests made to this upstream
    latency_ms: float  # first attempt to answer, retries included
    failures: list[UpstreamError] = field(default_factory=list)  # earlier upstreams


class CircuitBreaker:
    """One upstream's circuit: ``closed`` (calls go), ``open`` (calls are skipped) and, once
    ``cooldown_s`` has passed, ``half-open``: the next call is the probe, and other calls are
    skipped while it runs. ``failures`` consecutive failures open it (0: never). Plain
    bookkeeping on the event loop's thread; ``clock`` is replaceable for tests."""

    def __init__(self, failures: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.threshold, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.consecutive = 0  # failed calls since the last success
        self.opened_at: float | None = None  # None: closed
        self.probing = False  # the half-open probe is in flight
        self.skipped = 0  # calls skipped while open, since start

    @property
    def state(self) -> Literal["closed", "open", "half-open"]:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.probing or self.retry_in() == 0 else "open"

    def retry_in(self) -> float:
        """Seconds until the circuit lets a probe through (0: now, or closed)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self.clock())

    def allow(self) -> Literal["call", "probe", "skip"]:
        """Whether a call may go now: ``probe`` for the one call of a half-open circuit."""
        if self.opened_at is None:
            return "call"
        if self.probing or self.retry_in() > 0:
            self.skipped += 1
            return "skip"
        self.probing = True
        return "probe"

    def success(self, ticket: str) -> None:
        self.consecutive, self.opened_at = 0, None
        if ticket == "probe":
            self.probing = False

    def failure(self, ticket: str) -> None:
        self.consecutive += 1
        if ticket == "probe":  # still down: another cool-down
            self.probing, self.opened_at = False, self.clock()
        elif self.opened_at is None and self.threshold and self.consecutive >= self.threshold:
            self.opened_at = self.clock()

    def release(self, ticket: str) -> None:
        """A call that says nothing about the upstream (cancelled, never sent)."""
        if ticket == "probe":
            self.probing = False


def _unhealthy(e: UpstreamError) -> bool | None:
    """Whether a failed call counts against the upstream's circuit: True (down, slow, 5xx,
    429, malformed), False (a 4xx: it answered) or None (never sent: no evidence)."""
    if e.attempts == 0:
        return None
    return not (e.status is not None and 400 <= e.status < 500 and e.status != 429)


# ------------------------------------------------------------------------------ internals


class _AttemptFailed(Exception):
    def __init__(self, reason: str, *, retry: bool, after_s: float | None = None,
                 status: int | None = None):
        super().__init__(reason)
        self.reason, self.retry, self.after_s, self.status = reason, retry, after_s, status


class _Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()


def _retry_after(resp: httpx.Response) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), None when absent or unreadable."""
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _status_failure(resp: httpx.Response, text: str) -> _AttemptFailed:
    code = resp.status_code
    snippet = " ".join(text.split())[:200]
    reason = f"HTTP {code}" + (f": {snippet}" if snippet else "")
    if code == 429 or code >= 500:
        return _AttemptFailed(reason, retry=True, after_s=_retry_after(resp), status=code)
    return _AttemptFailed(reason, retry=False, status=code)


def _transport_failure(e: Exception, limit: float) -> _AttemptFailed:
    if isinstance(e, httpx.ConnectTimeout):
        return _AttemptFailed(f"connect timeout after {limit:.3g}s", retry=True)
    if isinstance(e, TimeoutError | httpx.TimeoutException):
        return _AttemptFailed(f"timeout after {limit:.3g}s (raise timeout_s if the upstream "
                              "is just slow)", retry=False)
    if isinstance(e, httpx.ConnectError):
        return _AttemptFailed(f"cannot connect ({e or type(e).__name__})", retry=True)
    if isinstance(e, httpx.TransportError):
        return _AttemptFailed(f"connection error ({type(e).__name__}: {e})", retry=True)
    return _AttemptFailed(f"request failed ({type(e).__name__}: {e})", retry=False)


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # multi-part content: the text parts
        return sum(len(str(p.get("text", ""))) for p in content if isinstance(p, dict))
    return 0


def _estimate_tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def _prompt_chars(body: Mapping[str, Any]) -> int:
    msgs = body.get("messages")
    return sum(_text_chars(m.get("content")) for m in msgs if isinstance(m, dict)) \
        if isinstance(msgs, list) else 0


def _usage_from(obj: Any) -> tuple[int, int] | None:
    if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
        u = obj["usage"]
        p, c = u.get("prompt_tokens"), u.get("completion_tokens")
        if isinstance(p, int) and isinstance(c, int):
            return p, c
    return None


_CONTENT_KEYS = ("content", "tool_calls", "function_call", "refusal")


def _has_content(chunk: Mapping[str, Any]) -> bool:
    """Whether handing this chunk out commits the answer to this upstream."""
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") is not None:
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(k) for k in _CONTENT_KEYS):
            return True
    return False


def _chunk_chars(chunk: Mapping[str, Any]) -> int:
    n = 0
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict):
            n += _text_chars(delta.get("content"))
            for call in delta.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    n += len(str(fn.get("arguments") or ""))
    return n


class _OpenStream:
    """An SSE response being read: events parsed into chunk dicts, held in ``buffer`` until
    they are handed out."""

    def __init__(self, resp: httpx.Response):
        self.resp = resp
        self.lines = resp.aiter_lines()
        self.buffer: collections.deque[dict[str, Any]] = collections.deque()
        self.done = False  # [DONE], or end of stream after a finish_reason
        self.saw_finish = False
        self.has_content = False
        self.usage: tuple[int, int] | None = None
        self.completion_chars = 0

    async def next_event(self) -> str | None:
        """The next event's data (data: lines joined), None at end of stream."""
        data: list[str] = []
        async for line in self.lines:
            if not line.strip():
                if data:
                    return "\n".join(data)
                continue
            if line.startswith(":"):
                continue  # SSE comment (keep-alive)
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value[1:] if value.startswith(" ") else value)
        return "\n".join(data) if data else None

    async def read_one(self) -> None:
        """Read one event into ``buffer`` (or set ``done``); raise _AttemptFailed."""
        payload = await self.next_event()
        if payload is None:
            if self.saw_finish:
                self.done = True
                return
            raise _AttemptFailed("stream ended without [DONE] or a finish_reason", retry=True)
        if payload.strip() == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise _AttemptFailed(f"malformed stream event {payload[:100]!r}", retry=False) from None
        if not isinstance(chunk, dict):
            raise _AttemptFailed(f"malformed stream event {payload[:100]!r}", retry=False)
        if "error" in chunk:
            err = chunk["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise _AttemptFailed(f"upstream sent an error event: {str(msg)[:200]}", retry=True)
        usage = _usage_from(chunk)
        if usage is not None:
            self.usage = usage
        self.completion_chars += _chunk_chars(chunk)
        if any(isinstance(c, dict) and c.get("finish_reason") is not None
               for c in chunk.get("choices") or ()):
            self.saw_finish = True
        self.has_content = self.has_content or _has_content(chunk)
        self.buffer.append(chunk)

    async def aclose(self) -> None:
        await self.resp.aclose()


class UpstreamStream:
    """A streaming answer, opened up to its first content chunk. Iterate it for the chunk
    dicts; afterwards :attr:`usage` holds the token counts. Call :meth:`aclose` (or iterate
    to the end) so the connection is released."""

    def __init__(self, upstream: str, cfg: UpstreamConfig, open_: _OpenStream, *,
                 attempts: int, started: float, prompt_chars: int, client_wants_usage: bool):
        self.upstream = upstream
        self.attempts = attempts
        self.failures: list[UpstreamError] = []
        self.first_content_ms = (time.monotonic() - started) * 1000
        self.latency_ms: float | None = None  # set when the stream ends
        self._cfg, self._open, self._started = cfg, open_, started
        self._prompt_chars = prompt_chars
        self._client_wants_usage = client_wants_usage
        self._finished = False

    @property
    def usage(self) -> Usage:
        """The upstream's usage when it sent one, else an estimate from what was read."""
        if self._open.usage is not None:
            return Usage(*self._open.usage)
        return Usage(_estimate_tokens(self._prompt_chars),
                     _estimate_tokens(self._open.completion_chars), estimated=True)

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        o = self._open
        while True:
            if o.buffer:
                chunk = o.buffer.popleft()
                if self._client_wants_usage:
                    return chunk
                # the usage was asked for by us, not by the client: keep it out of its stream
                if "usage" in chunk:
                    chunk = {k: v for k, v in chunk.items() if k != "usage"}
                    if not chunk.get("choices"):
                        continue
                return chunk
            if o.done or self._finished:
                await self._finish()
                raise StopAsyncIteration
            try:
                async with asyncio.timeout(self._cfg.gap_s):
                    await o.read_one()
            except (_AttemptFailed, TimeoutError, httpx.HTTPError) as e:
                reason = e.reason if isinstance(e, _AttemptFailed) else \
                    (f"no chunk for {self._cfg.gap_s:g}s (stream_gap_s)"
                     if isinstance(e, TimeoutError | httpx.TimeoutException)
                     else f"{type(e).__name__}: {e}")
                await self._finish()
                raise StreamInterrupted(self.upstream, reason, self.usage) from None

    async def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.latency_ms = (time.monotonic() - self._started) * 1000
            await self._open.aclose()

    async def aclose(self) -> None:
        """Release the connection (e.g. when the client went away mid-stream)."""
        await self._finish()


# --------------------------------------------------------------------------------- client


class UpstreamClient:
    """Calls to the upstreams named in a routes config; one pooled httpx client for all.

    ``client`` replaces the internal httpx client (the caller closes it); ``env`` replaces
    ``os.environ`` for API keys; ``rng`` drives the backoff jitter (tests seed it).
    """

    def __init__(self, upstreams: Mapping[str, UpstreamConfig], *,
                 client: httpx.AsyncClient | None = None,
                 env: Mapping[str, str] | None = None, rng: random.Random | None = None):
        self.upstreams = dict(upstreams)
        self._own_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(
            timeout=None, follow_redirects=False,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self._env = env
        self._rng = rng or random.Random()
        self.breakers = {name: CircuitBreaker(cfg.circuit_failures, cfg.circuit_cooldown_s)
                         for name, cfg in self.upstreams.items()}

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- set-up of one call

    def _config(self, name: str) -> UpstreamConfig:
        try:
            return self.upstreams[name]
        except KeyError:
            raise ConfigError(f"no upstream named {name!r} (upstreams: "
                              f"{', '.join(sorted(self.upstreams)) or 'none'})") from None

    def headers(self, name: str) -> dict[str, str]:
        """Request headers of upstream ``name``; reads its API key from the environment now."""
        cfg = self._config(name)
        headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            env = self._env if self._env is not None else os.environ
            key = env.get(cfg.api_key_env)
            if not key:
                raise UpstreamKeyMissing(
                    f"upstreams.{name}.api_key_env: environment variable {cfg.api_key_env} is "
                    f"not set; export it with the API key of {cfg.base_url} before "
                    "`fleetlm serve`, or remove api_key_env for an endpoint without keys")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def missing_keys(self) -> list[str]:
        """One message per upstream whose key variable is unset (for a start-up warning)."""
        out = []
        for name in self.upstreams:
            try:
                self.headers(name)
            except UpstreamKeyMissing as e:
                out.append(str(e))
        return out

    @staticmethod
    def _body(cfg: UpstreamConfig, body: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        out = dict(body)
        out["model"] = cfg.model
        if stream:
            out["stream"] = True
            options = out.get("stream_options")
            out["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                     "include_usage": True}
        else:
            out.pop("stream", None)
            out.pop("stream_options", None)
        return out

    def _request(self, name: str, body: Mapping[str, Any], stream: bool
                 ) -> tuple[UpstreamConfig, dict[str, str], dict[str, Any], str]:
        """What one call to upstream ``name`` sends: its config, headers, body and URL."""
        cfg = self._config(name)
        return (cfg, self.headers(name), self._body(cfg, body, stream),
                cfg.base_url + "/chat/completions")

    # -- retries

    async def _with_retries(self, name: str, cfg: UpstreamConfig, deadline: _Deadline,
                            attempt: Callable[[float], Awaitable[T]]) -> tuple[T, int]:
        """Run ``attempt(limit_s)`` until it succeeds or may not be retried."""
        last: _AttemptFailed | None = None
        tries = 0
        for k in range(cfg.max_attempts):
            limit = min(cfg.timeout_s, deadline.remaining())
            if limit <= 0:
                last = last or _AttemptFailed("not tried: the route's deadline_s was reached",
                                              retry=False)
                break
            tries += 1
            try:
                return await attempt(limit), tries
            except _AttemptFailed as f:
                last = f
            if not last.retry or k + 1 == cfg.max_attempts:
                break
            if last.after_s is not None:
                if last.after_s > cfg.max_backoff_s:
                    last.reason += (f" (Retry-After {last.after_s:g}s is above max_backoff_s "
                                    f"{cfg.max_backoff_s:g}s: not waiting)")
                    break
                wait = last.after_s
            else:
                wait = min(cfg.max_backoff_s, cfg.backoff_s * 2**k) * (0.5 + 0.5 * self._rng.random())
            if wait >= deadline.remaining():
                last.reason += " (no time left for a retry within deadline_s)"
                break
            await asyncio.sleep(wait)
        assert last is not None
        plural = "attempt" if tries == 1 else "attempts"
        raise UpstreamError(name, f"{last.reason} [{tries} {plural}]", status=last.status,
                            attempts=tries)

    # -- one upstream

    async def chat(self, name: str, body: Mapping[str, Any], *,
                   deadline_s: float | None = None) -> UpstreamResponse:
        """A non-streaming chat completion from upstream ``name`` (retries included).
        Raises UpstreamError (CircuitOpen when its circuit is open), or UpstreamKeyMissing
        when its key variable is unset."""
        result = await self._guarded(name, body, _Deadline(deadline_s), stream=False)
        assert isinstance(result, UpstreamResponse)
        return result

    async def _chat(self, name: str, body: Mapping[str, Any],
                    deadline: _Deadline) -> UpstreamResponse:
        cfg, headers, payload, url = self._request(name, body, stream=False)

        async def attempt(limit: float) -> dict[str, Any]:
            try:
                async with asyncio.timeout(limit):
                    resp = await self._client.post(url, json=payload, headers=headers,
                                                   timeout=httpx.Timeout(limit))
            except (TimeoutError, httpx.HTTPError) as e:
                raise _transport_failure(e, limit) from None
            if resp.status_code != 200:
                raise _status_failure(resp, resp.text)
            try:
                data = resp.json()
            except ValueError:
                raise _AttemptFailed("answer is not JSON", retry=False) from None
            if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
                raise _AttemptFailed("answer is not an OpenAI chat completion (no choices)",
                                     retry=False)
            return data

        started = time.monotonic()
        data, tries = await self._with_retries(name, cfg, deadline, attempt)
        usage = _usage_from(data)
        if usage is not None:
            u = Usage(*usage)
        else:
            chars = sum(_text_chars((c.get("message") or {}).get("content"))
                        for c in data["choices"] if isinstance(c, dict))
            u = Usage(_estimate_tokens(_prompt_chars(body)), _estimate_tokens(chars),
                      estimated=True)
        return UpstreamResponse(upstream=name, response=data, usage=u, attempts=tries,
                                latency_ms=(time.monotonic() - started) * 1000)

    async def stream_chat(self, name: str, body: Mapping[str, Any], *,
                          deadline_s: float | None = None) -> UpstreamStream:
        """A streaming chat completion from upstream ``name``, opened up to its first content
        chunk (retries included). Failures before that raise UpstreamError; iterating the
        result may raise StreamInterrupted."""
        result = await self._guarded(name, body, _Deadline(deadline_s), stream=True)
        assert isinstance(result, UpstreamStream)
        return result

    async def _guarded(self, name: str, body: Mapping[str, Any], deadline: _Deadline, *,
                       stream: bool) -> UpstreamResponse | UpstreamStream:
        """One call to upstream ``name`` through its circuit breaker (CircuitOpen: skipped)."""
        self._config(name)  # an unknown name: ConfigError
        breaker = self.breakers[name]
        ticket = breaker.allow()
        if ticket == "skip":
            raise CircuitOpen(name, breaker.consecutive, breaker.retry_in())
        try:
            result: UpstreamResponse | UpstreamStream = (
                await self._stream(name, body, deadline) if stream
                else await self._chat(name, body, deadline))
        except UpstreamError as e:
            verdict = _unhealthy(e)
            if verdict is None:
                breaker.release(ticket)
            elif verdict:
                breaker.failure(ticket)
            else:
                breaker.success(ticket)
            raise
        except BaseException:  # a missing key, or cancelled: nothing learnt about the upstream
            breaker.release(ticket)
            raise
        breaker.success(ticket)
        return result

    async def _stream(self, name: str, body: Mapping[str, Any],
                      deadline: _Deadline) -> UpstreamStream:
        cfg, headers, payload, url = self._request(name, body, stream=True)
        client_options = body.get("stream_options")
        wants_usage = isinstance(client_options, dict) and bool(client_options.get("include_usage"))

        async def attempt(limit: float) -> _OpenStream:
            resp: httpx.Response | None = None
            try:
                async with asyncio.timeout(limit):
                    # reads unbounded here: asyncio bounds the first content by `limit`,
                    # UpstreamStream each later gap by stream_gap_s
                    request = self._client.build_request("POST", url, json=payload,
                                                         headers=headers,
                                                         timeout=httpx.Timeout(limit, read=None))
                    resp = await self._client.send(request, stream=True)
                    if resp.status_code != 200:
                        text = (await resp.aread()).decode("utf-8", "replace")
                        raise _status_failure(resp, text)
                    ctype = resp.headers.get("content-type", "")
                    if "text/event-stream" not in ctype:
                        raise _AttemptFailed(f"asked for a stream, got content-type {ctype!r}",
                                             retry=False)
                    o = _OpenStream(resp)
                    while not (o.has_content or o.done):
                        await o.read_one()
                    return o
            except _AttemptFailed:
                if resp is not None:
                    await resp.aclose()
                raise
            except (TimeoutError, httpx.HTTPError) as e:
                if resp is not None:
                    await resp.aclose()
                raise _transport_failure(e, limit) from None
            except BaseException:  # cancelled: release the connection, then re-raise
                if resp is not None:
                    await resp.aclose()
                raise

        started = time.monotonic()
        o, tries = await self._with_retries(name, cfg, deadline, attempt)
        return UpstreamStream(name, cfg, o, attempts=tries, started=started,
                              prompt_chars=_prompt_chars(body), client_wants_usage=wants_usage)

    # -- the chain

    @overload
    async def first_available(self, chain: Sequence[str], body: Mapping[str, Any], *,
                              stream: Literal[False] = False,
                              deadline_s: float | None = None) -> UpstreamResponse: ...

    @overload
    async def first_available(self, chain: Sequence[str], body: Mapping[str, Any], *,
                              stream: Literal[True],
                              deadline_s: float | None = None) -> UpstreamStream: ...

    async def first_available(self, chain: Sequence[str], body: Mapping[str, Any], *,
                              stream: bool = False, deadline_s: float | None = None
                              ) -> UpstreamResponse | UpstreamStream:
        """The first upstream of ``chain`` that answers; ``.failures`` lists those before it.
        Raises UpstreamUnavailable (every failure, a missing API key and a skip for an open
        circuit included) when none does.
        ``deadline_s`` bounds the whole chain, retries included (not the stream after its
        first content chunk)."""
        deadline = _Deadline(deadline_s)
        failures: list[UpstreamError] = []
        for name in chain:
            if deadline.remaining() <= 0:
                failures.append(UpstreamError(name, "not tried: the route's deadline_s was "
                                                    "reached"))
                continue
            try:
                result = await self._guarded(name, body, deadline, stream=stream)
            except UpstreamError as e:  # CircuitOpen included: skipped at once
                failures.append(e)
                continue
            except ConfigError as e:  # a missing key or an unknown name: this upstream's fault
                failures.append(UpstreamError(name, str(e)))
                continue
            result.failures = failures
            return result
        raise UpstreamUnavailable(failures)
