"""Scheduler behaviour driven by a mock runner: no model, no tensors, no torch.

The MockRunner plays the engine loop (schedule -> forward -> complete_step -> finish at
max_new_tokens), owns the KV slots and what it loaded into each hot adapter slot, and
checks the scheduler's contract on every step.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections import defaultdict

import pytest

from fleetlm.engine.scheduler import (
    HotAdapters,
    PrefillChunk,
    Scheduler,
    SchedulerConfig,
    SeqStatus,
    Sequence,
    StepPlan,
)
from fleetlm.errors import ConfigError, EngineBusy, FleetLMError


class MockRunner:
    """The engine loop without a model; asserts the scheduler's invariants every step."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.cfg = sched.config
        self.kv_free = list(range(self.cfg.max_running))
        self.kv_slot: dict[str, int] = {}
        self.loaded: dict[int, str] = {}  # hot slot -> adapter the runner loaded there
        self.chunks: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.finished: list[Sequence] = []
        self.steps = 0
        self.fail_loads: set[str] = set()  # adapters whose load "fails"
        self.failed: list[Sequence] = []

    def add(self, rid: str, prompt_len: int, max_new: int, adapter: str | None = None) -> Sequence:
        seq = Sequence(rid, prompt_len, max_new, adapter)
        self.sched.add(seq)
        return seq

    def release(self, seq: Sequence) -> None:
        """Free the KV slot of a sequence the scheduler handed back (abort, fail_adapter)."""
        if seq.request_id in self.kv_slot:
            self.kv_free.append(self.kv_slot.pop(seq.request_id))

    def abort(self, rid: str) -> Sequence | None:
        seq = self.sched.abort(rid)
        if seq is not None:
            self.release(seq)
        return seq

    def step(self) -> StepPlan:
        s, cfg = self.sched, self.cfg
        pinned_hot = {n: slot for n, slot in s.hot_adapters().items() if s.hot_pool.is_pinned(n)}
        waiting_before = s.waiting
        overtaken_before = {w.request_id: w.overtaken for w in waiting_before}
        running_adapters_before = {r.adapter for r in s.running}
        hot_before = s.hot_adapters()
        in_use = {hot_before[r.adapter] for r in s.running if r.adapter is not None}
        plan = s.schedule()
        self.steps += 1

        # KV slots: one per admitted sequence, never more than max_running
        for seq in plan.admitted:
            assert seq.status is SeqStatus.RUNNING and seq.num_prefilled == 0
            self.kv_slot[seq.request_id] = self.kv_free.pop()
        assert len(self.kv_slot) == s.num_running <= cfg.max_running

        # adapter loads never overwrite the slot of a sequence that was already running
        running = s.running
        loads = plan.adapter_loads
        assert len({n for n, _ in loads}) == len({sl for _, sl in loads}) == len(loads)
        for name, slot in loads:
            assert slot not in in_use
            self.loaded[slot] = name
        for name, slot in pinned_hot.items():  # pinned adapters never move or leave
            assert s.hot_adapters().get(name) == slot

        # every running sequence's adapter is hot, refcounted, and loaded where it says
        hot = s.hot_adapters()
        assert len(hot) <= cfg.max_hot_adapters
        assert len(set(hot.values())) == len(hot)
        assert all(0 <= slot < cfg.max_hot_adapters for slot in hot.values())
        users: dict[str, int] = defaultdict(int)
        for r in running:
            if r.adapter is not None:
                users[r.adapter] += 1
                assert self.loaded[s.adapter_slot(r.adapter)] == r.adapter
        for name in hot:
            assert s.hot_pool.refcount(name) == users[name]

        # admission order: a sequence overtaken by a later arrival waits for a cold or
        # draining adapter, or (adapter grouping) adds an adapter not yet running and was
        # overtaken fewer than max_overtakes times before
        if plan.admitted:
            last = max(a.arrival for a in plan.admitted)
            for w in waiting_before:
                if w.status is SeqStatus.WAITING and w.arrival < last:
                    assert w.adapter is not None
                    grouped = (overtaken_before[w.request_id] < cfg.max_overtakes
                               and w.adapter not in running_adapters_before)
                    assert grouped or w.adapter not in hot or w.adapter == s.draining

        # step shape: all decodes, then prefill in arrival order within the budget
        assert set(plan.decode) == {r for r in running if r.decoding}
        assert len(plan.decode) == len(set(plan.decode))
        assert plan.num_tokens <= cfg.max_step_tokens
        prefilling = [r for r in running if r.prefilling]
        assert [c.seq for c in plan.prefill] == prefilling[: len(plan.prefill)]
        for c in plan.prefill:
            assert c.start == c.seq.num_prefilled
            assert 1 <= c.end - c.start <= cfg.prefill_chunk
            assert c.end <= c.seq.prompt_len
        if len(plan.prefill) < len(prefilling):  # someone left out: the budget is spent
            assert plan.num_tokens == cfg.max_step_tokens
        if running:
            assert not plan.empty

        # the "forward": a load may fail, which removes its sequences before they run
        for name, _ in plan.adapter_loads:
            if name in self.fail_loads:
                gone = s.fail_adapter(name)
                assert gone and all(g.adapter == name for g in gone)
                for g in gone:
                    assert g.status is SeqStatus.FINISHED
                    self.release(g)
                self.failed += gone
                for slot, loaded in list(self.loaded.items()):
                    if loaded == name:
                        del self.loaded[slot]
        for c in plan.prefill:
            if c.seq.status is SeqStatus.RUNNING:
                self.chunks[c.seq.request_id].append((c.start, c.end))
        s.complete_step(plan)

        # the engine finishes sequences at their length limit
        for r in s.running:
            assert r.num_generated <= r.max_new_tokens
            if r.num_generated == r.max_new_tokens:
                done = s.finish(r.request_id)
                assert done is r and r.status is SeqStatus.FINISHED
                self.release(r)
                self.finished.append(r)
                self.check_finished(r)
        return plan

    def check_finished(self, seq: Sequence) -> None:
        """Prefilled in order with no gap or overlap, then exactly max_new_tokens sampled."""
        pos = 0
        for start, end in self.chunks[seq.request_id]:
            assert start == pos and end > start
            pos = end
        assert pos == seq.prompt_len == seq.num_prefilled
        assert seq.num_generated == seq.max_new_tokens

    def run_until_idle(self, max_steps: int) -> int:
        for n in range(max_steps):
            if not self.sched.num_running and not self.sched.num_waiting:
                return n
            self.step()
        raise AssertionError(f"not idle after {max_steps} steps")


