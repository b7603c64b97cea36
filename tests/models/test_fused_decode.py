"""The one-row native decode step (fleetlm.models.fused_decode, csrc/decode_stack.inc)
against its slow twin, the model's own forward, on every family and every SIMD path this
CPU has; where it must not apply; and the op's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fleetlm.kernels import cpu, int8_gemv
from fleetlm.models import fused_decode
from fleetlm.models.fused_decode import FusedDecode
from fleetlm.models.llama import LlamaForCausalLM
from fleetlm.models.loader import load_model
from tests.conftest import FAMILIES

pytestmark = pytest.mark.timeout(600)

PATHS = ["avx512", "avx2", "neon", "scalar"]
PROMPT = 12  # longer than mistral-window's sliding window (8)
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
    if not cpu.isa_supported(isa):
        pytest.skip(f"this CPU ({cpu.cpu_features()['model']}) cannot run the {isa} path")
    with cpu.forced_isa(isa) as used:
        assert used["int8_linear"] == isa
        yield isa


@pytest.mark.parametrize("family", list(FAMILIES))
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
def test_bfloat16_is_at_least_as_close_to_float32_as_the_eager_model(
        family: str, tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 weights: the native stack keeps fp32 between ops (the cache stays
    bfloat16), so against the same weights run in float32 it is no further off than the
    model's bfloat16 forward, which rounds after every op."""
    fused = load(tiny_checkpoints[family], "bfloat16", True, monkeypatch)
    twin = load(tiny_checkpoints[family], "bfloat16", False, monkeypatch)
    exact = load(tiny_checkpoints[family], "bfloat16", False, monkeypatch).to(torch.float32)
    forced = torch.randint(0, exact.config.vocab_size, (8,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    want = teacher_forced(exact, forced)
    errs = {name: (teacher_forced(lm, forced) - want).abs().max().item()
            for name, lm in (("fused", fused), ("eager", twin))}
    scale = want.abs().max().item()
    assert errs["fused"] <= 0.02 * scale, errs
    assert errs["fused"] <= errs["eager"] * 1.05, errs


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
    # a cache in another dtype than the weights
    lm = load(folder, "float32", True, monkeypatch)
    fused = lm.fused_decode()
    assert fused is not None
    assert fused.supports(lm.allocate_cache(1, 16))
    assert not fused.supports(lm.allocate_cache(1, 16, dtype=torch.bfloat16))


def test_several_rows_and_adapters_take_the_usual_path(tiny_checkpoints: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(FusedDecode, "__call__", lambda self, *a: calls.append(1))
    lm = load(tiny_checkpoints["llama"], "float32", True, monkeypatch)
    cache = lm.allocate_cache(2, 32)
    with torch.inference_mode():
        lm(torch.tensor([[1], [2]]), torch.tensor([[0], [0]]), cache, None, 32)  # two rows
        lm(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), cache, None, 32)  # prefill
        lm(torch.tensor([[1]]), torch.tensor([[0]]), cache, torch.tensor([1]), 32)  # a slot
    assert calls == []


def test_the_op_names_what_is_wrong(tiny_checkpoints: dict[str, Path],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    lm = load(tiny_checkpoints["llama"], "float32", True, monkeypatch)
    fused = lm.fused_decode()
    assert fused is not None
    cache = lm.allocate_cache(1, 16)
    x = torch.zeros(1, 1, lm.config.hidden_size)
    with pytest.raises(RuntimeError, match="outside the cache"):
        fused(x, 16, cache)
    op = torch.ops.fleetlm.decode_stack_int8
    args = (x.view(1, -1), fused.weights, cache.k, cache.v, lm.rope_cos[0], lm.rope_sin[0], 0,
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
        op(*args[:9], 3, 2)
    with pytest.raises(RuntimeError, match="cos and sin"):
        op(*args[:4], lm.rope_cos[0, :4], *args[5:])
