"""The local-model path: an OpenAI request in, engine requests out, OpenAI JSON back.

:class:`LocalModel` does, for one server, what both /v1 endpoints and the hybrid router
need: read the ``model`` field (the base model, an adapter, ``base:adapter``), render the
prompt (the chat template through :func:`fleetlm.models.chat.chat_ids`, or the tokenizer),
build each choice's :class:`~fleetlm.engine.sampling_params.SamplingParams`, submit the
``n`` choices so refusals raise before any response byte, and turn the event streams into
a response body or SSE chunks, logprobs included.

Validation is not repeated here: the engine checks sampling settings, prompt length and
ids and the adapter (through the store) when a request is submitted, and
:mod:`fleetlm.server.errors` maps its errors. What only text has is checked here, before
any work: a prompt's size in characters (``max_len * PROMPT_CHARS_PER_TOKEN``), so a huge
string is refused without being tokenised; and a large prompt is tokenised (or rendered by
the chat template) on a worker thread, never on the event loop that serves every client. This module knows OpenAI shapes, the tokenizer and the engine's event
stream; it does not know routes, upstreams or HTTP routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fleetlm.adapters.peft_format import valid_adapter_name
from fleetlm.engine.engine import Engine, EngineEvent
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.models.chat import chat_ids, has_chat_template
from fleetlm.server.errors import INVALID_REQUEST, APIError, error_body, generation_failed
from fleetlm.server.metrics import ServerMetrics
from fleetlm.server.protocol import ChatCompletionRequest, CompletionRequest, usage

if TYPE_CHECKING:
    from starlette.requests import Request

DEFAULT_MAX_TOKENS = 256  # chat, when the request sets no max_tokens (completions: 16)
# A prompt's characters, at most, per token of the engine's context (max_len), checked before
# tokenising. Generous: English runs ~4 characters a token, and any prompt near the limit
# is refused by its token count anyway. 2048 tokens: 32,768 characters, ~50 ms to tokenise.
PROMPT_CHARS_PER_TOKEN = 16
# Prompts shorter than this are tokenised on the event loop. Measured on the development
# machine (SmolLM2's tokenizer): 200 characters take 0.26 ms inline and 0.35 ms through
# asyncio.to_thread, so the hop costs more than it saves; 4,096 characters block the loop
# 3.3 ms. Longer prompts go to a thread: the Rust tokenizer releases the GIL while it works
# (a 1.3M-character prompt took 1.8 s in a thread; the loop's longest stall was 0.17 s).
INLINE_TOKENISE_CHARS = 1024

Streams = list[AsyncIterator[EngineEvent]]
# How often a non-streaming request checks that its client is still there (seconds): the
# longest a gone client's request keeps generating, plus one engine step.
DISCONNECT_POLL_S = 0.25
CLIENT_CLOSED = 499  # the status logged for a request whose client left (as nginx)


class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer was ready."""



def adapter_of(model: str, model_name: str, store: Any) -> str | None:
    """The adapter a ``model`` field names on a server running ``model_name`` with ``store``
    (None: the base model). An unknown base, or an adapter on a server with no store: 404.
    Whether the adapter exists and is valid is the store's to say (the engine asks it)."""
    if model == model_name:
        return None
    adapter = model
    if ":" in model:
        base, adapter = model.split(":", 1)
        if base != model_name:
            raise APIError(404, f"model {model!r}: unknown base {base!r} (this server runs "
                                f"{model_name!r})", INVALID_REQUEST, "model", "model_not_found")
    if store is None:
        raise APIError(404, f"model {model!r} does not exist; this server serves "
                            f"{model_name!r} and no adapters", INVALID_REQUEST,
                       "model", "model_not_found")
    if not valid_adapter_name(adapter):  # cannot be in the store: no model of that name
        raise APIError(404, f"model {model[:100]!r} does not exist (GET /v1/models lists the "
                            "models this server serves)", INVALID_REQUEST, "model",
                       "model_not_found")
    return str(adapter)


