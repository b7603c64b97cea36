"""The one-row native decode step (fleetlm.models.fused_decode, csrc/decode_stack.inc)
against its slow twin, the model's own forward, on every family and every SIMD path this
CPU has; where it must not apply; and the op's errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fleetlm.kernels import int8_gemv
from fleetlm.models import fused_decode
from fleetlm.models.fused_decode import FusedDecode
from fleetlm.models.llama import LlamaForCausalLM
from fleetlm.models.loader import load_model
from tests.conftest import FAMILIES
from tests.kernels.paths import PATHS, forced_path

pytestmark = pytest.mark.timeout(600)

PROMPT = 12  # longer than mistral-window's sliding window (8)
# the families in the native stack's (Llama) layout; Gemma 3 must not take it
# (tests/models/test_gemma3.py)
NATIVE_FAMILIES = [f for f in FAMILIES if f != "gemma3"]
STEPS = 16


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    if not int8_gemv.load():
        pytest.skip("fleetlm's int8 kernel could not be built/loaded")


def load(folder: Path, dtype: str, fused: bool, monkeypatch: pytest.MonkeyPatch,
         quantize: str = "int8") -> LlamaForCausalLM:
    monkeypatch.setenv(fused_decode.ENV_VAR, "1" if fused else "0")
    lm = load_model(str(folder), dtype=dtype, quantize=quantize, with_tokenizer=False).model
    assert (lm.fused_decode() is not None) == fused
    return lm


def greedy(lm: LlamaForCausalLM, steps: int = STEPS, seed: int = 0
           ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Greedy tokens, the logits of every decode step [steps, vocab], the final k cache."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, lm.config.vocab_size, (1, PROMPT), generator=g)
    cache = lm.allocate_cache(1, 64)
    with torch.inference_mode():
        logits = lm(ids, torch.arange(PROMPT)[None], cache, None, 64,
                    logits_index=torch.tensor([PROMPT - 1]))
        tokens, all_logits = [], []
        for i in range(steps):
            tok = int(logits[0].argmax())
            tokens.append(tok)
            logits = lm(torch.tensor([[tok]]), torch.tensor([[PROMPT + i]]), cache, None, 64,
                        logits_index=torch.tensor([0]))
            all_logits.append(logits[0])
    return tokens, torch.stack(all_logits), torch.stack(cache.k).float()


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest):
    isa = request.param
    with forced_path(isa) as used:
        assert used["int8_linear"] == isa
        yield isa


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_float32_matches_the_models_forward(family: str, path: str,
                                            tiny_checkpoints: dict[str, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_call = FusedDecode.__call__
    monkeypatch.setattr(FusedDecode, "__call__",
                        lambda self, *a: calls.append(1) or real_call(self, *a))
    fused = load(tiny_checkpoints[family], "float32", True, monkeypatch)
    twin = load(tiny_checkpoints[family], "float32", False, monkeypatch)
    tokens, logits, keys = greedy(fused)
    assert len(calls) == STEPS  # every decode step went through the native stack
    want_tokens, want_logits, want_keys = greedy(twin)
    assert tokens == want_tokens
    scale = want_logits.abs().max().item()
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=2e-5 * max(1.0, scale))
    # the keys it wrote into the cache (RoPE, q/k norm, slot 0 at each position)
    torch.testing.assert_close(keys, want_keys, rtol=0, atol=2e-5 * max(1.0, keys.abs().max().item()))


@pytest.mark.parametrize("family", ["llama", "qwen2-bias", "qwen3-qknorm", "mistral-window"])
def test_bfloat16_follows_the_eager_model(family: str, tiny_checkpoints: dict[str, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 weights: the native stack rounds where the eager forward rounds, so its
    logits stay within 2 bfloat16 ulps of the eager model's (on these 2-layer models) and
    as close to the same weights run in float32."""
    fused = load(tiny_checkpoints[family], "bfloat16", True, monkeypatch)
    twin = load(tiny_checkpoints[family], "bfloat16", False, monkeypatch)
    exact = load(tiny_checkpoints[family], "bfloat16", False, monkeypatch).to(torch.float32)
    forced = torch.randint(0, exact.config.vocab_size, (8,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    got, eager, want = (teacher_forced(lm, forced) for lm in (fused, twin, exact))
    scale = want.abs().max().item()
    ulp = 2.0 ** (math.floor(math.log2(scale)) - 7)  # bfloat16's at the logits' size
    assert (got - eager).abs().max().item() <= 2 * ulp
    assert (got - want).abs().max().item() <= 0.02 * scale
    assert torch.equal(got.argmax(-1), eager.argmax(-1))


def teacher_forced(lm: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """The float32 logits [len(tokens), vocab] of decoding ``tokens`` one at a time after
    a fixed prompt."""
    ids = torch.randint(0, lm.config.vocab_size, (1, PROMPT),
                        generator=torch.Generator().manual_seed(0))
    cache = lm.allocate_cache(1, 64)
    out = []
    with torch.inference_mode():
        lm(ids, torch.arange(PROMPT)[None], cache, None, 64)
        for i, tok in enumerate(tokens):
            out.append(lm(torch.tensor([[tok]]), torch.tensor([[PROMPT + i]]), cache, None, 64,
                          logits_index=torch.tensor([0]))[0].float())
    return torch.stack(out)


def test_the_embedded_model_decodes_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2-135M, int8, float32: 24 greedy tokens with and without the native stack."""
    from fleetlm.models.loader import resolve_source

    folder = resolve_source("smollm2-135m")
    fused = load(folder, "float32", True, monkeypatch)
    twin = load(folder, "float32", False, monkeypatch)
    tokens, logits, _ = greedy(fused, steps=24, seed=3)
    want_tokens, want_logits, _ = greedy(twin, steps=24, seed=3)
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-3)


def test_not_used_where_it_does_not_apply(tiny_checkpoints: dict[str, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_checkpoints["llama"]
    # float weights, 4-bit weights, the switch off: the model's own forward
    for quantize in ("none", "int4"):
        monkeypatch.setenv(fused_decode.ENV_VAR, "1")
        lm = load_model(str(folder), dtype="float32", quantize=quantize,
                        with_tokenizer=False).model
        assert lm.fused_decode() is None
        assert "int8" in FusedDecode._unsupported(lm)
    lm = load(folder, "float32", False, monkeypatch)
    assert FusedDecode._unsupported(lm) == f"{fused_decode.ENV_VAR}=0"
    # a cache in another dtype than the weights; several sequences; too many tokens;
    # positions that are not consecutive
    lm = load(folder, "float32", True, monkeypatch)
    fused = lm.fused_decode()
    assert fused is not None
    one, pos = torch.tensor([[1]]), torch.tensor([[0]])
    assert fused.applies(one, pos, lm.allocate_cache(1, 16))
    assert not fused.applies(one, pos, lm.allocate_cache(1, 16, dtype=torch.bfloat16))
    cache = lm.allocate_cache(2, 16)
    assert not fused.applies(torch.tensor([[1], [2]]), torch.tensor([[0], [0]]), cache)
    n = fused_decode.MAX_TOKENS
    assert fused.applies(torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], cache)
    assert not fused.applies(torch.ones(1, n + 1, dtype=torch.long), torch.arange(n + 1)[None],
                             cache)
    assert not fused.applies(torch.tensor([[1, 2]]), torch.tensor([[0, 2]]), cache)


def test_several_sequences_and_long_chunks_take_the_usual_path(
        tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(FusedDecode, "__call__", lambda self, *a: calls.append(1))
    lm = load(tiny_checkpoints["llama"], "float32", True, monkeypatch)
    cache = lm.allocate_cache(2, 32)
    with torch.inference_mode():
        lm(torch.tensor([[1], [2]]), torch.tensor([[0], [0]]), cache, None, 32)  # two rows
        lm(torch.ones(1, 9, dtype=torch.long), torch.arange(9)[None], cache, None, 32)
    assert calls == []


@pytest.mark.parametrize("family", ["llama", "mistral-window", "qwen3-qknorm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_token_gets_the_same_result_alone_or_with_others(
        family: str, dtype: str, tiny_checkpoints: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A speculative check (several tokens of one sequence in one call, in a slot other
    than 0) gives each token, bit for bit, what decoding the tokens one at a time gives:
    logits and cache."""
    lm = load(tiny_checkpoints[family], dtype, True, monkeypatch)
    tokens = torch.randint(0, lm.config.vocab_size, (1, PROMPT + 7),
                           generator=torch.Generator().manual_seed(2))
    slot = torch.tensor([1])
    results = []
    for chunk in (1, 7):
        cache = lm.allocate_cache(2, 64)
        with torch.inference_mode():
            lm(tokens[:, :PROMPT], torch.arange(PROMPT)[None], cache, slot, 64)
            out = []
            for a in range(PROMPT, PROMPT + 7, chunk):
                ids = tokens[:, a:a + chunk]
                n = ids.shape[1]
                index = (torch.zeros(n, dtype=torch.long), torch.arange(n))
                out.append(lm(ids, torch.arange(a, a + n)[None], cache, slot, 64, index))
        results.append((torch.cat(out), torch.stack(cache.k), torch.stack(cache.v)))
    (one, k1, v1), (seven, k7, v7) = results
    assert torch.equal(one, seven)
    assert torch.equal(k1, k7) and torch.equal(v1, v7)
    assert not k1[:, 0].any()  # slot 0 untouched


def test_the_op_names_what_is_wrong(tiny_checkpoints: dict[str, Path],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    lm = load(tiny_checkpoints["llama"], "float32", True, monkeypatch)
    fused = lm.fused_decode()
    assert fused is not None
    cache = lm.allocate_cache(1, 16)
    x = torch.zeros(1, 1, lm.config.hidden_size)
    with pytest.raises(RuntimeError, match="outside the cache"):
        fused(x, torch.tensor([[16]]), 0, cache)
    with pytest.raises(RuntimeError, match="slot 1 is outside the cache"):
        fused(x, torch.tensor([[0]]), 1, cache)
    op = torch.ops.fleetlm.decode_stack_int8
    args = (x.view(1, -1), fused.weights, cache.k, cache.v, lm.rope_cos, lm.rope_sin, 0, 0,
            0, 1e-6, lm.config.num_heads, lm.config.num_kv_heads)
    with pytest.raises(RuntimeError, match="13 weight tensors"):
        op(args[0], fused.weights[:-1], *args[2:])
    bad = list(fused.weights)
    bad[1] = bad[1].float()  # layer 0's qkv weight not int8
    with pytest.raises(RuntimeError, match="layer 0: qkv_w"):
        op(args[0], bad, *args[2:])
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        op(x.view(1, -1).half(), *args[1:])
    with pytest.raises(RuntimeError, match="num_heads"):
        op(*args[:10], 3, 2)
    with pytest.raises(RuntimeError, match="cos and sin"):
        op(*args[:4], lm.rope_cos[:, :4], *args[5:])
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        op(torch.zeros(9, lm.config.hidden_size), *args[1:])


def test_the_engine_sends_decode_steps_and_checks_but_no_prompt_chunk(
        tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt chunks always take the PyTorch path (a prompt's result must not depend on how
    it was chunked or how much of it the prefix cache held); one sequence's decode steps
    and speculative checks take the native stack."""
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.engine.sampling_params import SamplingParams

    sizes: list[int] = []
    real_call = FusedDecode.__call__
    monkeypatch.setattr(FusedDecode, "__call__",
                        lambda self, x, *a: sizes.append(x.shape[1]) or real_call(self, x, *a))
    monkeypatch.setenv(fused_decode.ENV_VAR, "1")
    loaded = load_model(str(tiny_checkpoints["llama"]), dtype="float32", quantize="int8",
                        with_tokenizer=False, max_positions=512)
    engine = Engine(loaded, EngineConfig(max_running=2, max_len=128, speculative_tokens=4))
    prompt = [5, 6, 7, 8] * 3  # prompt lookup drafts from the repeats
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.submit([3, 4, 5], one, callback=lambda ev: None)  # one short chunk, no decode step
    engine.submit(prompt, params, callback=lambda ev: None)
    while engine.step():
        pass
    # the second decodes alone: the stack, for its checks (more than one token) and for
    # the steps without drafts
    assert sizes and max(sizes) > 1
    sizes.clear()
    engine.submit([9] * 7, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                  callback=lambda ev: None)
    while engine.step():
        pass
    assert sizes == []  # a 7-token prompt and no decode step


def test_converting_the_model_rebuilds_the_stack(tiny_checkpoints: dict[str, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """After ``.to(dtype)`` the stack must read the new tensors, not the old ones."""
    lm = load(tiny_checkpoints["llama"], "float32", True, monkeypatch)
    before = lm.fused_decode()
    assert before is not None and before.dtype == torch.float32
    lm.to(torch.bfloat16)
    after = lm.fused_decode()
    assert after is not None and after is not before and after.dtype == torch.bfloat16
    assert all(w.data_ptr() == b.data_ptr() for w, b in zip(
        after.weights[:2], [lm.model.layers[0].input_layernorm.weight,
                            lm.model.layers[0].self_attn.qkv_proj.weight], strict=True))
