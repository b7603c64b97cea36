"""Speculative decoding with a draft model: whatever the draft proposes, the engine's greedy
output is token for token the one without it; a draft that agrees saves steps; the draft's
caches catch up after rejections and evictions; an incompatible draft is refused."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import pytest
import torch
import transformers

from fleetlm.adapters import AdapterStore
from fleetlm.adapters.random import make_random_adapter
from fleetlm.engine.draft_model import DraftModel
from fleetlm.engine.engine import Engine, EngineConfig, EngineEvent
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.errors import ConfigError
from fleetlm.models.loader import load_model


@pytest.fixture(scope="module")
def target(tiny_base):
    return load_model(str(tiny_base), dtype="float32", max_positions=512)


@pytest.fixture(scope="module")
def other_draft(tiny_base, tmp_path_factory):
    """A different random model (one layer, narrower) with the target's tokenizer."""
    folder = tmp_path_factory.mktemp("draft")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_base)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=512,
                                   tie_word_embeddings=True, initializer_range=0.3)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_model(str(folder), dtype="float32", max_positions=512)


@pytest.fixture(scope="module")
def store(target, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_random_adapter(root / "a", target.config, rank=8, alpha=16, seed=0, std=0.2)
    return AdapterStore(root, target.config, dtype=torch.float32, max_rank=16)


def cfg(**kw) -> EngineConfig:
    return EngineConfig(**{**dict(max_running=4, max_len=160, max_hot_adapters=1,
                                  prefix_cache_bytes=0), **kw})


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 40000, (12 + 5 * i,), generator=g).tolist() for i in range(n)]


def run(engine, requests):
    events: dict[str, list[EngineEvent]] = defaultdict(list)
    ids = [engine.submit(p, params, adapter=a, callback=lambda ev: events[ev.request_id].append(ev))
           for p, params, a in requests]
    steps = engine.steps
    while engine.step():
        pass
    return [[e.token_id for e in events[i] if e.token_id is not None] for i in ids], \
        engine.steps - steps


@pytest.mark.parametrize("adapter", [None, "a"])
def test_a_draft_that_agrees_saves_steps_and_changes_nothing(target, store, adapter):
    """The target as its own draft (its own KV caches): every draft token is accepted."""
    requests = [(p, greedy(24), adapter) for p in prompts(2)]
    want, plain_steps = run(Engine(target, cfg(), store=store), requests)
    spec = Engine(target, cfg(speculative_tokens=4), store=store, draft=target)
    got, spec_steps = run(spec, requests)
    assert got == want and all(len(t) == 24 for t in got)
    if adapter is None:  # the draft is the target itself: every draft token is accepted
        assert spec_steps < plain_steps * 0.6, (spec_steps, plain_steps)
    assert spec.draft is not None and spec.draft.proposed > 0


def test_a_draft_that_disagrees_changes_nothing(target, other_draft, store):
    requests = [(p, greedy(20), a) for p, a in zip(prompts(3), [None, "a", None], strict=True)]
    want, _ = run(Engine(target, cfg(), store=store), requests)
    spec = Engine(target, cfg(speculative_tokens=3), store=store, draft=other_draft)
    got, _ = run(spec, requests)
    assert got == want
    assert spec.draft is not None and spec.draft.proposed > 0
    assert not spec.draft._caches  # finished sequences' caches are dropped


def test_draft_caches_catch_up_after_rejections_and_evictions(other_draft, target):
    v = target.config.vocab_size
    h = prompts(1)[0]
    fresh = lambda hist: DraftModel(other_draft, 160).propose("x", hist, 3, v)  # noqa: E731
    d = DraftModel(other_draft, 160, max_sequences=1)
    first = d.propose("a", h, 3, v)
    assert first == fresh(h) and len(first) == 3
    # the target accepted one draft token and then chose another than the draft's second
    h2 = h + [first[0], (first[1] + 1) % v]
    assert d.propose("a", h2, 3, v) == fresh(h2)
    other = prompts(2)[1]
    assert d.propose("b", other, 2, v) == fresh(other)[:2]  # evicts "a" (one cache)
    assert list(d._caches) == ["b"]
    assert d.propose("a", h2, 3, v) == fresh(h2)  # "a" catches up from nothing
    assert d.propose("a", list(range(150)), 20, v) == []  # would pass max_len


def test_bad_drafts_are_refused_with_the_fix(target, other_draft):
    with pytest.raises(ConfigError, match="speculative-tokens"):
        Engine(target, cfg(), draft=other_draft)

    class OtherTokenizer:
        def get_vocab(self):
            return {"a": 0, "b": 1}

    alien = dataclasses.replace(other_draft, tokenizer=OtherTokenizer(), name="alien")
    with pytest.raises(ConfigError, match="does not share the tokenizer.*same model family"):
        Engine(target, cfg(speculative_tokens=2), draft=alien)
    with pytest.raises(ConfigError, match="max_len"):
        DraftModel(other_draft, 4096)


def test_serve_refuses_a_draft_model_without_speculative_tokens():
    """Checked with the other options, before any model is loaded."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fleetlm", "serve", "--draft-model",
                        "smollm2-135m"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--draft-model: a draft model proposes speculative tokens: set " \
           "--speculative-tokens N" in r.stderr
    assert "Traceback" not in r.stderr
