"""Multi-LoRA deltas of fused projections against the per-token reference, and the stacked
adapter storage they read."""

from __future__ import annotations

import math

import pytest
import torch

from fleetlm.adapters.peft_format import lora_scale
from fleetlm.engine import lora as lora_mod
from fleetlm.engine.lora import (
    NO_ADAPTER,
    LoraBatch,
    StackedLora,
    lora_delta,
    lora_delta_reference,
    lora_delta_torch,
    quantize_rows,
)
from fleetlm.kernels import lora_sgmv

IN, PARTS, RMAX = 50, (40, 8, 8), 16  # a qkv-like fused projection, sizes off every SIMD width
# ranks of (q, k, v) per slot; None: the adapter leaves that part out; slot 3 stays empty
SLOT_RANKS = [(16, 3, None), (5, 5, 5), (1, None, 16), None, (7, 9, 2), (16, 16, 16)]


def make_stack(slot_ranks, in_features=IN, parts=PARTS, max_rank=RMAX,
               dtype=torch.float32, seed=0) -> StackedLora:
    """Random adapters with LoRA-like magnitudes (outputs of order 1) and varied scales."""
    g = torch.Generator().manual_seed(seed)
    stack = StackedLora.allocate(len(slot_ranks), max_rank, in_features, parts, dtype)
    for slot, ranks in enumerate(slot_ranks):
        if ranks is None:
            continue
        stack.set(slot, [None if r is None else
                         (torch.randn(r, in_features, generator=g) / math.sqrt(in_features),
                          torch.randn(n, r, generator=g) * 0.3,
                          lora_scale(2 * r, r, use_rslora=slot % 2 == 1))
                         for r, n in zip(ranks, parts, strict=True)])
    return stack


def as_float(stack: StackedLora) -> StackedLora:
    return stack.dequantized()  # float32 buffers of the same (bfloat16-exact) values


def batch(slots) -> LoraBatch:
    return LoraBatch.from_slots(torch.tensor(slots))


IMPLS = [lora_delta, lora_delta_torch]
SLOTS = {
    "decode": [0, 1, 2, 4, 5],
    "mixed": [2, NO_ADAPTER, 0, 2, 1, NO_ADAPTER, 4, 0, 0, 5, 3],
    "one_token": [4],
    "no_adapter": [NO_ADAPTER] * 5,
    "prefill_one": [1] * 37,
    "large_mixed": [4, 4, NO_ADAPTER, 1, 1, 1, 0, 5] * 75,  # 600 tokens
    "empty_slot": [3, 0, 3],
}


@pytest.fixture(scope="module")
def stacked() -> StackedLora:
    return make_stack(SLOT_RANKS)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", SLOTS)
def test_float32_matches_reference(stacked, impl, case):
    slots = SLOTS[case]
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(1))
    b = batch(slots)
    got = impl(x, stacked, b)
    ref = lora_delta_reference(x, stacked, b)
    assert got.shape == (len(slots), sum(PARTS)) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # no adapter, an empty slot, an absent part: exactly zero, never a stale value
    zero = torch.tensor([s in (NO_ADAPTER, 3) for s in slots])
    assert torch.count_nonzero(got[zero]) == 0
    k_cols = slice(PARTS[0] + PARTS[1], None)  # slot 0 has no v part, slot 2 no k part
    assert torch.count_nonzero(got[torch.tensor(slots) == 0][:, k_cols]) == 0


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", ["mixed", "large_mixed", "one_token"])
def test_bfloat16_matches_reference(stacked, impl, case):
    slots = SLOTS[case]
    lora = make_stack(SLOT_RANKS, dtype=torch.bfloat16)
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(5)).bfloat16()
    b = batch(slots)
    got = impl(x, lora, b)
    assert got.dtype == torch.bfloat16
    ref = lora_delta_reference(x.float(), as_float(lora), b)  # exact products of bf16 inputs
    # bf16 output rounding, and the torch path rounds x @ A^T to bf16 too: ~1% of the range
    torch.testing.assert_close(got.float(), ref, atol=1e-2 * float(ref.abs().max()), rtol=2e-2)


def test_leading_dimensions_are_kept(stacked):
    x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(2))
    b = batch([0, 1, NO_ADAPTER, 5, 5, 2])  # row-major over [B, S]
    got = lora_delta(x, stacked, b)
    assert got.shape == (2, 3, sum(PARTS))
    torch.testing.assert_close(got.reshape(6, -1), lora_delta_reference(x.reshape(6, IN), stacked, b),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora_delta_reference(x, stacked, b), got, atol=1e-5, rtol=1e-5)