def make(**kw: int) -> tuple[Scheduler, MockRunner]:
    """A scheduler and its mock runner; strict arrival order unless ``max_overtakes`` is
    given (the adapter-grouping tests below set it)."""
    kw.setdefault("max_overtakes", 0)
    sched = Scheduler(SchedulerConfig(**kw))
    return sched, MockRunner(sched)


# --------------------------------------------------------------------------- config, import


def test_import_does_not_pull_torch():
    code = "import fleetlm.engine.scheduler, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_validation_lists_every_bad_field():
    cfg = SchedulerConfig(
        max_running=0, max_waiting=-1, max_step_tokens=0, prefill_chunk=0, max_hot_adapters=0
    )
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    for name in ("max_running", "max_waiting", "max_step_tokens", "prefill_chunk",
                 "max_hot_adapters"):
        assert f"{name}=" in str(e.value)
    with pytest.raises(ConfigError):
        Scheduler(cfg)


@pytest.mark.parametrize(
    "kw, fields",
    [
        (dict(max_running=8, max_step_tokens=8, prefill_chunk=8), ["max_step_tokens=8"]),
        (dict(max_step_tokens=64, prefill_chunk=128), ["prefill_chunk=128"]),
        (dict(max_running=64, max_step_tokens=32, prefill_chunk=64, max_waiting=0),
         ["max_step_tokens=32", "prefill_chunk=64", "max_waiting=0"]),
        (dict(max_running=2.5, max_hot_adapters=True),
         ["max_running=2.5", "max_hot_adapters=True"]),
    ],
)
def test_config_validation_relations(kw, fields):
    with pytest.raises(ConfigError) as e:
        SchedulerConfig(**kw).validate()
    msg = str(e.value)
    assert msg.count("; ") == len(fields) - 1
    for f in fields:
        assert f in msg


def test_default_config_is_valid():
    SchedulerConfig().validate()


# --------------------------------------------------------------------------- continuous batching


def test_request_added_mid_run_joins_next_step_with_its_first_chunk():
    sched, run = make(max_running=4, max_step_tokens=64, prefill_chunk=64)
    a = run.add("a", 10, 6)
    plan = run.step()
    assert plan.admitted == [a] and plan.prefill == [PrefillChunk(a, 0, 10)]
    assert plan.prefill[0].last
    run.step()
    b = run.add("b", 5, 3)
    plan = run.step()
    assert plan.admitted == [b]
    assert plan.decode == [a] and [(c.seq, c.start, c.end) for c in plan.prefill] == [(b, 0, 5)]
    run.run_until_idle(20)
    assert {s.request_id for s in run.finished} == {"a", "b"}


