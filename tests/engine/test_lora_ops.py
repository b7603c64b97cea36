"""Batched multi-LoRA deltas against the per-token reference (float32, tight tolerance)."""

from __future__ import annotations

import math

import pytest
import torch

from fleetlm.engine.lora import (
    NO_ADAPTER,
    LoraBatch,
    StackedLora,
    lora_delta,
    lora_delta_gather,
    lora_delta_reference,
    lora_delta_segments,
    lora_scale,
)

IMPLS = [lora_delta_segments, lora_delta_gather, lora_delta]
IN, OUT, RMAX = 48, 40, 16


@pytest.fixture
def stacked():
    """Five slots with ranks 16, 4, 8, 1 and an empty one; PEFT and rsLoRA scales."""
    g = torch.Generator().manual_seed(0)
    lora = StackedLora.allocate(num_slots=5, max_rank=RMAX, in_features=IN, out_features=OUT)
    for slot, (r, alpha, rs) in enumerate([(16, 32, False), (4, 8, True), (8, 16, False), (1, 2, False)]):
        a = torch.randn(r, IN, generator=g)
        b = torch.randn(OUT, r, generator=g)
        lora.set(slot, a, b, lora_scale(alpha, r, rs))
    return lora


def _batch(slots):
    return LoraBatch.from_slots(torch.tensor(slots))


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("slots", [
    [0, 1, 2, 3],                                   # decode: one token per adapter
    [2, NO_ADAPTER, 0, 2, 1, NO_ADAPTER, 3, 0, 0],  # mixed, repeated, tokens without adapter
    [1] * 37,                                       # prefill of one adapter
    [NO_ADAPTER] * 5,                               # no adapter at all
    [3, 3, NO_ADAPTER, 1, 1, 1, 0] * 20,            # large mixed batch
    [4, 0, 4],                                      # an empty slot contributes nothing
])
def test_batched_matches_reference(stacked, impl, slots):
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(1))
    batch = _batch(slots)
    got = impl(x, stacked, batch)
    ref = lora_delta_reference(x, stacked, batch)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    no = torch.tensor(slots) == NO_ADAPTER
    assert torch.count_nonzero(got[no]) == 0
    if not all(no) and 4 not in slots:
        assert got[~no].abs().sum() > 0


def test_reference_is_the_lora_formula(stacked):
    """The reference itself against the textbook formula with the unpadded rank-4 adapter."""
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(2))
    r = 4
    a, b = stacked.a[1, :r], stacked.b[1, :, :r]
    expected = (8 / math.sqrt(4)) * (x @ a.T) @ b.T
    torch.testing.assert_close(lora_delta_reference(x, stacked, _batch([1, 1, 1])), expected,
                               atol=1e-4, rtol=1e-5)


def test_padding_to_max_rank_changes_nothing():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, IN, generator=g), torch.randn(OUT, 2, generator=g)
    small = StackedLora.allocate(1, 2, IN, OUT)
    big = StackedLora.allocate(1, 64, IN, OUT)
    small.set(0, a, b, 0.5)
    big.set(0, a, b, 0.5)
    x = torch.randn(6, IN, generator=g)
    batch = _batch([0] * 6)
    torch.testing.assert_close(lora_delta_segments(x, big, batch), lora_delta_segments(x, small, batch))


def test_bfloat16_activations(stacked):
    lora = StackedLora(stacked.a.bfloat16(), stacked.b.bfloat16(), stacked.scale)
    x = torch.randn(9, IN, generator=torch.Generator().manual_seed(5)).bfloat16()
    batch = _batch([0, 1, 2, 3, NO_ADAPTER, 0, 1, 2, 3])
    ref = lora_delta_reference(x.float(), StackedLora(lora.a.float(), lora.b.float(), lora.scale), batch)
    for impl in IMPLS:
        got = impl(x, lora, batch)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, atol=0.5, rtol=3e-2)


def test_segments_group_tokens_by_slot():
    batch = _batch([2, NO_ADAPTER, 0, 2, 0])
    assert batch.segments == ((0, 0, 2), (2, 2, 4))
    assert batch.order.tolist() == [2, 4, 0, 3]
    assert _batch([NO_ADAPTER, NO_ADAPTER]).empty


def test_set_rejects_rank_above_max_and_clear_zeroes(stacked):
    with pytest.raises(ValueError, match="max_rank"):
        stacked.set(4, torch.randn(RMAX + 1, IN), torch.randn(OUT, RMAX + 1), 1.0)
    stacked.clear(0)
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(4))
    assert torch.count_nonzero(lora_delta(x, stacked, _batch([0, 0]))) == 0


def test_lora_scale_rules():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, use_rslora=True) == 8.0
    with pytest.raises(ValueError, match="rank"):
        lora_scale(16, 0)