def test_without_the_kernel_lora_delta_uses_torch(stacked, monkeypatch):
    calls = []

    def spy(x, lora, b):
        calls.append(x.shape[0])
        return lora_delta_torch(x, lora, b)

    monkeypatch.setattr(lora_mod.lora_sgmv, "load", lambda: False)
    monkeypatch.setattr(lora_mod, "lora_delta_torch", spy)
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(3))
    b = batch([0, 4, NO_ADAPTER, 0])
    torch.testing.assert_close(lora_delta(x, stacked, b), lora_delta_reference(x, stacked, b),
                               atol=1e-5, rtol=1e-5)
    assert calls == [4]


@pytest.mark.skipif(not lora_sgmv.load(), reason="fleetlm::lora_sgmv could not be built/loaded")
def test_only_single_adapter_prefill_of_shrink_heavy_projections_goes_to_torch(monkeypatch):
    calls = []

    def spy(x, lora, b):
        calls.append(x.shape[0])
        return lora_delta_torch(x, lora, b)

    monkeypatch.setattr(lora_mod, "lora_delta_torch", spy)
    n = lora_mod.TORCH_MIN_TOKENS
    down_like = make_stack([(8,), (4,)], in_features=96, parts=(40,))  # in > out
    up_like = make_stack([(8,), (4,)], in_features=40, parts=(96,))
    x96, x40 = torch.randn(n, 96), torch.randn(n, 40)
    lora_delta(x96, down_like, batch([0] * n))
    assert calls == [n]
    for x, stack, slots in [(x96, down_like, [0] * (n - 1) + [1]),           # two adapters
                            (x96, down_like, [0] * (n - 1) + [NO_ADAPTER]),  # not every token
                            (x96[:-1], down_like, [0] * (n - 1)),            # too few tokens
                            (x40, up_like, [0] * n)]:                        # expand-heavy
        b = batch(slots)
        torch.testing.assert_close(lora_delta(x, stack, b), lora_delta_reference(x, stack, b),
                                   atol=1e-5, rtol=1e-5)
    assert calls == [n]


@pytest.mark.parametrize("case", ["decode", "mixed", "large_mixed"])
def test_float32_activations_with_bfloat16_buffers(case):
    """EngineConfig.lora_dtype="bfloat16" under a float32 model: the delta of the
    bf16-rounded x with the bf16 weights, returned as float32; the float32-buffer result
    within bf16's rounding."""
    slots = SLOTS[case]
    lora = make_stack(SLOT_RANKS, dtype=torch.bfloat16)
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(9))
    b = batch(slots)
    got = lora_delta(x, lora, b)
    assert got.dtype == torch.float32 and got.shape == (len(slots), sum(PARTS))
    exact = lora_delta_reference(x.bfloat16().float(), as_float(lora), b)
    torch.testing.assert_close(got, exact, atol=1e-2 * float(exact.abs().max()), rtol=2e-2)
    full = lora_delta_reference(x, as_float(lora), b)
    assert float((got - full).norm() / full.norm()) < 0.02
    with pytest.raises(ValueError, match="float16 but the adapter buffers are torch.bfloat16"):
        lora_delta(x.half(), lora, b)


def test_lora_buffer_dtype_setting():
    from fleetlm.engine.engine import EngineConfig, lora_buffer_dtype
    from fleetlm.errors import ConfigError

    f32, bf16 = torch.float32, torch.bfloat16
    assert lora_buffer_dtype("auto", f32, native_bf16=True) == bf16
    assert lora_buffer_dtype("auto", f32, native_bf16=False) == f32
    assert lora_buffer_dtype("auto", bf16) == bf16
    assert lora_buffer_dtype("float32", f32) == f32 and lora_buffer_dtype("bfloat16", f32) == bf16
    assert lora_buffer_dtype("float32", bf16) == bf16  # the kernel takes x's dtype or bf16
    with pytest.raises(ConfigError, match="lora_dtype='fp8'"):
        EngineConfig(lora_dtype="fp8").validate()


def test_lora_delta_rejects_mismatches(stacked):
    x = torch.randn(3, IN)
    with pytest.raises(ValueError, match="3 tokens but the LoraBatch has 2"):
        lora_delta(x, stacked, batch([0, 1]))
    with pytest.raises(ValueError, match="x has 51 features, the adapters expect 50"):
        lora_delta(torch.randn(2, IN + 1), stacked, batch([0, 1]))
    with pytest.raises(ValueError, match="bfloat16 but the adapter buffers are torch.float32"):
        lora_delta(x.bfloat16(), stacked, batch([0, 1, 2]))
    with pytest.raises(ValueError, match="features.*; x has 6 tokens.*; x is torch.bfloat16"):
        lora_delta(torch.randn(2, 3, IN + 1).bfloat16(), stacked, batch([0]))


