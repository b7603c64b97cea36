"""The engine end to end on a tiny random model (float32).

References: the single-stream Generator for plain requests, and the same Generator on a
copy of the model with the adapter merged into its weights (W + scale * B @ A) for
adapter requests -- a per-request path that shares no LoRA code with the batched one.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
import torch

from fleetlm.adapters import AdapterError, AdapterStore
from fleetlm.adapters.random import make_random_adapter
from fleetlm.engine.engine import Engine, EngineConfig, EngineEvent
from fleetlm.engine.generate import Generator
from fleetlm.engine.lora import quantize_rows
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.errors import ConfigError, EngineBusy
from fleetlm.models.llama import FUSED_PROJECTIONS, fused_rows
from fleetlm.models.loader import load_model

GREEDY = dict(temperature=0.0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def folder(tiny_checkpoints):
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def lm(folder):
    return load_model(str(folder), dtype="float32", with_tokenizer=False, max_positions=1024)


@pytest.fixture(scope="module")
def store(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    specs = {  # name: (rank, alpha, targets, rslora)
        "r8-all": (8, 16, None, False),
        "r4-qv": (4, 8, ("q_proj", "v_proj"), False),
        "r16-rs": (16, 8, ("k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"), True),
    }
    for i, (name, (r, alpha, targets, rs)) in enumerate(specs.items()):
        kw = {} if targets is None else {"targets": targets}
        make_random_adapter(root / name, lm.config, rank=r, alpha=alpha, seed=i, std=0.2,
                            use_rslora=rs, **kw)
    return AdapterStore(root, lm.config, dtype=torch.float32, max_rank=16)


def merged(folder, adapter, int8=False):
    """A fresh copy of the model with the adapter merged into its (fused) weights; int8:
    the adapter as int8 hot slots hold it (each A row and B row quantised)."""
    lm = load_model(str(folder), dtype="float32", with_tokenizer=False, max_positions=1024)
    params = dict(lm.model.named_parameters())
    rows = fused_rows(lm.config)
    where = {}  # HF suffix -> (our suffix, row offset)
    for fused, parts in FUSED_PROJECTIONS.items():
        off = 0
        for part, n in zip(parts, rows[fused], strict=True):
            where[part] = (fused, off)
            off += n
    with torch.no_grad():
        for name, mod in adapter.modules.items():
            prefix, proj = name.rsplit(".", 2)[0], ".".join(name.rsplit(".", 2)[1:])
            ours, off = where.get(proj, (proj, 0))
            w = params[f"{prefix}.{ours}.weight"]
            a, b = mod.a.float(), mod.b.float()
            if int8:
                (qa, sa), (qb, sb) = quantize_rows(a), quantize_rows(b)
                a, b = qa.float() * sa[:, None], qb.float() * sb[:, None]
            delta = mod.scale * (b @ a)
            w[off: off + delta.shape[0]] += delta
    return lm


def reference(lm, prompt, max_tokens):
    gen = Generator(lm, max_len=256)
    res = gen.generate(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
    return res.token_ids, res.logprobs


def run(engine, requests):
    """Submit (prompt, max_tokens, adapter) requests, step until idle; per-request events."""
    events: dict[str, list[EngineEvent]] = defaultdict(list)
    ids = [engine.submit(p, SamplingParams(max_tokens=n, **GREEDY), adapter=a,
                         callback=lambda ev: events[ev.request_id].append(ev))
           for p, n, a in requests]
    while engine.step():
        pass
    return [events[i] for i in ids]


def tokens(evs):
    return [e.token_id for e in evs if e.token_id is not None]


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 40, 17, 1, 25, 9, 33, 12][:n]
    return [torch.randint(0, 128, (k,), generator=g).tolist() for k in lengths]


def test_batched_requests_equal_single_stream(lm):
    # 4 rows for 8 requests (queueing), 24-token steps and 16-token chunks (chunked prefill)
    engine = Engine(lm, EngineConfig(max_running=4, max_len=128, max_step_tokens=24,
                                     prefill_chunk=16, max_hot_adapters=0))
    ps = prompts(8)
    out = run(engine, [(p, 5 + i, None) for i, p in enumerate(ps)])
    for i, (p, evs) in enumerate(zip(ps, out, strict=True)):
        ref_ids, ref_lp = reference(lm, p, 5 + i)
        assert tokens(evs) == ref_ids
        got_lp = [e.logprob for e in evs if e.token_id is not None]
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(ref_lp), atol=1e-4, rtol=0)
        assert evs[-1].finish_reason == "length" and evs[-1].completion_tokens == 5 + i
    assert engine.runner.rows.num_free == 4 and not engine.has_work()


@pytest.mark.parametrize("lora_dtype, atol",
                         [("float32", 1e-4), ("bfloat16", 1e-2), ("int8", 1e-2)])
def test_mixed_adapter_batch_equals_merged_reference(lm, folder, store, lora_dtype, atol):
    """float32 buffers match the merged float32 model to 1e-4; bfloat16 buffers under a
    float32 model (the delta computed in bfloat16) give the same tokens and
    log-probabilities within 1e-2; so do int8 buffers (a scale per A row and Bt column)
    against the model with the same int8-rounded adapter merged. (These random adapters are
    far larger than trained ones, so int8's rounding alone can flip a greedy token of the
    float32 merge; bench adapters reports its effect on real-sized adapters.)"""
    names = ["r8-all", None, "r4-qv", "r16-rs", "r8-all", "r16-rs", None, "r4-qv"]
    ps = prompts(8, seed=1)
    engine = Engine(lm, EngineConfig(max_running=8, max_len=128, max_step_tokens=64,
                                     prefill_chunk=32, max_hot_adapters=3,
                                     lora_dtype=lora_dtype), store=store)
    expected = {"bfloat16": torch.bfloat16, "int8": torch.int8}.get(lora_dtype, lm.model.dtype)
    assert engine.runner.lora is not None
    assert engine.runner.lora.layers[0]["self_attn.qkv_proj"].a.dtype == expected
    out = run(engine, [(p, 6, a) for p, a in zip(ps, names, strict=True)])
    refs = {a: merged(folder, store.get(a), int8=lora_dtype == "int8")
            for a in set(names) if a is not None}
    differs = 0
    for p, a, evs in zip(ps, names, out, strict=True):
        ref_ids, ref_lp = reference(refs[a] if a else lm, p, 6)
        assert tokens(evs) == ref_ids, a
        got_lp = [e.logprob for e in evs if e.token_id is not None]
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(ref_lp), atol=atol, rtol=0)
        if a is not None:
            differs += tokens(evs) != reference(lm, p, 6)[0]
    assert differs >= 3, "the adapters should change the output (non-trivial adapters)"


def test_adapter_eviction_and_reload_give_identical_outputs(lm, store):
    """One hot slot for three adapters, and a warm budget too small to keep them: every
    switch evicts and reloads (from disk), and outputs stay those of a roomy engine."""
    ps = prompts(6, seed=2)
    names = ["r8-all", "r4-qv", "r16-rs", "r4-qv", "r8-all", "r16-rs"]
    roomy = Engine(lm, EngineConfig(max_running=6, max_len=128, max_hot_adapters=3), store=store)
    want = [tokens(e) for e in run(roomy, [(p, 5, a) for p, a in zip(ps, names, strict=True)])]
    tight_store = AdapterStore(store.root, lm.config, dtype=torch.float32, max_rank=16,
                               warm_budget_bytes=1)
    tight = Engine(lm, EngineConfig(max_running=6, max_len=128, max_hot_adapters=1),
                   store=tight_store)
    got = [tokens(e) for e in run(tight, [(p, 5, a) for p, a in zip(ps, names, strict=True)])]
    assert got == want
    assert tight_store.stats()["loads"] > 3  # reloaded from disk after warm evictions


def test_adapter_grouping_reorders_admission_not_outputs(lm, store):
    """Two rows for eight requests over three adapters: with max_overtakes the engine admits
    requests of the running adapters first (fewer distinct adapters per step), and every
    request's tokens are those of strict arrival order."""
    ps = prompts(8, seed=3)
    names = ["r8-all", "r4-qv", "r8-all", "r16-rs", "r8-all", None, "r4-qv", "r8-all"]
    reqs = [(p, 4, a) for p, a in zip(ps, names, strict=True)]

    def serve(overtakes: int) -> tuple[list[list[int]], list[str]]:
        engine = Engine(lm, EngineConfig(max_running=2, max_len=128, max_hot_adapters=3,
                                         max_overtakes=overtakes), store=store)
        starts: list[str] = []
        events: dict[str, list[EngineEvent]] = defaultdict(list)

        def on(ev: EngineEvent) -> None:
            if ev.token_id is not None and not events[ev.request_id]:
                starts.append(ev.request_id)
            events[ev.request_id].append(ev)

        ids = [engine.submit(p, SamplingParams(max_tokens=n, **GREEDY), adapter=a,
                             request_id=f"q{i}", callback=on)
               for i, (p, n, a) in enumerate(reqs)]
        while engine.step():
            pass
        return [tokens(events[i]) for i in ids], starts

    strict, strict_order = serve(0)
    grouped, grouped_order = serve(64)
    assert grouped == strict
    assert strict_order == [f"q{i}" for i in range(8)]
    assert grouped_order != strict_order  # later "r8-all" requests joined the running one