def test_finished_sequence_leaves_and_its_kv_slot_is_reused_next_step():
    sched, run = make(max_running=2, max_step_tokens=64, prefill_chunk=64)
    a, b, c = run.add("a", 4, 2), run.add("b", 4, 5), run.add("c", 4, 2)
    plan = run.step()
    assert plan.admitted == [a, b] and sched.waiting == [c]
    slot_a = run.kv_slot["a"]
    run.step()  # a samples its 2nd token and finishes
    assert a.status is SeqStatus.FINISHED and sched.running == [b]
    plan = run.step()
    assert plan.admitted == [c] and run.kv_slot["c"] == slot_a
    assert plan.decode == [b] and plan.prefill[0].seq is c


def test_max_new_tokens_one_finishes_after_prefill():
    sched, run = make(max_running=2, max_step_tokens=16, prefill_chunk=16)
    a = run.add("a", 30, 1)
    run.step()  # 16 prompt tokens
    assert a.status is SeqStatus.RUNNING and a.num_generated == 0
    run.step()  # the last 14, the only token sampled, finished
    assert a.status is SeqStatus.FINISHED and a.num_generated == 1 and a.num_prefilled == 30


# --------------------------------------------------------------------------- chunked prefill


def test_long_prompt_is_chunked_and_decodes_never_miss_a_step():
    sched, run = make(max_running=8, max_step_tokens=512, prefill_chunk=512)
    decoders = [run.add(f"d{i}", 8, 1000) for i in range(4)]
    run.step()
    assert all(d.decoding for d in decoders)
    long = run.add("long", 2000, 3)
    sizes = []
    while long.prefilling or long.status is SeqStatus.WAITING:
        before = [d.num_generated for d in decoders]
        plan = run.step()
        assert plan.decode == decoders
        assert [d.num_generated for d in decoders] == [n + 1 for n in before]
        assert [c.seq for c in plan.prefill] == [long]
        sizes.append(plan.prefill[0].end - plan.prefill[0].start)
        assert plan.num_tokens <= 512
    assert sizes == [508, 508, 508, 476]
    assert long.num_generated == 1
    assert run.step().decode == [*decoders, long]


@pytest.mark.parametrize("chunk, budget", [(64, 512), (60, 100), (7, 9), (128, 128)])
def test_prefill_chunks_respect_chunk_size_and_budget(chunk, budget):
    sched, run = make(max_running=8, max_step_tokens=budget, prefill_chunk=chunk)
    for i in range(8):
        run.add(f"s{i}", 37 * (i + 1), 4)
    run.run_until_idle(500)  # MockRunner.step asserts sizes, order and budget every step
    assert len(run.finished) == 8


def test_prefill_goes_to_earliest_arrival_first():
    sched, run = make(max_running=4, max_step_tokens=100, prefill_chunk=60)
    a, b, c = run.add("a", 150, 2), run.add("b", 50, 2), run.add("c", 10, 2)
    plan = run.step()
    assert plan.prefill == [PrefillChunk(a, 0, 60), PrefillChunk(b, 0, 40)]  # c: no budget
    plan = run.step()
    assert plan.prefill == [PrefillChunk(a, 60, 120), PrefillChunk(b, 40, 50),
                            PrefillChunk(c, 0, 10)]


# --------------------------------------------------------------------------- back-pressure


def test_full_queue_raises_engine_busy_until_it_drains():
    sched, run = make(max_running=2, max_waiting=3, max_step_tokens=16, prefill_chunk=16)
    for i in range(3):
        run.add(f"s{i}", 4, 2)
    with pytest.raises(EngineBusy) as e:
        run.add("s3", 4, 2)
    assert isinstance(e.value, FleetLMError) and e.value.retry_after_s > 0
    assert "max_waiting" in str(e.value) and sched.num_waiting == 3
    run.step()  # two of them take KV slots
    assert sched.num_waiting == 1
    run.add("s3", 4, 2)
    run.add("s4", 4, 2)
    with pytest.raises(EngineBusy):
        run.add("s5", 4, 2)
    run.run_until_idle(50)
    assert len(run.finished) == 5