def test_reference_is_the_lora_formula():
    """The reference against the textbook formula, part by part, on unpadded weights."""
    g = torch.Generator().manual_seed(4)
    parts = [(torch.randn(4, IN, generator=g), torch.randn(40, 4, generator=g), 0.5), None,
             (torch.randn(2, IN, generator=g), torch.randn(8, 2, generator=g), 2.0)]
    stack = StackedLora.allocate(2, RMAX, IN, PARTS)
    stack.set(1, parts)
    x = torch.randn(3, IN, generator=g)
    expected = torch.cat([s * (x @ a.T) @ b.T for a, b, s in [parts[0]]]
                         + [torch.zeros(3, 8)]
                         + [s * (x @ a.T) @ b.T for a, b, s in [parts[2]]], dim=1)
    torch.testing.assert_close(lora_delta_reference(x, stack, batch([1, 1, 1])), expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not lora_sgmv.load(), reason="fleetlm::lora_sgmv could not be built/loaded")
def test_compiled_lora_delta_serves_every_adapter_mix_with_one_graph(stacked):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lora_delta, backend=counter, fullgraph=True, dynamic=False)
    x = torch.randn(2, 4, IN, generator=torch.Generator().manual_seed(6))
    for slots in ([0, 1, 2, 4, 5, NO_ADAPTER, 0, 0], [5] * 8, [NO_ADAPTER] * 8, [3, 2, 1, 0] * 2):
        b = batch(slots)
        torch.testing.assert_close(fn(x, stacked, b), lora_delta_reference(x, stacked, b),
                                   atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def test_allocate_layout_and_nbytes():
    stack = StackedLora.allocate(4, 8, 32, (24, 8, 8), torch.bfloat16)
    assert stack.a.shape == (4, 3, 8, 32) and stack.bt.shape == (4, 8, 40)
    assert stack.ranks.dtype == torch.int32 and stack.scales.dtype == torch.float32
    assert stack.offsets.tolist() == [0, 24, 32, 40] and stack.part_sizes == [24, 8, 8]
    weights = 4 * 8 * (3 * 32 + 40) * 2  # S * R * (P * in + out_total) bf16 elements, no padding
    assert stack.nbytes() == weights + 4 * 3 * (4 + 4) + 4 * 8
    with pytest.raises(ValueError, match="max_rank must be positive.*part_sizes"):
        StackedLora.allocate(4, 0, 32, (24, 0))


def test_set_validates_every_part_before_writing():
    stack = make_stack([(4, 4, 4), None])
    before = [t.clone() for t in (stack.a, stack.bt, stack.ranks, stack.scales)]
    bad = [(torch.randn(RMAX + 1, IN), torch.randn(40, RMAX + 1), 1.0),  # rank too big
           (torch.randn(2, IN + 1), torch.randn(8, 2), 1.0),              # wrong in
           (torch.randn(2, IN), torch.randn(9, 2), 1.0)]                  # wrong out
    with pytest.raises(ValueError) as err:
        stack.set(0, bad)
    msg = str(err.value)
    assert "part 0: rank 17 exceeds max_rank 16" in msg
    assert "part 1: A must be [r, 50]" in msg and "part 2: B must be [8, r]" in msg
    with pytest.raises(ValueError, match="got 2 parts, this projection has 3"):
        stack.set(0, [None, None])
    with pytest.raises(ValueError, match="slot 2 is outside"):
        stack.set(2, [None, None, None])
    for old, new in zip(before, (stack.a, stack.bt, stack.ranks, stack.scales), strict=True):
        assert torch.equal(old, new)


def test_set_zero_fills_what_the_previous_adapter_left():
    stack = make_stack([(16, 16, 16)])
    g = torch.Generator().manual_seed(7)
    stack.set(0, [(torch.randn(2, IN, generator=g), torch.randn(40, 2, generator=g), 1.0),
                  None, None])
    assert stack.ranks[0].tolist() == [2, 0, 0] and stack.scales[0].tolist() == [1.0, 0.0, 0.0]
    assert torch.count_nonzero(stack.a[0, 0, 2:]) == 0 and torch.count_nonzero(stack.a[0, 1:]) == 0
    assert torch.count_nonzero(stack.bt[0, 2:]) == 0 and torch.count_nonzero(stack.bt[0, :, 40:]) == 0
    stack.clear(0)
    assert not any(torch.count_nonzero(t) for t in (stack.a, stack.bt, stack.ranks, stack.scales))
    x = torch.randn(2, IN, generator=g)
    assert torch.count_nonzero(lora_delta(x, stack, batch([0, 0]))) == 0


def test_batch_groups_tokens_by_slot():
    b = LoraBatch.from_slots([2, NO_ADAPTER, 0, 2, 0])
    assert b.token_slots.dtype == torch.long and b.num_tokens == 5
    assert b.segments == ((0, 0, 2), (2, 2, 4))
    assert b.order.tolist() == [2, 4, 0, 3]
    assert LoraBatch.from_slots(torch.tensor([[1, 1], [0, NO_ADAPTER]])).token_slots.tolist() == [
        1, 1, 0, NO_ADAPTER]
    assert batch([NO_ADAPTER, NO_ADAPTER]).empty and not batch([0]).empty
    assert LoraBatch.from_slots([]).num_tokens == 0
    with pytest.raises(ValueError, match="integer slot ids"):
        LoraBatch.from_slots(torch.tensor([0.0, 1.0]))


def test_lora_scale_rules():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, use_rslora=True) == 8.0
    with pytest.raises(ValueError, match="rank"):
        lora_scale(16, 0)