def test_corrupt_adapter_fails_only_its_own_requests(lm, folder, tmp_path):
    root = tmp_path / "adapters"
    make_random_adapter(root / "good", lm.config, rank=4, alpha=8, seed=5, std=0.2)
    make_random_adapter(root / "broken", lm.config, rank=4, alpha=8, seed=6, std=0.2)
    make_random_adapter(root / "truncated", lm.config, rank=4, alpha=8, seed=7, std=0.2)
    from safetensors.torch import load_file, save_file

    f = root / "broken" / "adapter_model.safetensors"
    tensors = load_file(f)
    next(iter(tensors.values()))[0, 0] = float("nan")  # found only when the tensors load
    save_file(tensors, f)
    f = root / "truncated" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    s = AdapterStore(root, lm.config, dtype=torch.float32, max_rank=16)
    engine = Engine(lm, EngineConfig(max_running=4, max_len=128, max_hot_adapters=2), store=s)
    with pytest.raises(AdapterError, match="truncated"):  # its header: refused at submit
        engine.submit([1, 2], SamplingParams(), adapter="truncated", callback=lambda ev: None)
    ps = prompts(3, seed=3)
    out = run(engine, [(ps[0], 4, "good"), (ps[1], 4, "broken"), (ps[2], 4, None)])
    assert out[1][-1].finish_reason == "error"
    err = out[1][-1].error
    assert isinstance(err, AdapterError) and "broken" in str(err) and "finite" in str(err)
    assert tokens(out[1]) == []
    assert tokens(out[0]) == reference(merged(folder, s.get("good")), ps[0], 4)[0]
    assert tokens(out[2]) == reference(lm, ps[2], 4)[0]
    assert engine.runner.rows.num_free == 4


