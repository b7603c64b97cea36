"""Prefix caching: shared prompt prefixes are computed once and copied into later requests'
KV rows, and the answers are the ones computed without the cache."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from fleetlm.adapters import AdapterStore
from fleetlm.adapters.random import make_random_adapter
from fleetlm.engine.engine import Engine, EngineConfig, EngineEvent
from fleetlm.engine.prefix_cache import PrefixCache
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.errors import ConfigError
from fleetlm.models.loader import load_model

GREEDY = dict(temperature=0.0, ignore_eos=True, logprobs=0)


# -- the cache on its own ----------------------------------------------------------------

def kv(n: int, fill: float = 1.0) -> torch.Tensor:
    return torch.full((2, 2, 1, n, 4), float(fill))  # [layers, k/v, heads, n, dim]: 64 B per token


def test_lookup_finds_the_longest_cached_whole_block_prefix_and_leaves_a_token():
    c = PrefixCache(1 << 20, block=4)
    prompt = list(range(11))
    assert c.wants(None, prompt) == 8  # two whole blocks; the 11th token is computed
    c.put(None, prompt, kv(8))
    assert c.wants(None, prompt) == 0  # already there
    assert c.lookup(None, prompt).n == 8
    assert c.lookup(None, prompt[:9]).n == 8
    assert c.lookup(None, prompt[:8]).n == 4  # 8 tokens: one must be left to compute
    assert c.lookup(None, prompt[:6] + [99, 98, 97]).n == 4  # shares the first block only
    assert c.lookup(None, [99] + prompt[1:]) is None  # differs in the first token
    assert c.lookup(None, prompt[:4]) is None
    assert (c.hits, c.misses, c.hit_tokens) == (4, 2, 24)


def test_an_adapter_never_reuses_another_adapters_prefix():
    c = PrefixCache(1 << 20, block=4)
    prompt = list(range(9))
    c.put("a", prompt, kv(8))
    assert c.lookup("a", prompt).n == 8
    assert c.lookup("b", prompt) is None and c.lookup(None, prompt) is None
    c.drop_adapter("a")
    assert c.lookup("a", prompt) is None and len(c) == 0 and c.nbytes == 0


def test_least_recently_used_entries_go_first_under_the_budget():
    c = PrefixCache(3 * kv(4).nbytes, block=4)
    prompts = [[i] * 5 for i in range(3)]
    for i, p in enumerate(prompts):
        c.put(None, p, kv(4, i))
    assert c.lookup(None, prompts[0]).n == 4  # 0 is now the most recent
    c.put(None, [7] * 5, kv(4, 7))  # evicts 1, the least recently used
    assert c.lookup(None, prompts[1]) is None
    assert c.lookup(None, prompts[0]).kv[0, 0, 0, 0, 0] == 0
    assert c.nbytes == 3 * kv(4).nbytes
    c.put(None, list(range(100)), kv(96))  # larger than the whole budget: not kept
    assert len(c) == 3


def test_a_shared_boundary_survives_the_eviction_of_one_holder():
    c = PrefixCache(1 << 20, block=4)
    long_a, long_b = list(range(4)) + [1] * 5, list(range(4)) + [2] * 5
    c.put(None, long_a, kv(8, 1))
    c.put(None, long_b, kv(8, 2))
    c._evict(next(iter(c._entries)))  # evict long_a, the older entry
    assert c.lookup(None, list(range(4)) + [3, 3]).n == 4  # the first block, from long_b


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="block=0"):
        PrefixCache(10, block=0)
    with pytest.raises(ValueError, match="not a positive multiple of the block"):
        PrefixCache(1 << 20, block=4).put(None, list(range(9)), kv(6))


# -- in the engine -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm(tiny_checkpoints):
    return load_model(str(tiny_checkpoints["llama"]), dtype="float32", with_tokenizer=False,
                      max_positions=1024)


@pytest.fixture(scope="module")
def store(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(["a", "b"]):
        make_random_adapter(root / name, lm.config, rank=8, alpha=16, seed=i, std=0.2)
    return AdapterStore(root, lm.config, dtype=torch.float32, max_rank=16)


def run(engine, requests, prompt_logprobs=None):
    events: dict[str, list[EngineEvent]] = defaultdict(list)
    ids = [engine.submit(p, SamplingParams(max_tokens=n, prompt_logprobs=prompt_logprobs,
                                           **GREEDY),
                         adapter=a, callback=lambda ev: events[ev.request_id].append(ev))
           for p, n, a in requests]
    while engine.step():
        pass
    return [([e.token_id for e in events[i] if e.token_id is not None],
             [e.logprob for e in events[i] if e.token_id is not None]) for i in ids]


def prefill_tokens(engine) -> list[int]:
    """Count the prompt tokens each step's forward computes."""
    counted: list[int] = []
    execute = engine.runner.execute

    def counting(decode, prefill):
        counted.append(sum(len(p.tokens) for p in prefill))
        return execute(decode, prefill)

    engine.runner.execute = counting
    return counted