def test_engine_busy_default_retry_after():
    assert EngineBusy("full").retry_after_s == 1.0
    assert EngineBusy("full", retry_after_s=2.5).retry_after_s == 2.5


def test_duplicate_request_id_is_rejected_until_it_finishes():
    sched, run = make(max_running=1, max_step_tokens=8, prefill_chunk=8)
    run.add("x", 4, 1)
    run.add("y", 4, 1)
    with pytest.raises(ValueError, match="'x'"):
        run.add("x", 4, 1)
    run.step()  # x admitted, prefilled, sampled its only token, finished
    assert sched.running == [] and sched.waiting[0].request_id == "y"
    run.add("x", 4, 1)
    with pytest.raises(ValueError, match="'y'"):
        run.add("y", 4, 1)


@pytest.mark.parametrize("prompt_len, max_new", [(0, 4), (4, 0), (-1, -1)])
def test_add_rejects_empty_requests(prompt_len, max_new):
    sched, _ = make(max_step_tokens=64, prefill_chunk=64, max_running=4)
    with pytest.raises(ValueError, match="must both be >= 1"):
        sched.add(Sequence("r", prompt_len, max_new))


# --------------------------------------------------------------------------- cancellation


def test_abort_running_frees_kv_slot_and_adapter_ref_for_the_next_step():
    sched, run = make(max_running=1, max_step_tokens=16, prefill_chunk=16, max_hot_adapters=2)
    a = run.add("a", 4, 10, adapter="x")
    b = run.add("b", 4, 10, adapter="y")
    run.step()
    assert sched.hot_pool.refcount("x") == 1 and sched.waiting == [b]
    assert run.abort("a") is a
    assert a.status is SeqStatus.FINISHED and sched.num_running == 0
    assert sched.hot_pool.refcount("x") == 0 and "x" in sched.hot_adapters()  # idle, still hot
    plan = run.step()
    assert plan.admitted == [b]


def test_abort_waiting_and_unknown():
    sched, run = make(max_running=1, max_step_tokens=16, prefill_chunk=16)
    run.add("a", 4, 10)
    b, c = run.add("b", 4, 10), run.add("c", 4, 10)
    run.step()
    assert run.abort("b") is b and b.status is SeqStatus.FINISHED
    assert sched.waiting == [c]
    assert run.abort("nope") is None
    assert run.abort("b") is None  # already gone
    run.abort("a")
    assert run.step().admitted == [c]


def test_abort_between_schedule_and_complete_step_is_skipped():
    sched, run = make(max_running=2, max_step_tokens=16, prefill_chunk=16)
    a, b = run.add("a", 4, 5), run.add("b", 40, 5)
    plan = sched.schedule()
    sched.abort("a")
    sched.complete_step(plan)
    assert a.num_prefilled == 0 and a.num_generated == 0
    assert b.num_prefilled == 12


# --------------------------------------------------------------------------- hot adapters


def test_hot_pool_evicts_least_recently_used_idle_adapter():
    pool = HotAdapters(3)
    assert [pool.acquire(n) for n in "abc"] == [(0, True), (1, True), (2, True)]
    assert pool.acquire("a") == (0, False)
    for n in "cba":  # recency is the last release, not the first acquire; a keeps one ref
        pool.release(n)
    assert pool.refcount("a") == 1 and pool.lru_idle() == "c"
    assert pool.acquire("d") == (2, True)  # c idle longest
    assert "c" not in pool and pool.slot_of("d") == 2
    assert pool.acquire("e") == (1, True)  # b, the only idle one (a is in use)
    assert pool.acquire("f") is None  # a, d, e all in use
    pool.release("a")
    assert pool.acquire("f") == (0, True)


def test_hot_pool_never_evicts_pinned_and_honours_pin_before_hot():
    pool = HotAdapters(3)
    pool.pin("b")  # not hot yet: remembered
    assert pool.slot_of("b") is None and pool.is_pinned("b")
    for n in "abc":
        pool.acquire(n)
    for n in "bac":
        pool.release(n)
    assert pool.lru_idle() == "a"  # b idles longest but is pinned
    assert pool.acquire("d") == (0, True)
    assert pool.acquire("e") == (2, True)  # c
    assert pool.acquire("f") is None  # d, e busy, b pinned
    pool.unpin("b")
    assert pool.acquire("f") == (1, True)


def test_hot_pool_pin_limit_keeps_one_rotating_slot():
    pool = HotAdapters(3)
    pool.pin("a")
    pool.pin("b")
    pool.pin("a")  # idempotent
    with pytest.raises(ConfigError, match="max_hot_adapters - 1"):
        pool.pin("c")
    pool.unpin("a")
    pool.pin("c")
    with pytest.raises(ConfigError):
        HotAdapters(1).pin("a")