def test_cancel_frees_the_row_at_the_next_step(lm):
    engine = Engine(lm, EngineConfig(max_running=2, max_len=128, max_hot_adapters=0))
    events: dict[str, list[EngineEvent]] = defaultdict(list)
    cb = lambda ev: events[ev.request_id].append(ev)  # noqa: E731
    a = engine.submit(prompts(1)[0], SamplingParams(max_tokens=50, **GREEDY), callback=cb)
    b = engine.submit(prompts(2)[1], SamplingParams(max_tokens=50, **GREEDY), callback=cb)
    c = engine.submit(prompts(3)[2], SamplingParams(max_tokens=3, **GREEDY), callback=cb)
    for _ in range(3):
        engine.step()
    assert engine.runner.rows.num_free == 0 and engine.scheduler.num_waiting == 1
    assert engine.cancel(c)  # waiting: ends at once
    assert events[c][-1].finish_reason == "cancelled"
    assert engine.cancel(a)
    engine.step()  # the boundary: a's row is freed before anything else runs
    assert events[a][-1].finish_reason == "cancelled"
    assert engine.runner.rows.num_free == 1
    assert not engine.cancel(a) and not engine.cancel("nope")
    while engine.step():
        pass
    assert events[b][-1].finish_reason == "length"
    assert engine.runner.rows.num_free == 2


