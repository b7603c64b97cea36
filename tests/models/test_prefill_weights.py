"""Quantised projections keep the float weight their prefill uses (FLEETLM_PREFILL_WEIGHTS):
made once, the same result as dequantising per call, dropped on request, never kept by a
compiled graph."""

from __future__ import annotations

import pytest
import torch

from fleetlm.models.layers import PREFILL_ROWS, Int4Linear, Int8Linear, Linear


def projection(kind: str) -> Int8Linear | Int4Linear:
    torch.manual_seed(0)
    lin = Linear(64, 48)
    lin.weight.data = torch.randn(48, 64) * 0.05
    if kind == "int8":
        return Int8Linear.from_linear(lin, torch.float32)
    return Int4Linear.from_linear(lin, torch.float32, group_size=32)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_prefill_keeps_one_float_weight_and_matches_dequantising(kind, monkeypatch):
    x = torch.randn(PREFILL_ROWS + 3, 64)
    kept = projection(kind)
    first = kept(x)
    w = kept._prefill.weight
    assert w is not None and w.dtype == torch.float32 and w.shape == (48, 64)
    second = kept(x)
    assert kept._prefill.weight is w  # made once
    monkeypatch.setenv("FLEETLM_PREFILL_WEIGHTS", "dequantize")
    fresh = projection(kind)
    third = fresh(x)
    assert fresh._prefill.weight is None  # dequantised per call, nothing kept
    torch.testing.assert_close(first, third, rtol=0, atol=0)
    torch.testing.assert_close(second, third, rtol=0, atol=0)
    ref = x @ w.T
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)


def test_a_compiled_graph_does_not_keep_the_weight():
    p = projection("int8")
    x = torch.randn(PREFILL_ROWS, 64)
    out = torch.compile(p, fullgraph=True)(x)
    assert p._prefill.weight is None
    torch.testing.assert_close(out, p(x), rtol=1e-5, atol=1e-5)