def shared_prompts(n: int, prefix_len: int = 100, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 128, (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(0, 128, (3 + i,), generator=g).tolist() for i in range(n)]


def cfg(**kw):
    return EngineConfig(**{**dict(max_running=4, max_len=256, max_step_tokens=128,
                                  prefill_chunk=64, max_hot_adapters=2), **kw})


def test_shared_prefixes_are_computed_once_and_answer_as_without_the_cache(lm, store):
    plain = Engine(lm, cfg(prefix_cache_bytes=0), store=store)
    cached = Engine(lm, cfg(prefix_block=32), store=store)
    assert plain.prefix_cache is None and cached.prefix_cache is not None
    first, later = shared_prompts(5)[:1], shared_prompts(5)[1:]
    counted = prefill_tokens(cached)
    for batch in ([(p, 6, None) for p in first], [(p, 6, None) for p in later]):
        want, got = run(plain, batch), run(cached, batch)
        for (want_ids, want_lp), (got_ids, got_lp) in zip(want, got, strict=True):
            assert got_ids == want_ids
            torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp),
                                       atol=1e-4, rtol=0)
    # the first prompt is computed whole; the later ones reuse 96 of its 100 shared tokens
    assert sum(counted) == len(first[0]) + sum(len(p) - 96 for p in later)
    assert cached.prefix_cache.hits == 4 and cached.prefix_cache.hit_tokens == 4 * 96


def test_adapters_keep_their_own_prefixes(lm, store):
    plain = Engine(lm, cfg(prefix_cache_bytes=0), store=store)
    cached = Engine(lm, cfg(), store=store)
    prompts = shared_prompts(3, seed=1)
    batches = [[(prompts[0], 5, "a")], [(prompts[1], 5, "b"), (prompts[2], 5, None)],
               [(prompts[2], 5, "a"), (prompts[1], 5, "b")]]
    for batch in batches:
        want, got = run(plain, batch), run(cached, batch)
        for (want_ids, want_lp), (got_ids, got_lp) in zip(want, got, strict=True):
            assert got_ids == want_ids
            torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp),
                                       atol=1e-4, rtol=0)
    # batch 2 finds nothing ("b" and no adapter are new); batch 3 reuses "a"'s and "b"'s
    assert cached.prefix_cache.hits == 2 and cached.prefix_cache.misses == 3


def test_prompt_logprob_requests_compute_every_prompt_token(lm):
    engine = Engine(lm, cfg(max_hot_adapters=0))
    prompts = shared_prompts(2, seed=2)
    run(engine, [(prompts[0], 2, None)])
    counted = prefill_tokens(engine)
    run(engine, [(prompts[1], 2, None)], prompt_logprobs=1)
    assert sum(counted) == len(prompts[1]) and engine.prefix_cache.hits == 0


def test_bad_prefix_settings_name_the_field(lm):
    with pytest.raises(ConfigError, match="prefix_cache_bytes=-1"):
        Engine(lm, cfg(prefix_cache_bytes=-1))
    with pytest.raises(ConfigError, match="prefix_block=0"):
        Engine(lm, cfg(prefix_block=0))
