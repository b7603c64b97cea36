"""Continuous-batching scheduler: who runs this step, which prompt chunks are computed, and
which LoRA adapters must be hot for them. Plain Python bookkeeping, no torch.

The engine loop calls :meth:`Scheduler.schedule` once per step, runs the forward for the
returned :class:`StepPlan` (a batched decode for ``plan.decode`` and chunked prefill for
``plan.prefill``), samples, then calls :meth:`Scheduler.complete_step` and
:meth:`Scheduler.finish` for the sequences it decides are done. ``schedule`` and
``complete_step`` strictly alternate.

What this module deliberately does not know: tokens and tensors; which KV slot a sequence
owns (the engine gives one to each ``plan.admitted`` sequence and frees it when ``finish``,
``abort`` or ``fail_adapter`` hands the sequence back); stop conditions (the engine calls
``finish``, even at ``max_new_tokens``); how an adapter is loaded (the engine loads each of
``plan.adapter_loads`` before the forward and calls ``fail_adapter`` if one fails).

Policy, and why
---------------
*Step shape.* Every decoding sequence decodes one token every step; what is left of
``max_step_tokens`` goes to prompt chunks of the prefilling sequences in arrival order, at
most ``prefill_chunk`` tokens of one sequence per step. Decodes go first because the gap
between streamed tokens is the latency users feel; a long prompt is split across steps so a
newcomer stalls running streams by one chunk's compute, never by a whole prompt (chunked
prefill, as in Sarathi/vLLM). Arrival order makes time-to-first-token first come, first
served. ``max_step_tokens > max_running`` leaves at least one prompt token per step, so
prefill always progresses.

*Memory.* A sequence takes one KV slot at admission, sized for prompt + max_new_tokens, so
a running sequence can never run out of cache: no preemption, no swapping, no recompute.
The price is fewer concurrent sequences than paged reservation would allow; the payoff is a
scheduler with no failure path in the middle of a generation.

*Admission* happens between steps (continuous batching: sequences join and leave at any
step). KV slots go in admission order (arrival order, bent only as "Fewer distinct adapters
per step" below allows): when the first in that order cannot get a slot, nobody behind it
does, so a steady stream of later arrivals can never overtake a sequence indefinitely.

*Adapters.* A running sequence's adapter must be hot, in one of ``max_hot_adapters`` slots
of the engine's stacked LoRA buffers. :class:`HotAdapters` refcounts the running users of
each hot adapter and, when a cold one needs a slot, takes a free slot or evicts the
least-recently-used idle (refcount 0) unpinned adapter. When every slot is busy, waiting for
one to go idle could take forever under a steady stream of requests for the busy adapters,
so the first waiting sequence that needs a cold adapter (the *head*: everything ahead of it
was admitted) picks a victim, the least-recently-used unpinned busy adapter, and *drains* it:
no new sequence for the victim is admitted. Its running sequences finish within their
``max_new_tokens``; the last one frees a KV slot and the victim's hot slot together, and the
head, first in line, takes both at the next step. Meanwhile sequences behind the head whose
adapter is hot and not draining (or that use none) still fill free KV slots: they cannot take
the head's adapter slot, and freed KV slots reach the head first once it can run.
Bound: the head is admitted at most one step after the victim's longest-lived running
sequence finishes (sooner if any hot adapter goes idle first).

*Fewer distinct adapters per step.* A step reads each distinct adapter's weights once
(~10-20 MB for a rank-16 adapter on every projection of a 135M model), so 32 rows over 25
adapters cost far more than 32 rows over 4. When more sequences wait than there are free
KV slots, admission may therefore take a later sequence whose adapter is already running
(or that uses none) before an earlier one that would add an adapter, and takes newcomers
adapter by adapter (all waiting sequences of the first-arrived new adapter, then the next).
Each waiting sequence counts how many later arrivals were admitted before it; at
``max_overtakes`` it goes first, ahead of every such preference, so no sequence waits
behind more than ``max_overtakes`` later ones. ``max_overtakes = 0`` is strict arrival
order. When every waiting sequence fits, all are admitted and the order does not matter.

*Pins* keep an adapter hot while idle (e.g. a latency-critical tenant). At most
``max_hot_adapters - 1`` adapters may be pinned so one slot always rotates; otherwise a
request for an unpinned adapter could never run. Sequences without an adapter never touch
the pool.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum

from fleetlm.errors import ConfigError, EngineBusy


@dataclass
class SchedulerConfig:
    max_running: int = 32  # sequences holding a KV slot (prefilling or decoding)
    max_waiting: int = 1024  # bounded queue; add() beyond it raises EngineBusy
    max_step_tokens: int = 512  # per step: 1 per decoding sequence + prefill chunk tokens
    prefill_chunk: int = 512  # at most this many prompt tokens of one sequence per step
    max_hot_adapters: int = 32  # slots in the engine's stacked LoRA buffers
    # later arrivals that may be admitted ahead of a waiting sequence so that steps mix
    # fewer distinct adapters (see "Fewer distinct adapters per step"); 0: arrival order
    max_overtakes: int = 64

    def validate(self) -> None:
        """Raise one ConfigError listing every invalid field and its fix."""
        problems: list[str] = []
        ok: set[str] = set()  # fields valid on their own; relations are checked among these
        for f in fields(self):
            v = getattr(self, f.name)
            least = 0 if f.name == "max_overtakes" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                problems.append(f"{f.name}={v!r}: must be an integer >= {least}")
            else:
                ok.add(f.name)
        if {"max_running", "max_step_tokens"} <= ok and (
            self.max_step_tokens <= self.max_running
        ):
            problems.append(
                f"max_step_tokens={self.max_step_tokens}: must exceed max_running="
                f"{self.max_running} so a step with every sequence decoding still has room "
                f"for prompt tokens: raise max_step_tokens or lower max_running"
            )
        if {"prefill_chunk", "max_step_tokens"} <= ok and (
            self.prefill_chunk > self.max_step_tokens
        ):
            problems.append(
                f"prefill_chunk={self.prefill_chunk}: a chunk never exceeds the step budget "
                f"max_step_tokens={self.max_step_tokens}: set prefill_chunk <= max_step_tokens"
            )
        if problems:
            raise ConfigError("invalid scheduler settings: " + "; ".join(problems))


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"  # holds a KV slot (and a ref on its adapter)
    FINISHED = "finished"  # finished, aborted, or its adapter failed


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_len: int
    max_new_tokens: int
    adapter: str | None = None
    status: SeqStatus = SeqStatus.WAITING
    num_prefilled: int = 0  # prompt tokens already in the KV cache
    num_generated: int = 0  # tokens sampled so far
    arrival: int = -1  # set by Scheduler.add (monotonic counter)
    overtaken: int = 0  # later arrivals admitted while this one waited

    @property
    def prefilling(self) -> bool:
        return self.status is SeqStatus.RUNNING and self.num_prefilled < self.prompt_len

    @property
    def decoding(self) -> bool:
        return self.status is SeqStatus.RUNNING and self.num_prefilled >= self.prompt_len


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int
    end: int  # prompt positions [start, end) computed this step

    @property
    def last(self) -> bool:
        """The prompt ends in this chunk: the runner samples the first token from it."""
        return self.end == self.seq.prompt_len

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class StepPlan:
    decode: list[Sequence]  # each feeds 1 token (its last sampled one)
    prefill: list[PrefillChunk]  # arrival order
    admitted: list[Sequence]  # became RUNNING this step (the runner assigns them a KV slot)
    adapter_loads: list[tuple[str, int]]  # (adapter name, hot slot): load before the forward

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.num_tokens for c in self.prefill)

    @property
    def empty(self) -> bool:
        return not (self.decode or self.prefill or self.admitted or self.adapter_loads)


class HotAdapters:
    """Hot-slot pool: adapter name -> slot, refcounts of running users, recency, pins.

    Recency is refreshed on every acquire and release, so the idle adapter evicted first
    is the one whose last user left longest ago. A pin is a name, not a slot: pinning a
    cold adapter is remembered and protects it from the moment it becomes hot.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: must be >= 1")
        self.capacity = capacity
        self._slots: OrderedDict[str, int] = OrderedDict()  # hot names, least recent first
        self._refs: dict[str, int] = {}
        self._free: list[int] = list(range(capacity))  # min-heap: lowest free slot first
        self._pinned: set[str] = set()

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def slot_of(self, name: str) -> int | None:
        return self._slots.get(name)

    def refcount(self, name: str) -> int:
        return self._refs.get(name, 0)

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._pinned)

    def hot(self) -> dict[str, int]:
        """name -> slot, least recently used first."""
        return dict(self._slots)

    def acquire(self, name: str) -> tuple[int, bool] | None:
        """Take a ref on ``name``: (slot, must_load), or None when no slot can be had now.

        A cold adapter takes the lowest free slot, else evicts the least-recently-used idle
        unpinned adapter; ``must_load`` then says the caller has to load it into ``slot``.
        """
        slot = self._slots.get(name)
        if slot is not None:
            self._refs[name] += 1
            self._slots.move_to_end(name)
            return slot, False
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            victim = self.lru_idle()
            if victim is None:
                return None
            slot = self._slots.pop(victim)
            del self._refs[victim]
        self._slots[name] = slot
        self._refs[name] = 1
        return slot, True

    def release(self, name: str) -> None:
        assert self._refs.get(name, 0) > 0, f"release of {name!r} without a ref"
        self._refs[name] -= 1
        self._slots.move_to_end(name)

    def remove(self, name: str) -> int | None:
        """Drop ``name`` whatever its refs (its load failed); return the freed slot."""
        slot = self._slots.pop(name, None)
        if slot is not None:
            del self._refs[name]
            heapq.heappush(self._free, slot)
        return slot

    def lru_idle(self) -> str | None:
        """Least-recently-used hot adapter with no running user and no pin."""
        return next(
            (n for n in self._slots if self._refs[n] == 0 and n not in self._pinned), None
        )

    def lru_busy(self) -> str | None:
        """Least-recently-used hot adapter with running users and no pin."""
        return next((n for n in self._slots if self._refs[n] > 0 and n not in self._pinned), None)

    def pin(self, name: str) -> None:
        if name in self._pinned:
            return
        if len(self._pinned) >= self.capacity - 1:
            raise ConfigError(
                f"cannot pin adapter {name!r}: {len(self._pinned)} adapters are pinned and "
                f"max_hot_adapters={self.capacity}; at most max_hot_adapters - 1 may be pinned "
                f"so other adapters can rotate through the last slot. Unpin one or raise "
                f"max_hot_adapters"
            )
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        self._pinned.discard(name)