def test_hot_pool_remove_frees_slot_whatever_the_refs():
    pool = HotAdapters(2)
    pool.acquire("a")
    pool.acquire("b")
    assert pool.remove("a") == 0 and pool.remove("a") is None
    assert pool.acquire("c") == (0, True)


def test_scheduler_loads_into_the_slot_of_the_lru_idle_adapter():
    sched, run = make(max_running=4, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=2)
    run.add("a1", 4, 1, adapter="a")
    run.add("b1", 4, 3, adapter="b")
    plan = run.step()
    assert plan.adapter_loads == [("a", 0), ("b", 1)]
    assert sched.hot_pool.refcount("a") == 0  # a1 finished after its first token
    run.add("c1", 4, 2, adapter="c")
    run.add("b2", 4, 2, adapter="b")  # hot: no load
    plan = run.step()
    assert plan.adapter_loads == [("c", 0)]
    assert sched.hot_adapters() == {"b": 1, "c": 0}
    assert sched.adapter_slot("c") == 0
    with pytest.raises(KeyError):
        sched.adapter_slot("a")


def test_pinned_adapter_stays_hot_while_idle():
    sched, run = make(max_running=4, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=2)
    sched.pin_adapter("a")  # before it is hot
    run.add("a1", 4, 1, adapter="a")
    run.step()
    for name in "bcdef":
        run.add(f"{name}1", 4, 1, adapter=name)
        plan = run.step()
        assert plan.adapter_loads == [(name, 1)]
        assert sched.hot_adapters()["a"] == 0
    sched.unpin_adapter("a")
    run.add("g1", 4, 1, adapter="g")
    assert run.step().adapter_loads == [("g", 0)]  # a idled longest


def test_sequences_without_adapter_never_touch_the_pool():
    sched, run = make(max_running=4, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=1)
    run.add("x1", 4, 50, adapter="x")
    for i in range(6):
        run.add(f"n{i}", 4, 3)
    plans = [run.step() for _ in range(10)]
    assert sched.hot_adapters() == {"x": 0} and sched.hot_pool.refcount("x") == 1
    assert [p.adapter_loads for p in plans] == [[("x", 0)]] + [[]] * 9
    assert sum(len(p.admitted) for p in plans) == 7


# --------------------------------------------------------------------------- no starvation


