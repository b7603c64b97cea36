"""Compiled decode steps (fleetlm.models.compiled_decode) give the eager engine's tokens.

Two copies of the tiny random model, one compiled: the same requests (one stream, mixed
batches, adapters of mixed ranks) must give the same greedy tokens and logprobs; after
``Engine.warmup()`` no request compiles anything; a failing compiled graph and
``FLEETLM_COMPILE=0`` both leave a working eager engine.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import pytest
import torch

from fleetlm.adapters import AdapterStore
from fleetlm.adapters.random import make_random_adapter
from fleetlm.engine.engine import Engine, EngineConfig, EngineEvent
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.models.loader import load_model

pytestmark = pytest.mark.slow  # compiles four small graphs per model (~1 min on 2 cores)

GREEDY = dict(temperature=0.0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def folder(tiny_checkpoints):
    return tiny_checkpoints["llama"]


def load(folder, quantize="none"):
    return load_model(str(folder), dtype="float32", quantize=quantize, with_tokenizer=False,
                      max_positions=1024)


@pytest.fixture(scope="module")
def store(folder, tmp_path_factory):
    lm = load(folder)
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, r, targets) in enumerate([("r8", 8, None), ("r4-qv", 4, ("q_proj", "v_proj")),
                                            ("r16-mlp", 16, ("gate_proj", "down_proj"))]):
        kw = {} if targets is None else {"targets": targets}
        make_random_adapter(root / name, lm.config, rank=r, alpha=2 * r, seed=i, std=0.2, **kw)
    return AdapterStore(root, lm.config, dtype=torch.float32, max_rank=16)


def run(engine, requests):
    events: dict[str, list[EngineEvent]] = defaultdict(list)
    ids = [engine.submit(p, SamplingParams(max_tokens=n, **GREEDY), adapter=a,
                         callback=lambda ev: events[ev.request_id].append(ev))
           for p, n, a in requests]
    while engine.step():
        pass
    return [([e.token_id for e in events[i] if e.token_id is not None],
             [e.logprob for e in events[i] if e.token_id is not None]) for i in ids]


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 40, 17, 1, 25, 9, 33, 12][:n]
    return [torch.randint(0, 128, (k,), generator=g).tolist() for k in lengths]


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def workload():
    names = ["r8", None, "r4-qv", "r16-mlp", None, "r8", None, None]
    ps = prompts(8, seed=3)
    one = [(ps[0], 12, None)]  # one stream: the whole-stack graph
    one_adapter = [(ps[1], 6, "r4-qv")]  # one row with an adapter: the layer graph, batch 1
    plain = [(p, 7, None) for p in ps[2:6]]  # several rows, no adapter
    mixed = [(p, 6 + i % 3, a) for i, (p, a) in enumerate(zip(ps, names, strict=True))]
    return [one, one_adapter, plain, mixed]


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_compiled_engine_gives_the_eager_tokens_and_compiles_only_at_warmup(folder, store,
                                                                             quantize):
    cfg = dict(max_running=8, max_len=128, max_step_tokens=64, prefill_chunk=32,
               max_hot_adapters=3)
    eager = Engine(load(folder, quantize), EngineConfig(**cfg), store=store)
    compiled = Engine(load(folder, quantize), EngineConfig(**cfg, compile=True), store=store)
    assert compiled.lm.model.decode_compiled and not eager.lm.model.decode_compiled
    assert compiled.warmup() > 0 and eager.warmup() == 0.0
    after_warmup = graphs()
    for requests in workload():
        want, got = run(eager, requests), run(compiled, requests)
        for (want_ids, want_lp), (got_ids, got_lp) in zip(want, got, strict=True):
            assert got_ids == want_ids
            torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp),
                                       atol=1e-4, rtol=0)
    assert graphs() == after_warmup, "a request compiled a graph that warmup() did not build"
    assert compiled.lm.model.decode_compiled  # still compiled: nothing failed on the way


def test_warmup_refuses_a_busy_engine(folder):
    engine = Engine(load(folder), EngineConfig(max_running=2, max_len=64, max_hot_adapters=0,
                                               compile=True))
    engine.submit([1, 2, 3], SamplingParams(max_tokens=2, **GREEDY), callback=lambda ev: None)
    engine.step()  # admitted and prefilled
    with pytest.raises(RuntimeError, match="before any sequence is admitted"):
        engine.warmup()


def test_a_failing_compiled_graph_falls_back_to_eager_once(folder, caplog):
    eager = Engine(load(folder), EngineConfig(max_running=4, max_len=64, max_hot_adapters=0))
    engine = Engine(load(folder), EngineConfig(max_running=4, max_len=64, max_hot_adapters=0,
                                               compile=True))
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no C++ compiler (provoked)")

    compiled = engine.lm.model._compiled
    assert compiled is not None
    compiled._single = broken
    compiled._layers = [broken] * len(compiled._layers)
    requests = [(p, 5, None) for p in prompts(3, seed=5)]
    with caplog.at_level(logging.WARNING, logger="fleetlm.models.compiled_decode"):
        assert run(engine, requests) == run(eager, requests)
    assert not engine.lm.model.decode_compiled and len(calls) == 1
    assert "decoding eagerly from now on" in caplog.text and "provoked" in caplog.text


def test_fleetlm_compile_0_turns_compilation_off(folder, monkeypatch):
    monkeypatch.setenv("FLEETLM_COMPILE", "0")
    engine = Engine(load(folder), EngineConfig(max_running=2, max_len=64, max_hot_adapters=0,
                                               compile=True))
    assert not engine.lm.model.decode_compiled and engine.warmup() == 0.0
    assert run(engine, [([1, 2, 3], 3, None)])[0][0]  # and it still decodes


def test_inductor_cache_goes_to_fleetlms_cache_unless_the_user_chose_one(monkeypatch, tmp_path):
    """Torch writes its own default (under /tmp) into the variable the first time anything
    asks for its cache: that counts as unset; a folder the user chose is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    from fleetlm.models.compiled_decode import default_cache_dir, use_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ours = str(tmp_path / "xdg" / "fleetlm" / "inductor")
    assert str(default_cache_dir()) == ours
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert use_cache_dir() == ours
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", torch_default())
    assert use_cache_dir() == ours
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_cache_dir() == str(tmp_path / "mine")
