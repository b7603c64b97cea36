"""The engine: requests in, tokens out, many adapters batched together.

    submit() -> scheduler (plain Python) -> runner (model forward, multi-LoRA)
             -> per-request sampler + detokenizer -> events back to the caller

One background thread runs the loop; callers on any thread (the server's event loop)
submit, cancel and receive :class:`EngineEvent`\\ s through a callback, or use the
async iterator :meth:`Engine.stream`. The scheduler is guarded by a lock that the loop
holds only between forwards, so a submit or a cancel never waits for a forward.

Memory: the KV cache is one preallocated row of ``max_len`` positions per running
sequence (``max_running`` rows, or as many as ``kv_cache_bytes`` holds). Slots rather
than pages because the models are small: SmolLM2-135M needs 23 KB of bf16 K/V per
token, so 32 sequences of 2048 positions are 1.5 GB, and a full-length reservation at
admission means a running request can never run out of cache mid-generation -- no
preemption, no recomputation. Rows keep the decode batch contiguous (see
:mod:`fleetlm.engine.rows`), and contiguous K/V per sequence is what the CPU attention
reads fastest. Paging would pay off for many long-context sequences on a bigger model.

Back-pressure: at most ``max_waiting`` requests wait; beyond that :meth:`Engine.submit`
raises :class:`~fleetlm.errors.EngineBusy` (the server turns it into HTTP 429).
Cancellation: a waiting request is dropped at once; a running one is removed at the
next step boundary (one forward at most, tens of milliseconds) and its cache row is
freed then.

Isolation: one request cannot fail the others. Prompt ids outside the vocabulary are
refused at :meth:`Engine.submit`. An adapter that fails to load fails only its own
requests. A forward that raises is run again in parts -- the decode rows together (one
forward over a view of cache rows ``0..n-1``, which cannot be split), then each prefill
chunk alone -- and only the parts that fail on their own fail their requests; a sampler or
a callback that raises fails its own request. Only an error in the engine's bookkeeping,
after which its state is unknown, fails every request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from fleetlm.adapters.errors import AdapterError
from fleetlm.adapters.store import AdapterStore
from fleetlm.engine.detokenizer import Detokenizer
from fleetlm.engine.draft_model import DraftModel, check_compatible
from fleetlm.engine.lora import NO_ADAPTER
from fleetlm.engine.prefix_cache import PrefixCache, PrefixHit
from fleetlm.engine.runner import DecodeItem, ModelRunner, PrefillItem, StepOutput
from fleetlm.engine.sampler import RequestSampler, SampleResult
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.scheduler import Scheduler, SchedulerConfig, SeqStatus, Sequence, StepPlan
from fleetlm.engine.speculative import DraftStats, accept, propose
from fleetlm.errors import ConfigError, FleetLMError
from fleetlm.models.loader import LoadedModel

log = logging.getLogger(__name__)


# EngineConfig.lora_dtype: the hot adapters' buffers (see lora_buffer_dtype)
LORA_DTYPES = ("auto", "float32", "bfloat16", "int8")


@dataclass
class EngineConfig:
    max_running: int = 32  # sequences decoding at once (KV cache rows)
    max_waiting: int = 1024  # queued requests before submit() raises EngineBusy
    max_len: int = 2048  # prompt + generated tokens per sequence
    max_step_tokens: int = 512  # tokens per step: decodes + prefill chunks
    prefill_chunk: int = 512  # prompt tokens of one sequence per step
    max_hot_adapters: int = 32  # adapters in the stacked LoRA buffers (0: no adapters)
    # later requests that may be admitted ahead of a waiting one so that steps mix fewer
    # distinct adapters (engine/scheduler.py); 0: strict arrival order
    max_overtakes: int = 64
    max_lora_rank: int = 16
    # the hot adapters' buffers: "bfloat16" under a float32 model halves their memory and
    # the bytes a step reads per adapter (the delta is then computed in bfloat16); "auto"
    # picks it where the CPU has native bfloat16 (AVX512-BF16/AMX), where it is as fast,
    # else the model's dtype; or "float32"
    lora_dtype: str = "auto"
    kv_cache_bytes: int | None = None  # memory budget for the KV cache; caps max_running
    compile: bool = False  # torch.compile the decode step (fleetlm.models.compiled_decode)
    # keys and values of shared prompt prefixes, reused by later requests (0: off)
    prefix_cache_bytes: int = 256 << 20
    prefix_block: int = 32  # prefixes are reused in whole blocks of this many tokens
    # speculative decoding by prompt lookup (engine/speculative.py): draft tokens checked per
    # step for plain greedy requests (0: off), while at most spec_max_batch sequences decode
    speculative_tokens: int = 0
    spec_max_batch: int = 4

    def validate(self) -> None:
        problems = []
        for name in ("max_running", "max_waiting", "max_len", "max_step_tokens", "prefill_chunk",
                     "max_lora_rank"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)}: must be >= 1")
        if self.max_hot_adapters < 0:
            problems.append(f"max_hot_adapters={self.max_hot_adapters}: must be >= 0")
        if self.max_overtakes < 0:
            problems.append(f"max_overtakes={self.max_overtakes}: must be >= 0 (0: requests "
                            "are admitted in arrival order)")
        if self.prefix_cache_bytes < 0:
            problems.append(f"prefix_cache_bytes={self.prefix_cache_bytes}: must be >= 0 "
                            "(0 turns prefix caching off)")
        if self.speculative_tokens < 0 or self.spec_max_batch < 1:
            problems.append(f"speculative_tokens={self.speculative_tokens} must be >= 0 (0: "
                            f"off) and spec_max_batch={self.spec_max_batch} >= 1")
        if self.prefix_block < 1:
            problems.append(f"prefix_block={self.prefix_block}: must be >= 1")
        if self.lora_dtype not in LORA_DTYPES:
            problems.append(f"lora_dtype={self.lora_dtype!r}: one of {', '.join(LORA_DTYPES)}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            problems.append(f"kv_cache_bytes={self.kv_cache_bytes}: must be positive")
        if problems:
            raise ConfigError("invalid engine settings: " + "; ".join(problems))


def lora_buffer_dtype(setting: str, model_dtype: torch.dtype,
                      native_bf16: bool | None = None) -> torch.dtype:
    """The hot adapters' dtype for ``EngineConfig.lora_dtype`` under a model of
    ``model_dtype``: "auto" is bfloat16 under float32 where the CPU has native bfloat16
    (``native_bf16``; default: ask the CPU), else the model's; "float32"/"bfloat16" as
    asked, except that a bfloat16 model's adapters are bfloat16 (the kernel takes no
    float32 weights under bfloat16). Measured on an Ice Lake without AVX512-BF16, 64
    adapters at 32 clients: 147 tok/s with bfloat16 buffers, 149 with float32, so "auto"
    keeps the exact ones there (docs/engine.md). "int8": int8 with a scale per A row and
    per Bt column under either model dtype (half bfloat16's bytes; fleetlm::lora_sgmv_q8)."""
    if setting == "int8":
        return torch.int8
    if model_dtype == torch.bfloat16 or setting == "bfloat16":
        return torch.bfloat16
    if setting == "auto" and model_dtype == torch.float32:
        if native_bf16 is None:
            from fleetlm.models.loader import cpu_supports_bf16

            native_bf16 = cpu_supports_bf16()
        return torch.bfloat16 if native_bf16 else model_dtype
    return model_dtype


@dataclass
class EngineEvent:
    """One generated token, or the end of a request (``finish_reason`` set)."""

    request_id: str
    token_id: int | None
    text: str  # text that became safe to show with this token (may be "")
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: Exception | None = None  # set when finish_reason == "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # with SamplingParams.prompt_logprobs, on the request's first event: for prompt tokens
    # 1..P-1, (logprob given the tokens before it, top-k alternatives)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    # with logprobs and response_format: the token's logprob among the tokens the grammar
    # allowed (see SampleResult.constrained_logprob)
    constrained_logprob: float | None = None


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    adapter: str | None
    callback: Callable[[EngineEvent], object]
    sampler: RequestSampler
    detok: Detokenizer
    stop_ids: set[int]
    seq: Sequence
    submitted: float
    last_token: int = -1
    generated: int = 0
    done: bool = False
    prompt_lp: list[tuple[float, list[tuple[int, float]]]] | None = None  # being scored
    history: list[int] = field(default_factory=list)  # prompt + generated (speculation)
    drafts: DraftStats = field(default_factory=DraftStats)


class _Mailbox:
    """Events for one asyncio loop's streams, handed over once per batch, not per event.

    A decode step emits one event per running request; waking the loop for each of them
    (``call_soon_threadsafe`` writes to its self-pipe and runs a callback per event) costs
    the GIL the engine thread needs. Here the first event of a step schedules one drain and
    the rest just join the batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.items: deque[tuple[asyncio.Queue[EngineEvent], EngineEvent]] = deque()
        self.scheduled = False

    def post(self, queue: asyncio.Queue[EngineEvent], ev: EngineEvent) -> None:
        with self.lock:
            self.items.append((queue, ev))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _drain(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, deque(), False
        for queue, ev in items:
            queue.put_nowait(ev)


class Engine:
    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None,
                 store: AdapterStore | None = None, draft: LoadedModel | None = None) -> None:
        """``draft``: a small model with ``lm``'s tokenizer that proposes the tokens
        speculative decoding checks (engine/draft_model.py), where prompt lookup finds
        none; needs ``config.speculative_tokens`` > 0."""
        self.lm = lm
        self.config = config or EngineConfig()
        self.config.validate()
        c = self.config
        self.draft: DraftModel | None = None
        if draft is not None:
            if not c.speculative_tokens:
                raise ConfigError("a draft model proposes speculative tokens: set "
                                  "speculative_tokens (--speculative-tokens N) to N >= 1")
            check_compatible(lm, draft)
            self.draft = DraftModel(draft, c.max_len, max_sequences=c.spec_max_batch,
                                    compile=c.compile)
        m = lm.model
        cfg = lm.config
        rows = c.max_running
        if c.kv_cache_bytes is not None:
            per_row = (cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
                       * m.dtype.itemsize * (c.max_len + 1))
            rows = min(rows, c.kv_cache_bytes // per_row)
            if rows < 1:
                raise ConfigError(
                    f"kv_cache_bytes={c.kv_cache_bytes}: one sequence of max_len={c.max_len} "
                    f"needs {per_row} bytes; raise the budget or lower max_len")
        self.store = store
        hot = c.max_hot_adapters if store is not None else 0
        self.runner = ModelRunner(m, num_rows=rows, max_len=c.max_len, max_hot_adapters=hot,
                                  max_lora_rank=c.max_lora_rank,
                                  lora_dtype=lora_buffer_dtype(c.lora_dtype, m.dtype))
        if c.compile and not m.decode_compiled:
            m.compile_decode()  # graphs are built by warmup() or the first decode steps
        self.scheduler = Scheduler(SchedulerConfig(
            max_running=rows, max_waiting=c.max_waiting, max_step_tokens=c.max_step_tokens,
            prefill_chunk=c.prefill_chunk, max_hot_adapters=max(hot, 1),
            max_overtakes=c.max_overtakes))
        self.num_rows = rows
        self.prefix_cache = (PrefixCache(c.prefix_cache_bytes, c.prefix_block)
                             if c.prefix_cache_bytes > 0 else None)
        self._prefix_hits: dict[str, PrefixHit] = {}  # admitted this step, to copy in
        if self.prefix_cache is not None:
            self.scheduler.cached_prefix = self._cached_prefix
        self._lock = threading.RLock()  # callbacks may submit
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = \
            weakref.WeakKeyDictionary()
        self._wake = threading.Condition(self._lock)
        self._requests: dict[str, _Request] = {}
        self._cancel: set[str] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="fleetlm-adapter-load")
        self._stale: set[str] = set()  # adapters replaced or removed in the store
        if store is not None:
            store.subscribe(self._on_adapter_changed)
        self.steps = 0
        self.generated_tokens = 0
        # speculative decoding: draft tokens checked, and those the model agreed with
        self.draft_tokens_proposed = 0
        self.draft_tokens_accepted = 0

    # -- public API -------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, *,
               callback: Callable[[EngineEvent], object], adapter: str | None = None,
               request_id: str | None = None) -> str:
        """Queue a request; events arrive through ``callback`` (called on the engine's
        thread: keep it short). Raises ConfigError for a bad request, the store's
        AdapterError for an unknown or invalid adapter, EngineBusy when the queue is full."""
        # every check of a request lives here, the adapter first: a server reports an
        # unknown adapter (its `model` field) before anything else that is wrong
        if adapter is not None:
            if self.store is None:
                raise ConfigError(f"adapter {adapter!r}: this engine serves no adapters")
            self.store.validate(adapter)  # the one check of the name; raises AdapterError
            if self.config.max_hot_adapters == 0:
                raise ConfigError(f"adapter {adapter!r}: this engine serves no adapters")
        params.validate(self.lm.config.vocab_size)  # ConfigError(param=the first bad field)
        if not prompt:
            raise ConfigError("prompt: must contain at least one token", param="prompt")
        if len(prompt) >= self.config.max_len:
            raise ConfigError(f"prompt: {len(prompt)} tokens leave no room to generate within "
                              f"the context of {self.config.max_len} tokens", param="prompt")
        self._check_ids(prompt)
        if params.stop and self.lm.tokenizer is None:
            raise ConfigError("stop: stop strings need a tokenizer, and this model has none",
                              param="stop")
        rid = request_id or f"req-{next(self._ids)}"
        # max_tokens=0 (prompt scoring) still plans one token; the request ends after prefill
        max_new = max(1, min(params.max_tokens, self.config.max_len - len(prompt)))
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.lm.stop_token_ids)
        req = _Request(
            id=rid, prompt=list(prompt), params=params, adapter=adapter, callback=callback,
            sampler=RequestSampler(params, self.lm.config.vocab_size, list(prompt),
                                   tokenizer=self.lm.tokenizer),
            detok=Detokenizer(self.lm.tokenizer, params.stop),
            stop_ids=stop_ids, seq=Sequence(rid, len(prompt), max_new, adapter),
            submitted=time.perf_counter(),
            prompt_lp=[] if params.prompt_logprobs is not None else None,
            history=list(prompt) if self.config.speculative_tokens else [])
        with self._lock:
            if rid in self._requests:
                raise ConfigError(f"request_id {rid!r} is already in use")
            self.scheduler.add(req.seq)  # EngineBusy when the queue is full
            self._requests[rid] = req
            self._wake.notify()
        if self.store is not None and adapter is not None \
                and adapter not in self.store.warm_names():
            # read it from disk off the engine thread, so its first step does not wait;
            # a failure resurfaces (and fails the request) when the loop loads it
            self._prefetch.submit(self.store.get, adapter)
        return rid

    def _check_ids(self, prompt: list[int]) -> None:
        """Every id must index the embedding: one that does not would fail the forward of
        the whole batch it joins (that failure is isolated too, but costs a step)."""
        v = self.lm.config.vocab_size
        if min(prompt) >= 0 and max(prompt) < v:  # the common case, at C speed
            return
        at, bad = next((i, t) for i, t in enumerate(prompt) if not 0 <= t < v)
        raise ConfigError(f"prompt: token id {bad} at position {at} is outside this model's "
                          f"vocabulary of {v} tokens; send ids in 0..{v - 1}, or the prompt as "
                          "text", param="prompt")

    def cancel(self, request_id: str) -> bool:
        """Stop a request; its "cancelled" event follows. False if it is unknown or done."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.done:
                return False
            if req.seq.status is SeqStatus.WAITING:
                self.scheduler.abort(request_id)
                self._end(req, "cancelled")  # nothing else holds it
            else:
                self._cancel.add(request_id)  # running: removed at the step boundary
                self._wake.notify()
            return True

    async def stream(self, prompt: list[int], params: SamplingParams, *,
                     adapter: str | None = None,
                     request_id: str | None = None) -> AsyncIterator[EngineEvent]:
        """Async iterator of a request's events; closing it early cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = _Mailbox(loop)
        rid = self.submit(prompt, params, adapter=adapter, request_id=request_id,
                          callback=lambda ev: mailbox.post(queue, ev))
        finished = False
        try:
            while True:
                ev = await queue.get()
                finished = ev.finish_reason is not None
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(rid)

    def warmup(self) -> float:
        """Build the compiled decode graphs now (on the calling thread, before any request)
        rather than inside the first requests' steps; seconds taken. Nothing to do, and
        0.0, when the engine runs eagerly."""
        draft = self.draft is not None and self.draft.lm.model.decode_compiled
        if not self.lm.model.decode_compiled and not draft:
            return 0.0
        t0 = time.perf_counter()
        with self._lock:
            if self.lm.model.decode_compiled:
                self.runner.warmup()
            if self.draft is not None and draft:  # its one-token graph, on a throwaway row
                self.draft.propose("warmup", [0, 0], 2, self.lm.config.vocab_size)
                self.draft.forget("warmup")
        return time.perf_counter() - t0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="fleetlm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the loop thread (after its current step) and cancel unfinished requests.
        Final: the engine cannot be started again."""
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for rid in list(self._requests):
            self.cancel(rid)
        self._apply_cancels()
        self._prefetch.shutdown(wait=False)

    def pin_adapter(self, name: str) -> None:
        """Keep an adapter warm in the store and, once loaded, hot in the engine (at most
        max_hot_adapters - 1 pins, so one slot always rotates). Raises AdapterError for an
        unknown or invalid adapter, ConfigError when too many are pinned."""
        if self.store is None or self.config.max_hot_adapters == 0:
            raise ConfigError(f"adapter {name!r}: this engine serves no adapters")
        self.store.pin(name)
        with self._lock:
            try:
                self.scheduler.pin_adapter(name)
            except ConfigError:
                self.store.unpin(name)
                raise

    def unpin_adapter(self, name: str) -> None:
        if self.store is None:
            return
        with self._lock:
            self.scheduler.unpin_adapter(name)
        self.store.unpin(name)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.scheduler.num_waiting or self.scheduler.num_running)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "waiting": self.scheduler.num_waiting,
                "running": self.scheduler.num_running,
                "kv_rows": self.num_rows,
                "kv_rows_free": self.runner.rows.num_free,
                "hot_adapters": dict(self.scheduler.hot_adapters()),
                "steps": self.steps,
                "generated_tokens": self.generated_tokens,
                "draft_tokens_proposed": self.draft_tokens_proposed,
                "draft_tokens_accepted": self.draft_tokens_accepted,
            }

    # -- the loop ---------------------------------------------------------------------

    def run(self, until: Callable[[], bool], poll_s: float = 0.1) -> None:
        """Run the loop on the calling thread until ``until()`` is true (checked every
        ``poll_s`` while idle and after every step) or :meth:`shutdown`.

        Prefer this to :meth:`start` on a process's main thread: with OpenMP (torch's CPU
        thread pool), parallel regions forked from a second thread get a second worker
        pool, libgomp then counts more threads than cores and its workers stop spinning
        between regions -- small matmuls (a decode step is made of them) measured 2.5x
        slower, single-stream decoding 1.5x slower on 2 cores. ``fleetlm serve`` runs the
        HTTP server on a thread and the engine here."""
        self._loop(until, poll_s)

    def _loop(self, until: Callable[[], bool] | None = None, poll_s: float = 0.1) -> None:
        while True:
            with self._lock:
                while not self._stop and not (self.scheduler.num_waiting
                                              or self.scheduler.num_running or self._cancel):
                    if until is not None and until():
                        return
                    self._wake.wait(poll_s if until is not None else None)
                if self._stop:
                    return
            if until is not None and until():
                return
            try:
                self.step()
            except Exception as e:  # never leave callers hanging on a dead loop
                log.exception("engine step failed")
                self._fail_all(e)

    def step(self) -> bool:
        """One scheduling step (also usable without the thread, e.g. in tests).
        Returns False when there was nothing to do."""
        self._apply_cancels()
        if self._stale:
            self._drop_stale()
        with self._lock:
            plan = self.scheduler.schedule()
        if plan.empty:
            return False
        for seq in plan.admitted:
            self.runner.admit(seq.request_id)
            hit = self._prefix_hits.pop(seq.request_id, None)
            if hit is not None:
                self.runner.load_prefix(seq.request_id, hit.kv, hit.n)
        self._load_adapters(plan)  # a failed adapter fails its requests; the rest run
        decode, prefill = self._items(plan)
        drafts: dict[str, list[int]] = {}
        if self.config.speculative_tokens and decode:
            decode, verify, drafts = self._speculate(decode)
            prefill = verify + prefill
        out, decode, prefill = self._forward(decode, prefill)  # failed parts: out of the lists
        with self._lock:
            self.scheduler.complete_step(plan)  # skips the sequences that failed
        self.steps += 1
        if self.prefix_cache is not None:
            self._store_prefixes(prefill)
        if out.decode_logits is not None:
            self._sample_rows([self._requests[d.seq_id] for d in decode], out.decode_logits)
        if drafts:
            self._accept_drafts([p for p in prefill if p.seq_id in drafts], drafts, out)
        for p in prefill:
            if p.seq_id in out.chunk_logits and p.seq_id not in drafts:
                req = self._requests[p.seq_id]
                self._isolated(req, self._score_prompt, req, p.start, out.chunk_logits[p.seq_id])
        if out.prefill_logits is not None:
            last = [i for i, p in enumerate(prefill) if p.last and p.seq_id in self._requests]
            for i in [i for i in last if self._requests[prefill[i].seq_id].params.max_tokens == 0]:
                req = self._requests[prefill[i].seq_id]
                self._isolated(req, self._finish_scoring, req)
            last = [i for i in last if prefill[i].seq_id in self._requests]
            if last:
                self._sample_rows([self._requests[prefill[i].seq_id] for i in last],
                                  out.prefill_logits[last])
        return True

    def _forward(self, decode: list[DecodeItem], prefill: list[PrefillItem],
                 ) -> tuple[StepOutput, list[DecodeItem], list[PrefillItem]]:
        """The step's forward, and the items still in it. If the batched forward raises, its
        parts run again on their own: the decode rows as one forward (they are a view of
        cache rows 0..n-1 and cannot be split), then each prefill chunk alone; a part that
        fails alone fails its requests, the others' outputs are merged. A step of one part
        fails at once: running it again alone would tell nothing new.

        Running again is safe: a failed forward only wrote keys/values at the positions it
        was given, which the retry writes again, or which a failed request's freed row no
        longer holds (the runner records lengths and moves rows only after a forward)."""
        try:
            return self.runner.execute(decode, prefill), decode, prefill
        except Exception as e:
            if int(bool(decode)) + len(prefill) == 1:
                log.exception("engine forward failed; failing its request")
                self._fail([d.seq_id for d in decode] + [p.seq_id for p in prefill], e)
                return StepOutput(None, None), [], []
            log.warning("engine forward of %d decode rows and %d prefill chunks failed (%r); "
                        "running its parts apart", len(decode), len(prefill), e)
        out = StepOutput(None, None)
        if decode:
            try:
                out = self.runner.execute(decode, [])
            except Exception as e:
                log.exception("engine decode forward failed; failing its %d rows", len(decode))
                self._fail([d.seq_id for d in decode], e)
                decode = []
        kept: list[PrefillItem] = []
        logits: list[torch.Tensor] = []
        for p in prefill:
            try:
                alone = self.runner.execute([], [p])
            except Exception as e:
                log.exception("engine prefill of %s failed; failing it", p.seq_id)
                self._fail([p.seq_id], e)
                continue
            kept.append(p)
            assert alone.prefill_logits is not None
            logits.append(alone.prefill_logits)
            out.chunk_logits.update(alone.chunk_logits)
        out.prefill_logits = torch.cat(logits) if logits else None
        return out, decode, kept

    def _score_prompt(self, req: _Request, start: int, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens a chunk's logits [n, V] predict (start+1 ..)."""
        assert req.prompt_lp is not None and req.params.prompt_logprobs is not None
        v = self.lm.config.vocab_size
        logp = torch.log_softmax(logits[:, :v].float(), dim=-1)
        n = min(len(logits), len(req.prompt) - start - 1)  # the last predicts no prompt token
        if n <= 0:
            return
        targets = torch.tensor(req.prompt[start + 1: start + 1 + n])
        chosen = logp[torch.arange(n), targets].tolist()
        k = req.params.prompt_logprobs
        top_v, top_i = (logp[:n].topk(k, dim=-1) if k else (None, None))
        for j in range(n):
            alts = list(zip(top_i[j].tolist(), top_v[j].tolist(), strict=True)) \
                if top_i is not None and top_v is not None else []
            req.prompt_lp.append((chosen[j], alts))

    def _finish_scoring(self, req: _Request) -> None:
        """max_tokens=0: the prompt is scored; end the request without generating."""
        self._retire(req)
        req.callback(EngineEvent(req.id, None, "", finish_reason="length",
                                 prompt_tokens=len(req.prompt), completion_tokens=0,
                                 prompt_logprobs=req.prompt_lp))

    def _sample_rows(self, reqs: list[_Request], logits: torch.Tensor) -> None:
        """Sample one token per row of logits [n, V]; plain greedy rows (no penalties, no
        logprobs) share one batched argmax, the rest go through their own sampler."""
        plain = [i for i, r in enumerate(reqs) if r.sampler.plain_greedy]
        picked: dict[int, int] = {}
        if plain:
            v = self.lm.config.vocab_size
            ids = logits[plain, :v].argmax(-1).tolist() if len(plain) < len(reqs) \
                else logits[:, :v].argmax(-1).tolist()
            picked = dict(zip(plain, ids, strict=True))
        for i, req in enumerate(reqs):
            if i in picked:
                self._isolated(req, self._emit, req, SampleResult(picked[i], None, []))
            elif not req.done:
                self._isolated(req, lambda r, row: self._emit(r, r.sampler.sample(row)),
                               req, logits[i])

    def _isolated(self, req: _Request, fn: Callable[..., object], *args: Any) -> None:
        """``fn(*args)`` for one request; if it raises, that request fails, not the step."""
        try:
            fn(*args)
        except Exception as e:
            log.exception("request %s failed", req.id)
            self._fail([req.id], e)

    def _items(self, plan: StepPlan) -> tuple[list[DecodeItem], list[PrefillItem]]:
        """The plan's work, less sequences that left since it was made (failed adapter)."""
        def slot(seq: Sequence) -> int:
            return NO_ADAPTER if seq.adapter is None else self.scheduler.adapter_slot(seq.adapter)

        def live(seq: Sequence) -> bool:
            return seq.status is SeqStatus.RUNNING and seq.request_id in self._requests

        decode = [DecodeItem(s.request_id, self._requests[s.request_id].last_token,
                             s.prompt_len + s.num_generated - 1, slot(s))
                  for s in plan.decode if live(s)]
        decode.sort(key=lambda d: self.runner.rows.row_of[d.seq_id])  # the cache's row order
        prefill = [PrefillItem(c.seq.request_id,
                               self._requests[c.seq.request_id].prompt[c.start:c.end],
                               c.start, slot(c.seq), c.last,
                               self._requests[c.seq.request_id].prompt_lp is not None)
                   for c in plan.prefill if live(c.seq)]
        return decode, prefill

    def _speculate(self, decode: list[DecodeItem],
                   ) -> tuple[list[DecodeItem], list[PrefillItem], dict[str, list[int]]]:
        """When few sequences decode and a plain greedy one has a draft, the whole decode
        batch runs as check chunks ``[last token, draft...]`` (every decoding row at once:
        the decode forward reads rows 0..n-1 as a block); else it decodes as usual."""
        if len(decode) > self.config.spec_max_batch:
            return decode, [], {}
        drafts: dict[str, list[int]] = {}
        for d in decode:
            req = self._requests[d.seq_id]
            room = min(req.drafts.room(self.config.speculative_tokens),
                       req.seq.max_new_tokens - req.generated - 1,
                       self.config.max_len - d.position - 2)
            if room > 0 and req.sampler.plain_greedy and req.drafts.ready():
                # prompt lookup costs nothing; the draft model runs where it finds nothing
                drafts[d.seq_id] = propose(req.history, room) or (
                    self.draft.propose(d.seq_id, req.history, room, self.lm.config.vocab_size)
                    if self.draft is not None else [])
            else:
                drafts[d.seq_id] = []
        if not any(drafts.values()):
            return decode, [], {}
        verify = [PrefillItem(d.seq_id, [d.token, *drafts[d.seq_id]], d.position,
                              d.adapter_slot, last=False, all_logits=True, verify=True)
                  for d in decode]
        return [], verify, drafts

    def _accept_drafts(self, verify: list[PrefillItem], drafts: dict[str, list[int]],
                       out: StepOutput) -> None:
        """Emit each checked sequence's agreed tokens; the scheduler already counted one."""
        v = self.lm.config.vocab_size
        for p in verify:
            req = self._requests.get(p.seq_id)
            if req is None:
                continue
            logits = out.chunk_logits[p.seq_id]
            if not req.sampler.plain_greedy:  # checked nothing: sample as a decode row would
                self.runner.lengths[p.seq_id] = p.start + 1
                self._isolated(req, lambda r, row: self._emit(r, r.sampler.sample(row)),
                               req, logits[0])
                continue
            draft = drafts[p.seq_id]
            tokens = accept(draft, logits, v)
            if draft:
                req.drafts.record(len(draft), len(tokens) - 1, self.config.speculative_tokens)
                self.draft_tokens_proposed += len(draft)
                self.draft_tokens_accepted += len(tokens) - 1
            # positions [0, start + len(tokens)) now hold this sequence's keys and values
            self.runner.lengths[p.seq_id] = p.start + len(tokens)
            for i, token in enumerate(tokens):
                if req.done:
                    break
                if i:
                    with self._lock:
                        req.seq.num_generated += 1
                self._isolated(req, self._emit, req, SampleResult(token, None, []))

    def _cached_prefix(self, seq: Sequence) -> int:
        """The scheduler's admission hook: prompt tokens a cached prefix covers."""
        req = self._requests.get(seq.request_id)
        if req is None or req.prompt_lp is not None or self.prefix_cache is None:
            return 0  # prompt logprobs need the logits of every prompt token
        hit = self.prefix_cache.lookup(req.adapter, req.prompt)
        if hit is None:
            return 0
        self._prefix_hits[seq.request_id] = hit
        return hit.n

    def _store_prefixes(self, prefill: list[PrefillItem]) -> None:
        """Keep the whole prompt blocks of sequences whose prefill just finished."""
        assert self.prefix_cache is not None
        for p in prefill:
            req = self._requests.get(p.seq_id)
            if not p.last or req is None or req.prompt_lp is not None:
                continue
            with self._lock:
                n = self.prefix_cache.wants(req.adapter, req.prompt)
                if n:
                    self.prefix_cache.put(req.adapter, req.prompt,
                                          self.runner.read_prefix(p.seq_id, n))

    def _on_adapter_changed(self, name: str) -> None:
        with self._lock:
            self._stale.add(name)

    def _drop_stale(self) -> None:
        """Forget hot copies of adapters changed in the store once no request uses them;
        the next request reloads the new version (running ones finish on the old)."""
        with self._lock:
            pool = self.scheduler.hot_pool
            for name in list(self._stale):
                if pool.slot_of(name) is None:
                    self._stale.discard(name)
                elif pool.refcount(name) == 0:
                    pool.remove(name)
                    self._stale.discard(name)
                if self.prefix_cache is not None:  # keys and values of the old version
                    self.prefix_cache.drop_adapter(name)

    def _load_adapters(self, plan: StepPlan) -> None:
        for name, slot in plan.adapter_loads:
            assert self.store is not None  # the scheduler only plans loads for adapter requests
            try:
                adapter = self.store.get(name)  # warm hit, or read from disk and validate
                if adapter.rank > self.config.max_lora_rank:
                    raise AdapterError(name, f"rank {adapter.rank} exceeds the engine's maximum "
                                             f"{self.config.max_lora_rank} (raise --max-lora-rank)")
                self.runner.load_adapter(slot, adapter)
            except FleetLMError as e:
                with self._lock:
                    failed = self.scheduler.fail_adapter(name)
                for seq in failed:
                    self._release(seq.request_id)
                    self._end(self._requests[seq.request_id], "error", e)

    def _emit(self, req: _Request, s: SampleResult) -> None:
        if req.done:
            return
        req.generated += 1
        req.last_token = s.token_id
        if self.config.speculative_tokens:
            req.history.append(s.token_id)
        self.generated_tokens += 1
        reason = None
        text = ""
        if s.token_id in req.stop_ids:
            reason = "stop"
            text = req.detok.flush()
        else:
            text = req.detok.push(s.token_id)
            if req.detok.stopped:
                reason = "stop"
            elif req.sampler.finished:  # the response_format grammar is complete
                reason = "stop"
                text += req.detok.flush()
            elif req.generated >= req.seq.max_new_tokens:
                reason = "length"
                text += req.detok.flush()
        ev = EngineEvent(req.id, s.token_id, text, s.logprob, s.top_logprobs, reason,
                         prompt_tokens=len(req.prompt), completion_tokens=req.generated,
                         prompt_logprobs=req.prompt_lp if req.generated == 1 else None,
                         constrained_logprob=s.constrained_logprob)
        if reason is not None:
            self._retire(req)
        req.callback(ev)

    def _retire(self, req: _Request) -> None:
        """A request that ran to its end: out of the scheduler, its KV row freed."""
        with self._lock:
            self.scheduler.finish(req.id)
        self._release(req.id)
        req.done = True
        del self._requests[req.id]

    def _release(self, seq_id: str) -> None:
        """Free a sequence's KV cache row (and its draft model cache)."""
        self.runner.release(seq_id)
        if self.draft is not None:
            self.draft.forget(seq_id)

    def _end(self, req: _Request, reason: str, error: Exception | None = None) -> None:
        if req.done:
            return
        req.done = True
        self._requests.pop(req.id, None)
        req.callback(EngineEvent(req.id, None, "", finish_reason=reason, error=error,
                                 prompt_tokens=len(req.prompt), completion_tokens=req.generated))

    def _apply_cancels(self) -> None:
        with self._lock:
            cancels, self._cancel = self._cancel, set()
            for rid in cancels:
                self.scheduler.abort(rid)
        for rid in cancels:
            self._release(rid)
            req = self._requests.get(rid)
            if req is not None:
                self._end(req, "cancelled")

    def _fail(self, request_ids: list[str], error: Exception) -> None:
        """End these requests with ``error``: out of the scheduler, their KV rows freed.
        Safe for a request that already ended (its callback raised, say)."""
        with self._lock:
            for rid in request_ids:
                self.scheduler.abort(rid)
        for rid in request_ids:
            self._release(rid)
            req = self._requests.pop(rid, None)
            if req is not None and not req.done:
                try:
                    self._end(req, "error", error)
                except Exception:  # its callback raised again: it has heard what it can
                    log.exception("request %s: error callback failed", rid)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            reqs = list(self._requests.values())
            for req in reqs:
                self.scheduler.abort(req.id)
        for req in reqs:
            self._release(req.id)
            self._end(req, "error", error)