def test_full_queue_raises_busy(lm):
    engine = Engine(lm, EngineConfig(max_running=1, max_waiting=2, max_len=64, max_hot_adapters=0))
    cb = lambda ev: None  # noqa: E731
    for _ in range(2):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=2, **GREEDY), callback=cb)
    with pytest.raises(EngineBusy) as e:
        engine.submit([1, 2, 3], SamplingParams(max_tokens=2, **GREEDY), callback=cb)
    assert e.value.retry_after_s > 0
    while engine.step():
        pass
    engine.submit([1, 2, 3], SamplingParams(max_tokens=2, **GREEDY), callback=cb)  # room again


def test_bad_requests_are_refused_with_the_field(lm, store):
    engine = Engine(lm, EngineConfig(max_running=1, max_len=64, max_hot_adapters=1), store=store)
    cb = lambda ev: None  # noqa: E731
    with pytest.raises(ConfigError, match="prompt"):
        engine.submit([], SamplingParams(), callback=cb)
    with pytest.raises(ConfigError, match="64 tokens"):
        engine.submit([1] * 64, SamplingParams(), callback=cb)
    with pytest.raises(ConfigError, match="temperature"):
        engine.submit([1], SamplingParams(temperature=-1), callback=cb)
    with pytest.raises(AdapterError, match="nope"):
        engine.submit([1], SamplingParams(), adapter="nope", callback=cb)
    with pytest.raises(ConfigError, match="max_running"):
        Engine(lm, EngineConfig(max_running=0))
    with pytest.raises(ConfigError, match="kv_cache_bytes"):
        Engine(lm, EngineConfig(kv_cache_bytes=10))
    with pytest.raises(ConfigError, match="max_overtakes=-1"):
        Engine(lm, EngineConfig(max_overtakes=-1))


def test_kv_budget_caps_the_rows(lm):
    per_row = 2 * 2 * 2 * 16 * 4 * (128 + 1)  # layers * (k, v) * kv heads * head dim * f32
    engine = Engine(lm, EngineConfig(max_running=32, max_len=128, kv_cache_bytes=3 * per_row,
                                     max_hot_adapters=0))
    assert engine.num_rows == 3


def test_async_stream_on_the_engine_thread(lm, store, folder):
    engine = Engine(lm, EngineConfig(max_running=4, max_len=128, max_hot_adapters=2), store=store)
    engine.start()
    ps = prompts(3, seed=4)

    async def consume(p, adapter, limit=None):
        out = []
        gen = engine.stream(p, SamplingParams(max_tokens=8, **GREEDY), adapter=adapter)
        async for ev in gen:
            out.append(ev)
            if limit and len(out) == limit:
                await gen.aclose()  # a client going away
                break
        return out

    async def main():
        return await asyncio.gather(consume(ps[0], "r8-all"), consume(ps[1], None),
                                    consume(ps[2], None, limit=2))

    try:
        full_a, full_b, partial = asyncio.run(main())
        assert tokens(full_a) == reference(merged(folder, store.get("r8-all")), ps[0], 8)[0]
        assert tokens(full_b) == reference(lm, ps[1], 8)[0]
        assert len(partial) == 2
        for _ in range(100):  # the cancelled one leaves at the next step boundary
            if engine.runner.rows.num_free == 4:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert engine.runner.rows.num_free == 4 and not engine.has_work()
    finally:
        engine.shutdown(timeout=10)