class Scheduler:
    """Admission, step planning and hot-adapter bookkeeping; see the module docstring."""

    def __init__(self, config: SchedulerConfig):
        config.validate()
        self.config = config
        self.hot_pool = HotAdapters(config.max_hot_adapters)
        self._waiting: list[Sequence] = []  # queue order (= arrival order)
        self._running: dict[str, Sequence] = {}
        self._live: dict[str, Sequence] = {}  # waiting + running, by request_id
        self._arrivals = itertools.count()
        # drain state: the victim adapter admits nobody new until _drain_head gets a slot
        self._draining: str | None = None
        self._drain_head: Sequence | None = None
        # prompt tokens already in the cache when a sequence is admitted (prefix caching):
        # the engine's lookup, which returns fewer than the prompt's tokens
        self.cached_prefix: Callable[[Sequence], int] | None = None

    # ------------------------------------------------------------------ views

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> list[Sequence]:
        return list(self._waiting)

    @property
    def running(self) -> list[Sequence]:
        """Running sequences in arrival order."""
        return sorted(self._running.values(), key=lambda s: s.arrival)

    @property
    def draining(self) -> str | None:
        """The adapter being drained for the queue head, if any."""
        return self._draining

    def hot_adapters(self) -> dict[str, int]:
        return self.hot_pool.hot()

    def adapter_slot(self, name: str) -> int:
        slot = self.hot_pool.slot_of(name)
        if slot is None:
            raise KeyError(f"adapter {name!r} is not hot")
        return slot

    # ------------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> None:
        if len(self._waiting) >= self.config.max_waiting:
            raise EngineBusy(
                f"request queue is full ({self.config.max_waiting} waiting); retry later, "
                f"or raise max_waiting if the queue is too small for the load"
            )
        if seq.request_id in self._live:
            raise ValueError(f"request_id {seq.request_id!r} is already scheduled")
        if seq.prompt_len < 1 or seq.max_new_tokens < 1:
            raise ValueError(
                f"request {seq.request_id!r}: prompt_len={seq.prompt_len} and "
                f"max_new_tokens={seq.max_new_tokens} must both be >= 1"
            )
        if seq.status is not SeqStatus.WAITING or seq.num_prefilled or seq.num_generated:
            raise ValueError(f"request {seq.request_id!r}: only a fresh sequence can be added")
        seq.arrival = next(self._arrivals)
        self._waiting.append(seq)
        self._live[seq.request_id] = seq

    def abort(self, request_id: str) -> Sequence | None:
        seq = self._live.get(request_id)
        if seq is None:
            return None
        if seq.status is SeqStatus.RUNNING:
            self._retire(seq)
            return seq
        self._waiting.remove(seq)  # identity: Sequence has eq=False
        del self._live[request_id]
        seq.status = SeqStatus.FINISHED
        if seq is self._drain_head:
            self._stop_draining()
        return seq

    def finish(self, request_id: str) -> Sequence:
        seq = self._running.get(request_id)
        if seq is None:
            raise KeyError(f"request {request_id!r} is not running")
        self._retire(seq)
        return seq

    def fail_adapter(self, name: str) -> list[Sequence]:
        removed = [s for s in self._waiting if s.adapter == name]
        removed += [s for s in self._running.values() if s.adapter == name]
        self._waiting = [s for s in self._waiting if s.adapter != name]
        for s in removed:
            self._running.pop(s.request_id, None)
            del self._live[s.request_id]
            s.status = SeqStatus.FINISHED
        self.hot_pool.remove(name)  # its refs leave with the removed sequences
        if self._draining == name or self._drain_head in removed:
            self._stop_draining()
        return sorted(removed, key=lambda s: s.arrival)

    def pin_adapter(self, name: str) -> None:
        self.hot_pool.pin(name)
        if name == self._draining:  # a pinned adapter cannot give its slot up
            self._stop_draining()

    def unpin_adapter(self, name: str) -> None:
        self.hot_pool.unpin(name)

    # ------------------------------------------------------------------ steps

    def schedule(self) -> StepPlan:
        admitted, loads = self._admit()
        running = self.running
        decode = [s for s in running if s.decoding]
        for s in decode:
            assert s.num_generated < s.max_new_tokens, (
                f"{s.request_id!r} reached max_new_tokens: the engine must finish() it"
            )
        budget = self.config.max_step_tokens - len(decode)  # > 0 by validate()
        prefill: list[PrefillChunk] = []
        for s in running:
            if budget == 0:
                break
            if s.prefilling:
                n = min(self.config.prefill_chunk, budget, s.prompt_len - s.num_prefilled)
                prefill.append(PrefillChunk(s, s.num_prefilled, s.num_prefilled + n))
                budget -= n
        return StepPlan(decode, prefill, admitted, loads)

    def complete_step(self, plan: StepPlan) -> None:
        """Record that ``plan``'s forward ran and a token was sampled where due.

        Sequences that left in between (abort, fail_adapter) are skipped.
        """
        for c in plan.prefill:
            s = c.seq
            if s.status is not SeqStatus.RUNNING:
                continue
            assert c.start == s.num_prefilled, f"{s.request_id!r}: chunk out of order"
            s.num_prefilled = c.end
            if c.last:
                s.num_generated += 1
        for s in plan.decode:
            if s.status is SeqStatus.RUNNING:
                s.num_generated += 1

    # ------------------------------------------------------------------ internals

    def _admission_order(self) -> list[Sequence]:
        """The waiting sequences in the order admission considers them: arrival order,
        unless more wait than there are free KV slots and overtaking is allowed; then
        those overtaken ``max_overtakes`` times, those whose adapter is already running
        (or that use none), then the others grouped by adapter, each part in arrival order."""
        limit = self.config.max_overtakes
        free = self.config.max_running - len(self._running)
        if limit == 0 or len(self._waiting) <= free:
            return self._waiting
        running = {s.adapter for s in self._running.values()}
        due: list[Sequence] = []
        joining: list[Sequence] = []
        by_adapter: dict[str, list[Sequence]] = {}  # first arrival first
        for s in self._waiting:
            if s.overtaken >= limit:
                due.append(s)
            elif s.adapter is None or s.adapter in running:
                joining.append(s)
            else:
                by_adapter.setdefault(s.adapter, []).append(s)
        return [*due, *joining, *(s for group in by_adapter.values() for s in group)]

    def _count_overtakes(self, admitted: list[Sequence]) -> None:
        """Each sequence still waiting was overtaken by the admitted later arrivals."""
        arrivals = sorted(s.arrival for s in admitted)
        for s in self._waiting:
            s.overtaken += len(arrivals) - bisect.bisect_right(arrivals, s.arrival)

    def _admit(self) -> tuple[list[Sequence], list[tuple[str, int]]]:
        admitted: list[Sequence] = []
        loads: list[tuple[str, int]] = []
        keep: list[Sequence] = []
        head: Sequence | None = None  # first sequence in this scan that needs a cold adapter
        order = self._admission_order()
        for i, seq in enumerate(order):
            if len(self._running) >= self.config.max_running:
                keep.extend(order[i:])  # in admission order: nobody behind takes a KV slot
                break
            name = seq.adapter
            if name is not None:
                # behind the head, only hot adapters: a cold one would take the head's slot
                if name == self._draining or (head is not None and name not in self.hot_pool):
                    keep.append(seq)
                    continue
                got = self.hot_pool.acquire(name)
                if got is None:
                    head = seq
                    self._drain_for(seq)
                    keep.append(seq)
                    continue
                slot, must_load = got
                if must_load:
                    loads.append((name, slot))
                if seq is self._drain_head:
                    self._stop_draining()
            seq.status = SeqStatus.RUNNING
            if self.cached_prefix is not None:
                seq.num_prefilled = self.cached_prefix(seq)
                assert 0 <= seq.num_prefilled < seq.prompt_len, "a cached prefix leaves a token"
            self._running[seq.request_id] = seq
            admitted.append(seq)
        self._waiting = keep if order is self._waiting else sorted(keep, key=lambda s: s.arrival)
        if admitted and self._waiting and self.config.max_overtakes:
            self._count_overtakes(admitted)
        return admitted, loads

    def _drain_for(self, head: Sequence) -> None:
        """Make sure some busy unpinned adapter is draining for ``head``."""
        victim = self._draining
        if (
            head is self._drain_head
            and victim is not None
            and victim in self.hot_pool
            and not self.hot_pool.is_pinned(victim)
        ):
            return
        victim = self.hot_pool.lru_busy()
        # acquire failed: no free slot and no idle unpinned one; pins leave >= 1 slot unpinned
        assert victim is not None, "every hot slot is pinned"
        self._draining, self._drain_head = victim, head

    def _stop_draining(self) -> None:
        self._draining, self._drain_head = None, None

    def _retire(self, seq: Sequence) -> None:
        del self._running[seq.request_id]
        del self._live[seq.request_id]
        seq.status = SeqStatus.FINISHED
        if seq.adapter is not None:
            self.hot_pool.release(seq.adapter)