def stream(run: MockRunner, steps: int, every: int, max_new: int, watch: dict[str, int]):
    """An arrival every ``every`` steps, alternating adapters "a" and "b"; each watched
    request (request_id -> step) asks for its own adapter. Returns, per watched request, the
    step it was admitted at and the first step it was at the head of the queue."""
    admitted: dict[str, int] = {}
    head_since: dict[str, int] = {}
    for t in range(steps):
        if t % every == 0:
            run.add(f"s{t}", 8, max_new, adapter="ab"[(t // every) % 2])
        for rid, at in watch.items():
            if at == t:
                run.add(rid, 8, max_new, adapter=rid)
        w = run.sched.waiting
        if w and w[0].request_id in watch:
            head_since.setdefault(w[0].request_id, t)
        plan = run.step()
        for s in plan.admitted:
            if s.request_id in watch:
                admitted[s.request_id] = t
    return admitted, head_since


@pytest.mark.parametrize("max_new, every", [(3, 1), (5, 2), (9, 3)])
def test_new_adapter_is_not_starved_by_a_stream_for_the_busy_ones(max_new, every):
    # 2 hot slots, both kept busy by the stream (each adapter gets a new request before its
    # last one finishes); the 4 KV slots keep up with the stream so the queue stays short
    sched, run = make(max_running=4, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=2)
    watch = {"c": 20, "d": 60, "e": 61}
    admitted, head_since = stream(run, 150, every, max_new, watch)
    assert set(admitted) == set(watch)
    for rid, at in watch.items():
        # the victim's running sequences finish within max_new steps (a prompt fits one
        # step), then the head takes its slot
        assert admitted[rid] - head_since.get(rid, at) <= max_new + 1, (rid, admitted, head_since)
        assert admitted[rid] - at <= 2 * (max_new + 1)
    assert sum(s.request_id.startswith("s") for s in run.finished) > 150 // every - 10


def test_stream_without_draining_would_starve(monkeypatch):
    """The scenario above is adversarial: with draining switched off, c never runs."""
    monkeypatch.setattr(Scheduler, "_drain_for", lambda self, head: None)
    sched, run = make(max_running=4, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=2)
    admitted, _ = stream(run, 150, 1, 4, {"c": 20})
    assert "c" not in admitted


def test_while_draining_others_with_hot_adapters_or_none_still_run():
    sched, run = make(max_running=4, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=2)
    run.add("a1", 4, 10, adapter="a")
    run.add("b1", 4, 20, adapter="b")
    run.step()
    c = run.add("c1", 4, 5, adapter="c")
    a2 = run.add("a2", 4, 5, adapter="a")  # a is the LRU busy adapter: draining
    b2 = run.add("b2", 4, 5, adapter="b")
    n1 = run.add("n1", 4, 5)
    d = run.add("d1", 4, 5, adapter="d")  # cold: must not take c's slot
    plan = run.step()
    assert sched.draining == "a"
    assert plan.admitted == [b2, n1] and plan.adapter_loads == []
    assert sched.waiting == [c, a2, d]
    while c.status is SeqStatus.WAITING:
        plan = run.step()
        assert a2.status is SeqStatus.WAITING and d.status is SeqStatus.WAITING
    assert plan.adapter_loads == [("c", 0)] and plan.admitted == [c]
    assert sched.draining == "b"  # a was evicted: a2 is the new head and drains b
    assert run.steps == 11  # a1 ran steps 1-10; c took its KV slot and hot slot at step 11
    run.run_until_idle(100)
    assert len(run.finished) == 7


def test_draining_head_aborted_lets_the_victim_admit_again():
    sched, run = make(max_running=4, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=1)
    run.add("a1", 4, 10, adapter="a")
    run.step()
    run.add("c1", 4, 5, adapter="c")
    a2 = run.add("a2", 4, 5, adapter="a")
    run.step()
    assert sched.draining == "a" and a2.status is SeqStatus.WAITING
    run.abort("c1")
    assert sched.draining is None
    assert run.step().admitted == [a2]


def test_pinning_the_draining_adapter_picks_another_victim():
    sched, run = make(max_running=4, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=3)
    run.add("a1", 4, 30, adapter="a")
    run.add("b1", 4, 5, adapter="b")
    run.add("x1", 4, 30, adapter="x")
    run.step()
    c = run.add("c1", 4, 5, adapter="c")
    run.step()
    assert sched.draining == "a"
    sched.pin_adapter("a")
    run.step()
    assert sched.draining == "b"
    while c.status is SeqStatus.WAITING:
        run.step()
    assert sched.hot_adapters()["c"] == 1  # b's slot
    assert run.steps <= 6


# --------------------------------------------------------------------------- FCFS on KV slots


def test_kv_slots_are_first_come_first_served():
    sched, run = make(max_running=2, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=8)
    rng = random.Random(0)
    order = []
    for i in range(20):
        run.add(f"s{i}", rng.randint(1, 30), rng.randint(1, 8), adapter=rng.choice("abc"))
    for _ in range(200):
        if not (sched.num_waiting or sched.num_running):
            break
        order += [s.request_id for s in run.step().admitted]
    assert order == [f"s{i}" for i in range(20)]


def test_head_without_kv_slot_blocks_everyone_behind():
    sched, run = make(max_running=1, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=2)
    run.add("a1", 4, 5, adapter="a")
    run.add("b1", 4, 1, adapter="b")
    run.add("a2", 4, 1, adapter="a")  # its adapter is hot, but b1 is ahead
    run.step()
    for _ in range(4):
        assert run.step().admitted == []
    assert [s.request_id for s in run.step().admitted] == ["b1"]
    assert [s.request_id for s in run.step().admitted] == ["a2"]


# --------------------------------------------------------------------------- fail_adapter


def test_fail_adapter_removes_exactly_its_sequences():
    sched, run = make(max_running=3, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=2)
    x1 = run.add("x1", 4, 20, adapter="x")
    y1 = run.add("y1", 4, 20, adapter="y")
    n1 = run.add("n1", 4, 20)
    run.step()
    x2 = run.add("x2", 4, 20, adapter="x")
    y2 = run.add("y2", 4, 20, adapter="y")
    gone = sched.fail_adapter("x")
    assert gone == [x1, x2]
    assert all(g.status is SeqStatus.FINISHED for g in gone)
    for g in gone:
        run.release(g)
    assert sched.running == [y1, n1] and sched.waiting == [y2]
    assert sched.hot_adapters() == {"y": 1} and sched.hot_pool.refcount("y") == 1
    assert sched.fail_adapter("nope") == []
    plan = run.step()
    assert plan.admitted == [y2] and sched.hot_pool.refcount("y") == 2


def test_failed_load_removes_sequences_admitted_in_that_step():
    sched, run = make(max_running=4, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=2)
    run.fail_loads = {"bad"}
    ok = run.add("ok", 4, 3, adapter="good")
    bad = [run.add(f"bad{i}", 4, 3, adapter="bad") for i in range(2)]
    plan = run.step()
    assert plan.adapter_loads == [("good", 0), ("bad", 1)]
    assert run.failed == bad and all(b.num_prefilled == 0 for b in bad)
    assert sched.hot_adapters() == {"good": 0} and ok.num_generated == 1
    run.run_until_idle(10)
    assert run.finished == [ok]


# --------------------------------------------------------------------------- randomized stress


CONFIGS = [
    dict(max_running=4, max_waiting=16, max_step_tokens=32, prefill_chunk=16, max_hot_adapters=2),
    dict(max_running=8, max_waiting=64, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=3),
    dict(max_running=3, max_waiting=8, max_step_tokens=4, prefill_chunk=3, max_hot_adapters=1),
    dict(max_running=16, max_waiting=32, max_step_tokens=128, prefill_chunk=40, max_hot_adapters=4),
]


@pytest.mark.parametrize("overtakes", [0, 3])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "r{max_running}-h{max_hot_adapters}"
                         .format(**c))
def test_randomized_stress(cfg, seed, overtakes):
    rng = random.Random(seed)
    sched, run = make(**cfg, max_overtakes=overtakes)
    names = ["a", "b", "c", "d", "e", None, None]
    max_prompt, max_new = 3 * cfg["prefill_chunk"], 12
    # a running sequence finishes within `bound` steps: each step either spends at least
    # max_step_tokens - max_running prompt tokens on sequences that arrived no later than
    # it, or gives it a whole chunk; then it decodes max_new - 1 steps
    rate = cfg["max_step_tokens"] - cfg["max_running"]
    life = math.ceil(cfg["max_running"] * max_prompt / rate)
    life += math.ceil(max_prompt / cfg["prefill_chunk"])
    bound = life + max_new + 2
    # each later arrival admitted ahead of the head took a KV slot that freed within
    # `bound` steps; after max_overtakes of them the head goes first
    bound *= 1 + overtakes
    added: list[Sequence] = []
    aborted: list[Sequence] = []
    busy = 0
    head, head_steps = None, 0
    for t in range(400):
        arriving = t < 300
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3]) if arriving else 0):
            seq = Sequence(f"r{len(added) + busy}", rng.randint(1, max_prompt),
                           rng.randint(1, max_new), rng.choice(names))
            try:
                sched.add(seq)
                added.append(seq)
            except EngineBusy:
                busy += 1
        if rng.random() < 0.05 and added:
            seq = run.abort(rng.choice(added).request_id)
            if seq is not None:
                aborted.append(seq)
        if rng.random() < 0.03:
            name, draining = rng.choice("abcdef"), sched.draining
            try:
                sched.pin_adapter(name)
                if name == draining:  # the head drains another victim from scratch
                    head_steps = 0
            except ConfigError:
                if sched.hot_pool.pinned:
                    sched.unpin_adapter(rng.choice(sorted(sched.hot_pool.pinned)))
        if rng.random() < 0.01:
            run.fail_loads = {rng.choice("abcde")}
        w = sched.waiting
        if w and w[0] is head:
            head_steps += 1
            assert head_steps <= bound, (head.request_id, head_steps)
        else:
            head, head_steps = (w[0] if w else None), 0
        run.step()
    run.run_until_idle(20 * bound)
    done = {s.request_id for s in run.finished + aborted + run.failed}
    assert done == {s.request_id for s in added}
    assert len(done) == len(run.finished) + len(aborted) + len(run.failed)
    assert all(s.status is SeqStatus.FINISHED for s in added)
    assert len(run.finished) > len(added) // 2
    assert all(sched.hot_pool.refcount(n) == 0 for n in sched.hot_adapters())
    assert sorted(run.kv_free) == list(range(cfg["max_running"]))