def test_batched_greedy_without_logprobs_picks_the_same_tokens(lm, store):
    """Plain greedy rows share one batched argmax; it must agree with the sampler path."""
    ps = prompts(6, seed=5)
    names = ["r8-all", None, "r4-qv", None, "r16-rs", "r8-all"]
    cfg = EngineConfig(max_running=6, max_len=128, max_hot_adapters=3)
    with_lp = [tokens(e) for e in run(Engine(lm, cfg, store=store),
                                      [(p, 6, a) for p, a in zip(ps, names, strict=True)])]
    engine = Engine(lm, cfg, store=store)
    events: dict[str, list[EngineEvent]] = defaultdict(list)
    ids = [engine.submit(p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                         adapter=a, callback=lambda ev: events[ev.request_id].append(ev))
           for p, a in zip(ps, names, strict=True)]
    while engine.step():
        pass
    assert [tokens(events[i]) for i in ids] == with_lp
    assert all(e.logprob is None for i in ids for e in events[i])


def test_pinned_adapter_stays_hot_while_others_rotate(lm, store):
    engine = Engine(lm, EngineConfig(max_running=2, max_len=128, max_hot_adapters=2), store=store)
    engine.pin_adapter("r4-qv")
    with pytest.raises(ConfigError):  # one slot must stay free to rotate
        engine.pin_adapter("r8-all")
    assert not {i.name: i.pinned for i in store.list()}["r8-all"]  # the failed pin is undone
    ps = prompts(4, seed=6)
    run(engine, [(ps[0], 3, "r4-qv")])
    slot = engine.scheduler.adapter_slot("r4-qv")
    run(engine, [(ps[1], 3, "r8-all"), (ps[2], 3, "r16-rs"), (ps[3], 3, "r8-all")])
    assert engine.scheduler.hot_adapters()["r4-qv"] == slot  # never evicted
    engine.unpin_adapter("r4-qv")
    run(engine, [(ps[1], 3, "r8-all"), (ps[2], 3, "r16-rs")])
    assert "r4-qv" not in engine.scheduler.hot_adapters()
    with pytest.raises(AdapterError):
        engine.pin_adapter("nope")


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(lm, monkeypatch):
    engine = Engine(lm, EngineConfig(max_running=2, max_len=64, max_hot_adapters=0))
    engine.start()
    try:
        real = engine.runner.execute
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine.runner, "execute", flaky)

        async def one(p):
            return [ev async for ev in engine.stream(p, SamplingParams(max_tokens=3, **GREEDY))]

        first = asyncio.run(one([1, 2, 3]))
        assert first[-1].finish_reason == "error" and "boom" in str(first[-1].error)
        assert engine.runner.rows.num_free == 2
        second = asyncio.run(one([1, 2, 3]))
        assert tokens(second) == reference(lm, [1, 2, 3], 3)[0]
    finally:
        engine.shutdown(timeout=10)


def test_run_on_the_calling_thread_serves_requests_from_another_thread(lm):
    """Engine.run: the loop on the caller's thread (fleetlm serve's main thread), requests
    submitted from elsewhere, and it returns once ``until`` holds."""
    import threading

    engine = Engine(lm, EngineConfig(max_running=2, max_len=64, max_hot_adapters=0))
    ps = prompts(3, seed=7)
    got: dict[int, list[EngineEvent]] = defaultdict(list)
    done = threading.Event()

    def client() -> None:
        for i, p in enumerate(ps):
            engine.submit(p, SamplingParams(max_tokens=5, **GREEDY), callback=got[i].append)
        while not all(got[i] and got[i][-1].finish_reason for i in range(len(ps))):
            threading.Event().wait(0.01)
        done.set()

    t = threading.Thread(target=client)
    t.start()
    engine.run(until=done.is_set, poll_s=0.01)
    t.join()
    for i, p in enumerate(ps):
        assert tokens(got[i]) == reference(lm, p, 5)[0]
        assert got[i][-1].finish_reason == "length"
    engine.shutdown()


