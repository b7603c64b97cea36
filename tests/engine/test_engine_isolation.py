"""One bad request cannot take the engine down (tiny random model, float32).

Token ids outside the vocabulary are refused at submit; a request whose forward fails
anyway fails alone: the requests decoding beside it, prefilling with it and waiting behind
it all finish with the tokens they would have had without it.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from fleetlm.engine.engine import Engine, EngineConfig, EngineEvent
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.errors import ConfigError
from fleetlm.models.loader import load_model
from tests.engine.test_engine import GREEDY, prompts, reference, tokens


@pytest.fixture(scope="module")
def lm(tiny_checkpoints):
    return load_model(str(tiny_checkpoints["llama"]), dtype="float32", with_tokenizer=False,
                      max_positions=1024)


def test_out_of_vocabulary_ids_are_refused_at_submit(lm):
    engine = Engine(lm, EngineConfig(max_running=1, max_len=64, max_hot_adapters=0))
    vocab = lm.config.vocab_size
    for bad, at in (([1, 2, vocab], 2), ([-1, 2], 0), ([3, vocab + 1000, 4], 1)):
        with pytest.raises(ConfigError) as e:
            engine.submit(bad, SamplingParams(max_tokens=2), callback=lambda ev: None)
        assert e.value.param == "prompt"
        msg = str(e.value)
        assert str(bad[at]) in msg and str(vocab) in msg and f"position {at}" in msg
    assert engine.scheduler.num_waiting == 0 and not engine._requests
    engine.submit([0, vocab - 1], SamplingParams(max_tokens=1), callback=lambda ev: None)


def _scene(engine):
    """A long request decoding, then a good and a bad prompt prefilled in the same step and a
    fourth waiting for a row (3 rows). Returns the events and the ids (long, good, bad, late)."""
    events: dict[str, list[EngineEvent]] = defaultdict(list)
    ps = prompts(4, seed=11)

    def submit(p, n, rid):
        return engine.submit(p, SamplingParams(max_tokens=n, **GREEDY), request_id=rid,
                             callback=lambda ev: events[ev.request_id].append(ev))

    long = submit(ps[0], 30, "long")
    for _ in range(3):
        engine.step()  # the long one is decoding
    ids = (long, submit(ps[1], 6, "good"), submit([5, 6, 7, 8], 6, "bad"), submit(ps[2], 5, "late"))
    assert engine.scheduler.num_waiting == 3
    return events, ids, ps


def _check_survivors(lm, engine, events, ids, ps):
    long, good, bad, late = ids
    assert events[bad][-1].finish_reason == "error"
    for rid, p, n in ((long, ps[0], 30), (good, ps[1], 6), (late, ps[2], 5)):
        assert events[rid][-1].finish_reason == "length", (rid, events[rid][-1])
        assert tokens(events[rid]) == reference(lm, p, n)[0]
    assert engine.runner.rows.num_free == engine.num_rows and not engine.has_work()
    assert not engine._requests


def test_a_forward_that_fails_for_one_request_fails_only_that_request(lm, monkeypatch):
    engine = Engine(lm, EngineConfig(max_running=3, max_len=128, max_hot_adapters=0))
    real = engine.runner.execute

    def execute(decode, prefill):  # a forward that fails whenever "bad"'s prompt is in it
        if any(p.seq_id == "bad" for p in prefill):
            raise RuntimeError("poisoned chunk")
        return real(decode, prefill)

    monkeypatch.setattr(engine.runner, "execute", execute)
    events, ids, ps = _scene(engine)
    while engine.step():
        pass
    assert "poisoned" in str(events[ids[2]][-1].error)
    _check_survivors(lm, engine, events, ids, ps)


def test_a_token_id_past_the_embedding_fails_only_its_request(lm):
    """The defect itself: an id outside the vocabulary that reaches the embedding lookup
    (here slipped in after submit's check) fails its request, not the batch."""
    engine = Engine(lm, EngineConfig(max_running=3, max_len=128, max_hot_adapters=0))
    events, ids, ps = _scene(engine)
    engine._requests[ids[2]].prompt[2] = lm.config.vocab_size + 10
    while engine.step():
        pass
    _check_survivors(lm, engine, events, ids, ps)


def test_a_failing_decode_batch_spares_the_prefill_and_the_queue(lm, monkeypatch):
    """The decode rows are one forward (a view of cache rows 0..n-1) and fail together when
    it fails on its own; a request prefilling in the same step and one waiting still finish."""
    engine = Engine(lm, EngineConfig(max_running=2, max_len=128, max_hot_adapters=0))
    events: dict[str, list[EngineEvent]] = defaultdict(list)
    ps = prompts(3, seed=12)

    def submit(p, n):
        return engine.submit(p, SamplingParams(max_tokens=n, **GREEDY),
                             callback=lambda ev: events[ev.request_id].append(ev))

    doomed = submit(ps[0], 30)
    for _ in range(3):
        engine.step()
    fresh, late = submit(ps[1], 4), submit(ps[2], 4)
    real = engine.runner.execute
    calls = {"n": 0}

    def execute(decode, prefill):  # the next forwards holding a decode fail
        if decode and calls["n"] < 2:
            calls["n"] += 1
            raise RuntimeError("decode failed")
        return real(decode, prefill)

    monkeypatch.setattr(engine.runner, "execute", execute)
    while engine.step():
        pass
    assert events[doomed][-1].finish_reason == "error"
    for rid, p in ((fresh, ps[1]), (late, ps[2])):
        assert events[rid][-1].finish_reason == "length"
        assert tokens(events[rid]) == reference(lm, p, 4)[0]
    assert engine.runner.rows.num_free == 2 and not engine.has_work()


def test_a_failing_sampler_fails_only_its_request(lm, monkeypatch):
    engine = Engine(lm, EngineConfig(max_running=3, max_len=128, max_hot_adapters=0))
    events: dict[str, list[EngineEvent]] = defaultdict(list)
    ps = prompts(2, seed=13)
    cb = lambda ev: events[ev.request_id].append(ev)  # noqa: E731
    good = engine.submit(ps[0], SamplingParams(max_tokens=5, **GREEDY), callback=cb)
    bad = engine.submit(ps[1], SamplingParams(max_tokens=5, **GREEDY), callback=cb)

    def broken(logits):
        raise ValueError("sampler broke")

    monkeypatch.setattr(engine._requests[bad].sampler, "sample", broken)
    while engine.step():
        pass
    assert events[bad][-1].finish_reason == "error" and "sampler" in str(events[bad][-1].error)
    assert events[good][-1].finish_reason == "length"
    assert tokens(events[good]) == reference(lm, ps[0], 5)[0]
    assert engine.runner.rows.num_free == 3 and not engine.has_work()