class LocalModel:
    """The engine's model (and its adapters) answering OpenAI requests.

    ``open_*`` submits a request (prompt ids, one event stream per choice, each counted by
    the server metrics); ``*_body`` builds the JSON of finished choices, ``*_chunks`` the
    SSE payloads of running ones; ``collect`` drains one stream."""

    def __init__(self, engine: Engine, model_name: str, metrics: ServerMetrics,
                 max_prompt_chars: int | None = None) -> None:
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.tok = engine.lm.tokenizer
        self._max_prompt_chars = max_prompt_chars  # None: max_len * PROMPT_CHARS_PER_TOKEN

    @property
    def max_prompt_chars(self) -> int:
        """The longest prompt (characters of text, all chat messages together) tokenised."""
        if self._max_prompt_chars is not None:
            return self._max_prompt_chars
        return self.engine.config.max_len * PROMPT_CHARS_PER_TOKEN

    def check_prompt_size(self, chars: int, param: str) -> None:
        """Refuse a prompt over :attr:`max_prompt_chars` before anything reads it."""
        limit = self.max_prompt_chars
        if chars > limit:
            raise APIError(400, f"{param}: {chars:,} characters is over this server's limit of "
                                f"{limit:,} characters for a prompt (its context is "
                                f"{self.engine.config.max_len:,} tokens); send a shorter "
                                "prompt", INVALID_REQUEST, param)

    @staticmethod
    async def off_loop(chars: int, fn: Callable[..., list[int]], *args: Any) -> list[int]:
        """``fn(*args)`` (tokenising ``chars`` characters): inline when short, else on a
        worker thread (see INLINE_TOKENISE_CHARS)."""
        if chars < INLINE_TOKENISE_CHARS:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    # -- submitting ----------------------------------------------------------------------

    def adapter(self, model: str) -> str | None:
        return adapter_of(model, self.model_name, self.engine.store)

    @staticmethod
    def sampling(req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
                 logprobs: int | None, seed: int | None, prompt_logprobs: int | None = None,
                 ) -> SamplingParams:
        """One choice's settings, as sent (the engine validates them when it is submitted)."""
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return SamplingParams(max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
                              prompt_logprobs=prompt_logprobs,
                              temperature=req.temperature, top_p=req.top_p, seed=seed,
                              stop=stop, presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty,
                              logprobs=logprobs, response_format=req.response_format,
                              ignore_eos=req.ignore_eos)

    @staticmethod
    def seeds(req: ChatCompletionRequest | CompletionRequest) -> list[int | None]:
        return [None if req.seed is None else req.seed + i for i in range(req.n)]

    async def start(self, ids: list[int], params: SamplingParams, adapter: str | None,
                    ) -> AsyncIterator[EngineEvent]:
        """Submit now (so errors surface before any response byte) and return the stream."""
        gen = self.engine.stream(ids, params, adapter=adapter)
        first = await gen.__anext__()  # raises ConfigError / EngineBusy / AdapterError

        async def rest() -> AsyncIterator[EngineEvent]:
            yield first
            async for ev in gen:
                yield ev
        return rest()

    async def start_all(self, ids: list[int], params: list[SamplingParams], adapter: str | None,
                        ) -> Streams:
        """Submit the n choices together; if any is refused, cancel the others."""
        got = await asyncio.gather(*(self.start(ids, p, adapter) for p in params),
                                   return_exceptions=True)
        errors = [g for g in got if isinstance(g, BaseException)]
        if errors:
            for g in got:
                if not isinstance(g, BaseException):
                    await g.aclose()  # type: ignore[attr-defined]
            raise errors[0]
        return list(got)  # type: ignore[arg-type]

    @staticmethod
    async def collect(stream: AsyncIterator[EngineEvent]) -> list[EngineEvent]:
        return [ev async for ev in stream]

    async def collect_all(self, streams: Streams, client: Request | None = None,
                          ) -> list[list[EngineEvent]]:
        """Every choice's events. With ``client``, its connection is checked every
        ``DISCONNECT_POLL_S``: if it has gone, the choices are cancelled (closing a stream
        cancels its engine request, whose KV row is freed at the next step) and
        :class:`ClientGone` is raised."""
        work = asyncio.ensure_future(asyncio.gather(*(self.collect(s) for s in streams)))
        try:
            while True:
                await asyncio.wait([work], timeout=None if client is None else DISCONNECT_POLL_S)
                if work.done():
                    return list(work.result())
                if client is not None and await client.is_disconnected():
                    raise ClientGone
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work

    # -- chat ----------------------------------------------------------------------------

    async def open_chat(self, req: ChatCompletionRequest) -> tuple[list[int], Streams]:
        """Submit a chat request for ``req.model`` (base or adapter): its prompt ids and one
        event stream per choice. Refusals raise before anything is generated."""
        adapter = self.adapter(req.model)
        if not has_chat_template(self.tok):
            raise APIError(400, f"model {self.model_name!r} has no chat template; use "
                                "/v1/completions", INVALID_REQUEST, "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        chars = sum(len(m["role"]) + len(m["content"]) for m in messages)
        self.check_prompt_size(chars, "messages")
        ids = await self.off_loop(chars, chat_ids, self.tok, messages)
        k = (req.top_logprobs or 0) if req.logprobs else None
        track = self.metrics.request(req.model, len(ids))
        params = [self.sampling(req, req.max_completion_tokens or req.max_tokens or None, k, s)
                  for s in self.seeds(req)]
        return ids, [track.wrap(st) for st in await self.start_all(ids, params, adapter)]

    def chat_body(self, req: ChatCompletionRequest, ids: list[int],
                  results: list[list[EngineEvent]]) -> dict[str, Any]:
        """The chat.completion JSON of finished choices."""
        choices, completion = [], 0
        for i, evs in enumerate(results):
            _check_end(evs[-1])
            completion += evs[-1].completion_tokens
            choices.append({"index": i, "message": {"role": "assistant",
                                                    "content": "".join(e.text for e in evs)},
                            "logprobs": self.chat_logprobs(evs) if req.logprobs else None,
                            "finish_reason": evs[-1].finish_reason})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": req.model, "choices": choices,
                "usage": usage(len(ids), completion)}

    async def chat_chunks(self, req: ChatCompletionRequest, streams: Streams
                          ) -> AsyncIterator[dict[str, Any]]:
        """The chat.completion.chunk payloads of running choices."""
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": req.model}
        for i in range(len(streams)):
            yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}

        def choice(i: int, ev: EngineEvent) -> dict[str, Any] | None:
            delta = {"content": ev.text} if ev.token_id is not None else {}
            if not (delta or ev.finish_reason):
                return None
            lp = self.chat_logprobs([ev]) if req.logprobs and ev.token_id is not None else None
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        async for chunk in _chunks(streams, base, include_usage, choice):
            yield chunk

    # -- completions ---------------------------------------------------------------------

    async def open_completion(self, req: CompletionRequest
                              ) -> tuple[list[int], str | None, Streams]:
        """Submit a completion request: its prompt ids, the text echoed before each answer
        (None without ``echo``) and one event stream per choice."""
        adapter = self.adapter(req.model)
        prompt_text = None
        if isinstance(req.prompt, list) and req.prompt and all(isinstance(t, int) for t in req.prompt):
            ids = [int(t) for t in req.prompt]  # token ids, as OpenAI allows
        else:
            prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            if len(prompts) != 1 or not isinstance(prompts[0], str):
                raise APIError(400, "prompt: send one prompt (a string or a list of token ids) "
                                    "per request", INVALID_REQUEST, "prompt")
            if self.tok is None:
                raise APIError(400, "this model has no tokenizer", INVALID_REQUEST, "prompt")
            prompt_text = prompts[0]
            self.check_prompt_size(len(prompt_text), "prompt")
            ids = await self.off_loop(len(prompt_text), _encode, self.tok, prompt_text)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: must be >= 1 (0 only with echo, to score the "
                                "prompt)", INVALID_REQUEST, "max_tokens")
        # echo: the prompt comes back with the answer; with logprobs, every prompt token's
        # logprob (the engine scores the prompt in its prefill)
        plp = (req.logprobs if req.logprobs is not None else 0) if req.echo else None
        track = self.metrics.request(req.model, len(ids))
        params = [self.sampling(req, 16 if req.max_tokens is None else req.max_tokens,
                                req.logprobs, s, plp) for s in self.seeds(req)]
        streams = [track.wrap(st) for st in await self.start_all(ids, params, adapter)]
        if req.echo and prompt_text is None:  # ids, checked by the engine: their text
            prompt_text = self.token_text_of(ids)
        return ids, (prompt_text if req.echo else None), streams

    def completion_body(self, req: CompletionRequest, ids: list[int], echo: str | None,
                        results: list[list[EngineEvent]]) -> dict[str, Any]:
        """The text_completion JSON of finished choices."""
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices, completion = [], 0
        for i, evs in enumerate(results):
            _check_end(evs[-1])
            completion += evs[-1].completion_tokens
            text = (echo or "") + "".join(e.text for e in evs)
            lp = self.completion_logprobs(evs, ids if req.echo else None) \
                if req.logprobs is not None else None
            choices.append({"index": i, "text": text, "logprobs": lp,
                            "finish_reason": evs[-1].finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage(len(ids), completion)}

    async def completion_chunks(self, req: CompletionRequest, ids: list[int], echo: str | None,
                                streams: Streams) -> AsyncIterator[dict[str, Any]]:
        """The text_completion payloads of running choices; the echoed prompt rides on each
        choice's first chunk."""
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": req.model}
        echoed: set[int] = set()

        def choice(i: int, ev: EngineEvent) -> dict[str, Any] | None:
            if ev.token_id is None and not ev.finish_reason:
                return None
            first = echo is not None and i not in echoed
            echoed.add(i)
            lp = self.completion_logprobs([ev], ids if first else None) \
                if req.logprobs is not None else None
            text = ((echo or "") if first else "") + ev.text
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        async for chunk in _chunks(streams, base, include_usage, choice):
            yield chunk

    # -- logprobs ------------------------------------------------------------------------

    def token_text(self, i: int) -> str:
        return str(self.tok.decode([i])) if self.tok is not None else ""

    def token_text_of(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids)) if self.tok is not None else ""

    def completion_logprobs(self, events: list[EngineEvent], prompt: list[int] | None
                            ) -> dict[str, Any]:
        """Legacy completions logprobs; with ``prompt`` (echo) the prompt's tokens come first,
        the first of them with no logprob (nothing precedes it)."""
        toks: list[int] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if prompt is not None:
            scored = next((e.prompt_logprobs for e in events if e.prompt_logprobs is not None), [])
            toks += prompt
            lps += [None] + [lp for lp, _ in scored]
            tops += [None] + [{self.token_text(t): v for t, v in alts} for _, alts in scored]
        for e in events:
            if e.token_id is not None:
                toks.append(e.token_id)
                lps.append(e.logprob)
                tops.append({self.token_text(t): v for t, v in e.top_logprobs})
        texts = [self.token_text(t) for t in toks]
        offsets, at = [], 0
        for t in texts:
            offsets.append(at)
            at += len(t)
        return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, events: list[EngineEvent]) -> dict[str, Any]:
        content = []
        for ev in events:
            if ev.token_id is None or ev.logprob is None:
                continue
            t = self.token_text(ev.token_id)
            content.append({"token": t, "logprob": ev.logprob, "bytes": list(t.encode()),
                            "top_logprobs": [{"token": self.token_text(i), "logprob": lp,
                                              "bytes": list(self.token_text(i).encode())}
                                             for i, lp in ev.top_logprobs]})
        return {"content": content}


# ------------------------------------------------------------------------------ helpers


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


def _check_end(ev: EngineEvent) -> None:
    if ev.finish_reason == "error":
        raise generation_failed(ev.error)


async def _merged(streams: Streams) -> AsyncIterator[tuple[int, EngineEvent]]:
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


async def _chunks(streams: Streams, base: dict[str, Any], include_usage: bool,
                  choice: Callable[[int, EngineEvent], dict[str, Any] | None],
                  ) -> AsyncIterator[dict[str, Any]]:
    """SSE payloads of n merged streams: ``choice(index, event)`` (None: nothing to send),
    an error body if a request fails, and a final usage chunk when asked for."""
    prompt, completion = 0, 0
    async for i, ev in _merged(streams):
        if ev.finish_reason == "error":
            yield error_body(generation_failed(ev.error))
            return
        c = choice(i, ev)
        if c is not None:
            yield {**base, "choices": [c]}
        if ev.finish_reason:
            prompt = ev.prompt_tokens
            completion += ev.completion_tokens
    if include_usage:
        yield {**base, "choices": [], "usage": usage(prompt, completion)}