@pytest.mark.parametrize("chunk", [64, 8])
def test_prompt_logprobs_match_transformers(lm, folder, chunk):
    """Prompt scoring (echo): every prompt token's logprob given the ones before it, across
    prefill chunk boundaries and next to a request that does not ask for them."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    engine = Engine(lm, EngineConfig(max_running=4, max_len=128, max_step_tokens=64,
                                     prefill_chunk=chunk, max_hot_adapters=0))
    p_echo, p_other = prompts(2, seed=3)[1], prompts(3, seed=4)[2]  # 40 and 17 tokens
    scored = run(engine, [])  # nothing; then submit both together
    got: dict[str, list[EngineEvent]] = defaultdict(list)
    a = engine.submit(p_echo, SamplingParams(max_tokens=3, prompt_logprobs=2, **GREEDY),
                      callback=lambda ev: got["a"].append(ev))
    engine.submit(p_other, SamplingParams(max_tokens=3, **GREEDY), callback=lambda ev: got["b"].append(ev))
    b = engine.submit(p_echo, SamplingParams(max_tokens=0, prompt_logprobs=0, temperature=0.0),
                      callback=lambda ev: got["c"].append(ev))
    while engine.step():
        pass
    assert scored == [] and a and b
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([p_echo])).logits[0].float(), -1)
    want = [float(ref[j, p_echo[j + 1]]) for j in range(len(p_echo) - 1)]
    first = got["a"][0]
    assert first.token_id is not None and first.prompt_logprobs is not None
    assert [lp for lp, _ in first.prompt_logprobs] == pytest.approx(want, abs=1e-4)
    top = first.prompt_logprobs[5][1]
    assert [t for t, _ in top] == ref[5].topk(2).indices.tolist()
    assert all(ev.prompt_logprobs is None for ev in got["a"][1:] + got["b"])
    assert tokens(got["a"]) == reference(lm, p_echo, 3)[0]  # generation unaffected
    assert tokens(got["b"]) == reference(lm, p_other, 3)[0]
    # max_tokens=0: scored, nothing generated, the row freed
    (only,) = got["c"]
    assert only.token_id is None and only.finish_reason == "length" and only.completion_tokens == 0
    assert [lp for lp, _ in only.prompt_logprobs] == pytest.approx(want, abs=1e-4)
    assert engine.stats()["running"] == 0


def test_max_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(ConfigError, match="max_tokens=0"):
        SamplingParams(max_tokens=0).validate()
    with pytest.raises(ConfigError, match="prompt_logprobs=21"):
        SamplingParams(prompt_logprobs=21).validate()


def test_a_seed_beyond_64_bits_is_a_400_not_a_crash():
    """torch's generator takes a 64-bit seed; a larger one (the fuzzer sent
    -25162097494660620288) raised ValueError in the sampler, a 500."""
    import torch

    from fleetlm.engine.sampler import RequestSampler

    for seed in (-(2**63) - 1, 2**64, -25162097494660620288):
        with pytest.raises(ConfigError, match="seed=.*64-bit") as got:
            SamplingParams(seed=seed).validate()
        assert got.value.param == "seed"
    for seed in (-(2**63), 2**64 - 1, 0):  # the edges torch accepts
        RequestSampler(SamplingParams(temperature=1.0, seed=seed).validate(), 4, [])
        torch.Generator().manual_seed(seed)