# --------------------------------------------------------------------------- adapter grouping


def _admitted_ids(plan: StepPlan) -> list[str]:
    return [s.request_id for s in plan.admitted]


def _two_free_rows_four_waiting(overtakes: int) -> tuple[Scheduler, MockRunner, StepPlan]:
    """4 rows, "a" and a base request running; then b1, c1, a2 and n2 (no adapter) wait
    for the 2 free rows. The plan of that step."""
    sched, run = make(max_running=4, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=8,
                      max_overtakes=overtakes)
    run.add("a1", 4, 50, adapter="a")
    run.add("n1", 4, 50)
    run.step()
    for rid, name in [("b1", "b"), ("c1", "c"), ("a2", "a"), ("n2", None)]:
        run.add(rid, 4, 5, adapter=name)
    return sched, run, run.step()


def test_grouping_admits_sequences_of_running_adapters_first():
    sched, _, plan = _two_free_rows_four_waiting(8)
    assert _admitted_ids(plan) == ["a2", "n2"]  # no new adapter; n2 uses none
    b1, c1 = sched.waiting
    assert (b1.request_id, c1.request_id) == ("b1", "c1")
    assert (b1.overtaken, c1.overtaken) == (2, 2)


def test_grouping_takes_new_adapters_one_whole_group_at_a_time():
    sched, run = make(max_running=2, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=8,
                      max_overtakes=8)
    for rid, name in [("b1", "b"), ("c1", "c"), ("b2", "b"), ("c2", "c"), ("b3", "b")]:
        run.add(rid, 4, 5, adapter=name)
    assert _admitted_ids(run.step()) == ["b1", "b2"]
    assert [s.request_id for s in sched.waiting] == ["c1", "c2", "b3"]  # arrival order