# ---------------------------------------------------------------- int8 buffers


def test_quantize_rows_round_trip():
    w = torch.randn(5, 33, generator=torch.Generator().manual_seed(1))
    w[2] = 0.0  # an all-zero row: scale 0, values 0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (5,)
    assert int(q.abs().max()) == 127 and float(scale[2]) == 0.0 and not q[2].any()
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())  # round to nearest


def test_int8_stack_set_clear_and_bytes():
    q8 = make_stack(SLOT_RANKS, dtype=torch.int8)
    f32 = make_stack(SLOT_RANKS)
    assert q8.quantized and not f32.quantized
    assert q8.a_scale is not None and q8.bt_scale is not None
    # dequantised, every slot is its float32 twin to within half a step per element
    deq = q8.dequantized()
    assert float((deq.a - f32.a).abs().max()) <= float(q8.a_scale.max()) / 2 + 1e-7
    assert float((deq.bt - f32.bt).abs().max()) <= float(q8.bt_scale.max()) / 2 + 1e-7
    assert torch.equal(q8.ranks, f32.ranks) and torch.equal(q8.scales, f32.scales)
    q8.clear(1)
    assert not q8.a[1].any() and not q8.bt[1].any() and not q8.a_scale[1].any()
    assert not q8.bt_scale[1].any() and not q8.ranks[1].any()
    # int8 weights + float32 scales: under a third of float32's bytes at these sizes
    assert q8.nbytes() < 0.35 * f32.nbytes()


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", ["decode", "mixed", "large_mixed", "prefill_one"])
def test_int8_buffers_match_the_dequantised_reference(impl, case, x_dtype):
    """lora_dtype="int8": the kernel and the torch path compute the dequantised weights'
    delta, in x's dtype; that delta is within ~1% of the float32 adapters'."""
    slots = SLOTS[case]
    q8 = make_stack(SLOT_RANKS, dtype=torch.int8)
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(4)).to(x_dtype)
    b = batch(slots)
    got = impl(x, q8, b)
    assert got.dtype == x_dtype and got.shape == (len(slots), sum(PARTS))
    want = lora_delta_reference(x.float(), q8.dequantized(), b)
    tol = 1e-4 if x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol * max(1.0, float(want.abs().max())),
                               rtol=tol)
    full = lora_delta_reference(x.float(), make_stack(SLOT_RANKS), b)
    assert float((got.float() - full).norm() / full.norm()) < 0.02


def test_int8_buffer_setting():
    from fleetlm.engine.engine import EngineConfig, lora_buffer_dtype

    for model_dtype in (torch.float32, torch.bfloat16):
        assert lora_buffer_dtype("int8", model_dtype) == torch.int8
    EngineConfig(lora_dtype="int8").validate()
    q8 = make_stack(SLOT_RANKS, dtype=torch.int8)
    with pytest.raises(ValueError, match="x is torch.float16 but the adapter buffers are torch.int8"):
        lora_delta(torch.randn(2, IN).half(), q8, batch([0, 1]))
