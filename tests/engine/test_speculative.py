"""Speculative decoding by prompt lookup: drafts from the context, checked in one forward;
the engine's greedy output is token for token the one without speculation, in fewer steps."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from fleetlm.adapters import AdapterStore
from fleetlm.adapters.random import make_random_adapter
from fleetlm.engine.engine import Engine, EngineConfig, EngineEvent
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.speculative import DraftStats, accept, propose
from fleetlm.errors import ConfigError
from fleetlm.models.loader import load_model


def test_propose_continues_the_latest_earlier_occurrence_of_the_longest_suffix():
    h = [5, 6, 7, 8, 9, 1, 6, 7, 8, 2, 3, 6, 7, 8]
    assert propose(h, 2) == [2, 3]  # "6 7 8" last seen before the end at index 6
    assert propose(h, 10) == [2, 3, 6, 7, 8]  # up to the end of the history
    assert propose([1, 2, 3, 4], 3) == []  # no earlier occurrence of any suffix
    assert propose([4, 1, 2, 9, 2], 2) == [9, 2]  # falls back to a 1-gram
    assert propose([1], 4) == [] and propose([1, 1, 1], 0) == []
    assert propose([7, 7, 7, 7], 3) == [7]  # "7 7 7" occurs at 0: one token follows it


def test_accept_takes_the_agreed_prefix_and_the_models_next_token():
    def logits(tokens):
        x = torch.zeros(len(tokens), 10)
        x[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
        return x

    assert accept([3, 4, 5], logits([3, 4, 5, 6]), 10) == [3, 4, 5, 6]  # all agreed
    assert accept([3, 4, 5], logits([3, 9, 5, 6]), 10) == [3, 9]  # 4 rejected: 9 instead
    assert accept([3], logits([8, 1]), 10) == [8]
    assert accept([], logits([2]), 10) == [2]


def test_draft_length_grows_on_full_accepts_and_shrinks_on_misses():
    s = DraftStats()
    assert s.room(6) == 6  # a new request drafts the engine's maximum
    s.record(6, 2, k=6)  # partly accepted: one shorter
    assert s.room(6) == 5
    s.record(5, 5, k=6)  # all accepted: two longer, capped at the maximum
    assert s.room(6) == 6
    for _ in range(10):
        s.record(1, 0, k=6)
    assert s.room(6) == 1  # never below one token
    s.record(1, 1, k=6)
    assert s.room(6) == 3
    assert s.room(2) == 2  # the engine's maximum still caps it
    assert (s.proposed, s.accepted) == (6 + 5 + 10 + 1, 2 + 5 + 1)


def test_rejected_drafts_pause_drafting_longer_each_time_up_to_max_pause():
    s = DraftStats(max_pause=4)
    assert s.ready()
    pauses = []
    for _ in range(5):
        s.record(3, 0, k=6)  # nothing accepted
        skipped = 0
        while not s.ready():
            skipped += 1
        pauses.append(skipped)
    assert pauses == [1, 2, 4, 4, 4]  # doubling, capped
    s.record(3, 1, k=6)  # one accepted token ends the streak
    assert s.ready() and s.misses == 0
    s.record(3, 0, k=6)
    assert not s.ready() and s.ready()  # the next miss pauses one step again


@pytest.fixture(scope="module")
def lm(tiny_checkpoints):
    return load_model(str(tiny_checkpoints["llama"]), dtype="float32", with_tokenizer=False,
                      max_positions=1024)


@pytest.fixture(scope="module")
def store(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_random_adapter(root / "a", lm.config, rank=8, alpha=16, seed=0, std=0.2)
    return AdapterStore(root, lm.config, dtype=torch.float32, max_rank=16)


def run(engine, requests):
    events: dict[str, list[EngineEvent]] = defaultdict(list)
    ids = [engine.submit(p, params, adapter=a,
                         callback=lambda ev: events[ev.request_id].append(ev))
           for p, params, a in requests]
    steps = engine.steps
    while engine.step():
        pass
    outs = [[e.token_id for e in events[i] if e.token_id is not None] for i in ids]
    return outs, engine.steps - steps, [events[i][-1].finish_reason for i in ids]


def repetitive(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    unit = torch.randint(0, 128, (7,), generator=g).tolist()
    return (unit * 12)[: n]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def cfg(**kw):
    return EngineConfig(**{**dict(max_running=4, max_len=160, max_hot_adapters=1), **kw})


@pytest.mark.parametrize("adapter", [None, "a"])
def test_speculation_gives_the_plain_greedy_tokens_in_fewer_steps(lm, store, adapter):
    plain = Engine(lm, cfg(), store=store)
    spec = Engine(lm, cfg(speculative_tokens=4), store=store)
    requests = [(repetitive(40, s), greedy(48), adapter) for s in range(2)]
    want, plain_steps, _ = run(plain, requests)
    got, spec_steps, reasons = run(spec, requests)
    assert got == want and reasons == ["length", "length"]
    assert spec_steps < plain_steps, "drafts from a repetitive context should be accepted"
    assert all(len(t) == 48 for t in got)  # never past max_tokens
    # the counters: every step saved is an accepted draft token (one token a step otherwise)
    stats, none = spec.stats(), plain.stats()
    assert none["draft_tokens_proposed"] == none["draft_tokens_accepted"] == 0
    assert 0 < stats["draft_tokens_accepted"] <= stats["draft_tokens_proposed"]
    assert stats["draft_tokens_accepted"] >= plain_steps - spec_steps


def test_requests_that_sample_or_report_logprobs_are_not_drafted(lm, store):
    """In a step that checks drafts, a sampling request rides along as a one-token chunk
    and is sampled by its own sampler, with its own seed."""
    spec = Engine(lm, cfg(speculative_tokens=4), store=store)
    plain = Engine(lm, cfg(), store=store)
    sampled = SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)
    requests = [(repetitive(30, 1), greedy(20), None), (repetitive(30, 2), sampled, None),
                (repetitive(30, 3), greedy(20, logprobs=1), None)]
    want, _, _ = run(plain, requests)
    got, _, _ = run(spec, requests)
    assert got == want


def test_stop_tokens_end_a_drafted_run(lm):
    plain = Engine(lm, cfg(max_hot_adapters=0))
    prompt = repetitive(40, 0)
    free, _, _ = run(plain, [(prompt, greedy(30), None)])
    stop_at = free[0][10]  # a token the greedy run produces at step 11
    params = SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[stop_at])
    want, _, want_reason = run(plain, [(prompt, params, None)])
    spec = Engine(lm, cfg(max_hot_adapters=0, speculative_tokens=6))
    got, _, reason = run(spec, [(prompt, params, None)])
    assert got == want and reason == want_reason == ["stop"]


def test_bad_speculation_settings_name_the_field(lm):
    with pytest.raises(ConfigError, match="speculative_tokens=-1"):
        Engine(lm, cfg(speculative_tokens=-1))