def test_grouping_stops_at_max_overtakes():
    sched, run = make(max_running=2, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=8,
                      max_overtakes=2)
    run.add("a0", 4, 100, adapter="a")  # keeps "a" running; the other KV slot turns over
    run.step()
    b = run.add("b1", 4, 1, adapter="b")
    for i in range(1, 6):
        run.add(f"a{i}", 4, 1, adapter="a")
    order = []
    for _ in range(12):
        order += _admitted_ids(run.step())
    # a stays running, so later "a" requests join it -- until b1 has been passed twice
    assert order[:3] == ["a1", "a2", "b1"] and b.overtaken == 2
    assert order[3:] == ["a3", "a4", "a5"]


def test_strict_arrival_order_with_max_overtakes_0():
    sched, _, plan = _two_free_rows_four_waiting(0)
    assert _admitted_ids(plan) == ["b1", "c1"]
    assert [s.overtaken for s in sched.waiting] == [0, 0]


def test_grouping_changes_nothing_when_every_waiting_sequence_fits():
    sched, run = make(max_running=8, max_step_tokens=64, prefill_chunk=64, max_hot_adapters=8,
                      max_overtakes=8)
    run.add("a1", 4, 50, adapter="a")
    run.step()
    for rid, name in [("b1", "b"), ("c1", "c"), ("a2", "a"), ("n2", None)]:
        run.add(rid, 4, 5, adapter=name)
    assert _admitted_ids(run.step()) == ["b1", "c1", "a2", "n2"]
    assert sched.waiting == []


@pytest.mark.parametrize("seed", range(3))
def test_grouping_halves_the_distinct_adapters_per_step(seed):
    """What the policy is for: a queue deeper than the batch, requests spread over 16
    adapters. Steps mix far fewer distinct adapters, and every request still finishes."""
    def mean_distinct(overtakes: int) -> float:
        rng = random.Random(seed)
        sched, run = make(max_running=8, max_waiting=256, max_step_tokens=64,
                          prefill_chunk=64, max_hot_adapters=16, max_overtakes=overtakes)
        counts, n = [], 0
        for t in range(300):
            while t < 200 and sched.num_waiting < 24:  # a closed loop of 32 clients
                run.add(f"r{n}", 8, rng.randint(4, 12), adapter=f"x{rng.randrange(16)}")
                n += 1
            run.step()
            counts.append(len({s.adapter for s in sched.running}))
        run.run_until_idle(500)
        assert len(run.finished) == n
        return sum(counts[:200]) / 200

    strict, grouped = mean_distinct(0), mean_distinct(64)
    assert strict > 5.5  # 8 rows over 16 adapters: ~6.5 distinct in arrival order
    assert grouped < 0.6 * strict, (strict, grouped)


def test_max_overtakes_is_validated():
    with pytest.raises(ConfigError, match=r"max_overtakes=-1: must be an integer >= 0"):
        Scheduler(SchedulerConfig(max_overtakes=-1))
