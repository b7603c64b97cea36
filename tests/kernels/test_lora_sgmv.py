"""fleetlm::lora_sgmv (C++ multi-LoRA kernel) against the per-token reference."""

from __future__ import annotations

import math

import pytest
import torch

from fleetlm.engine.lora import NO_ADAPTER, LoraBatch, StackedLora, lora_delta_reference
from fleetlm.kernels import lora_sgmv
from fleetlm.kernels._build import NativeKernel

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    if not lora_sgmv.load():
        pytest.skip("fleetlm::lora_sgmv could not be built/loaded "
                    "(no compiler/ninja, or FLEETLM_LORA_KERNEL=0)")


def make_stack(slot_ranks, in_features, parts, max_rank, dtype, seed=0) -> StackedLora:
    """slot_ranks[s]: a rank (or None: part absent) per part, or None for an empty slot."""
    g = torch.Generator().manual_seed(seed)
    stack = StackedLora.allocate(len(slot_ranks), max_rank, in_features, parts, dtype)
    for slot, ranks in enumerate(slot_ranks):
        if ranks is not None:
            stack.set(slot, [None if r is None else
                             (torch.randn(r, in_features, generator=g) / math.sqrt(in_features),
                              torch.randn(n, r, generator=g) * 0.3, 0.5 + slot % 3)
                             for r, n in zip(ranks, parts, strict=True)])
    return stack


def run(x, stack, slots):
    t = torch.as_tensor(slots, dtype=torch.long)
    return lora_sgmv.lora_sgmv(x, stack.a, stack.bt, stack.ranks, stack.scales, stack.offsets, t)


def reference(x, stack, slots):
    """The float32 delta of the stack's weights as float32 (int8 ones dequantised): what
    the kernel must compute."""
    return lora_delta_reference(x.float(), stack.dequantized(),
                                LoraBatch.from_slots(torch.as_tensor(slots)))


def random_ranks(num_slots, num_parts, max_rank, seed):
    g = torch.Generator().manual_seed(seed)
    return [tuple(int(r) or None for r in torch.randint(0, max_rank + 1, (num_parts,), generator=g))
            for _ in range(num_slots)]


QKV_ODD = dict(in_features=50, parts=(40, 8, 8), max_rank=16)  # sizes off every SIMD width
MIXED_RANKS = [(16, 3, None), (5, 5, 5), (1, None, 16), None, (7, 9, 2), (16, 16, 16)]
CASES = {
    # name: (layout, slot ranks, token slots)
    "mixed": (QKV_ODD, MIXED_RANKS, [0, 1, 2, 3, 4, 5, NO_ADAPTER, 0, 0, 1, 5, 5, NO_ADAPTER, 2]),
    "one_token": (QKV_ODD, MIXED_RANKS, [4]),
    "no_adapter": (QKV_ODD, MIXED_RANKS, [NO_ADAPTER] * 7),
    "32_tokens_32_slots": (dict(in_features=72, parts=(65, 31), max_rank=8),
                           random_ranks(32, 2, 8, seed=1), list(range(31, -1, -1))),
    "600_tokens_3_slots": (QKV_ODD, MIXED_RANKS, [4, 1, 5, 5, NO_ADAPTER] * 120),
    "wide_one_part": (dict(in_features=96, parts=(130,), max_rank=16),
                      [(16,), (3,), None], [0, 1, 0, 0, 2, 1, 0, 1, 1]),
    "tiny": (dict(in_features=1, parts=(1, 17), max_rank=2), [(1, 2), (2, None)],
             [0, 1, 1, NO_ADAPTER, 0]),
}


def tolerance(dtype, ref):
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    return dict(atol=1e-2 * max(1.0, float(ref.abs().max())), rtol=1.6e-2)


def check_against_reference(layout, slot_ranks, slots, dtype, weights, seed):
    """lora_sgmv (weights in x's dtype) or lora_sgmv_q8 (``weights="int8"``) against its
    reference, within its tolerance, with exact zeros where nothing applies (no adapter,
    empty slot, absent part)."""
    q8 = weights == "int8"
    stack = make_stack(slot_ranks, dtype=torch.int8 if q8 else dtype, **layout)
    assert stack.a.dtype == stack.bt.dtype == (torch.int8 if q8 else dtype)
    x = torch.randn(len(slots), layout["in_features"],
                    generator=torch.Generator().manual_seed(seed)).to(dtype)
    got = (run_q8 if q8 else run)(x, stack, slots)
    ref = reference(x, stack, slots)
    assert got.shape == ref.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, **(tolerance_q8 if q8 else tolerance)(dtype, ref))
    assert torch.equal(got.float()[ref == 0], ref[ref == 0])


@pytest.mark.parametrize("weights", ["x_dtype", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, weights):
    check_against_reference(*CASES[case], dtype, weights, seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thread_counts_give_identical_results(dtype):
    layout, slot_ranks, slots = CASES["600_tokens_3_slots"]
    stack = make_stack(slot_ranks, dtype=dtype, **layout)
    x = torch.randn(len(slots), layout["in_features"]).to(dtype)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(run(x, stack, slots))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])


def test_non_contiguous_x_is_handled():
    layout, slot_ranks, slots = CASES["mixed"]
    stack = make_stack(slot_ranks, dtype=torch.float32, **layout)
    wide = torch.randn(len(slots), 2 * layout["in_features"])
    x = wide[:, ::2]
    assert not x.is_contiguous()
    torch.testing.assert_close(run(x, stack, slots), run(x.contiguous(), stack, slots),
                               atol=0, rtol=0)


def _args(**over):
    stack = make_stack(MIXED_RANKS, dtype=torch.float32, **QKV_ODD)
    args = dict(x=torch.randn(3, 50), a=stack.a, bt=stack.bt, ranks=stack.ranks,
                scales=stack.scales, offsets=stack.offsets,
                token_slots=torch.tensor([0, NO_ADAPTER, 5]))
    args.update(over)
    return args


BAD = {
    "x_float64": (dict(x=torch.randn(3, 50, dtype=torch.float64)), "float32 or bfloat16"),
    "x_3d": (dict(x=torch.randn(1, 3, 50)), "x must be 2-D"),
    "a_dtype": (dict(a=torch.zeros(6, 3, 16, 50, dtype=torch.bfloat16)), "must have x's dtype"),
    "in_mismatch": (dict(x=torch.randn(3, 49)), "x has 49 features"),
    "bt_shape": (dict(bt=torch.zeros(6, 8, 56)), "bt .* does not match a"),
    "slot_range": (dict(token_slots=torch.tensor([0, 6, 1])), r"token_slots\[1\] = 6 is outside"),
    "slot_dtype": (dict(token_slots=torch.tensor([0, 1, 2], dtype=torch.int32)),
                   "token_slots must be int64"),
    "slot_count": (dict(token_slots=torch.tensor([0, 1])), r"token_slots must be int64 \[T\] = \[3\]"),
    "rank_range": (dict(ranks=torch.full((6, 3), 17, dtype=torch.int32)), "outside \\[0, R = 16\\]"),
    "rank_dtype": (dict(ranks=torch.zeros(6, 3, dtype=torch.long)), "ranks must be int32"),
    "scales_shape": (dict(scales=torch.zeros(6)), "scales must be float32 \\[S, P\\]"),
    "offsets_end": (dict(offsets=torch.tensor([0, 40, 48, 55])), "offsets must run from 0 to out = 56"),
    "a_strided": (dict(a=torch.zeros(6, 3, 50, 16).transpose(2, 3)), "a and bt must be contiguous"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_fullgraph_equals_eager(dtype):
    layout, slot_ranks, slots = CASES["mixed"]
    stack = make_stack(slot_ranks, dtype=dtype, **layout)
    x = torch.randn(len(slots), layout["in_features"]).to(dtype)
    t = torch.tensor(slots)

    def proj(x, t):  # the op between ordinary ops, as in a model's forward
        return x.new_ones(()) * 2 + lora_sgmv.lora_sgmv(x * 0.5, stack.a, stack.bt, stack.ranks,
                                                         stack.scales, stack.offsets, t)

    torch._dynamo.reset()
    compiled = torch.compile(proj, fullgraph=True)
    torch.testing.assert_close(compiled(x, t), proj(x, t), atol=0, rtol=0)


def test_env_var_disables_the_build(monkeypatch):
    def never() -> None:
        raise AssertionError("a disabled kernel must not be built")

    monkeypatch.setenv(lora_sgmv.ENV_VAR, "0")
    kernel = NativeKernel("fleetlm_test_disabled", lora_sgmv._kernel.source, lora_sgmv.ENV_VAR,
                          never, fallback="nothing")
    assert not kernel.load() and not kernel.is_loaded()


# ---------------------------------------------------------------- int8 weights (lora_sgmv_q8)


def run_q8(x, stack, slots):
    t = torch.as_tensor(slots, dtype=torch.long)
    return lora_sgmv.lora_sgmv_q8(x, stack.a, stack.a_scale, stack.bt, stack.bt_scale,
                                  stack.ranks, stack.scales, stack.offsets, t)


def tolerance_q8(dtype, ref):
    scale = max(1.0, float(ref.abs().max()))
    if dtype == torch.float32:  # fp32 sums of the same products in another order
        return dict(atol=2e-5 * scale, rtol=1e-5)
    return dict(atol=1e-2 * scale, rtol=1.6e-2)


def test_q8_is_within_quantisation_error_of_the_float_adapters():
    """int8 rows/columns with their own scales: the delta within ~1% of float32 LoRA's."""
    layout, slot_ranks, slots = CASES["600_tokens_3_slots"]
    x = torch.randn(len(slots), layout["in_features"], generator=torch.Generator().manual_seed(3))
    exact = reference(x, make_stack(slot_ranks, dtype=torch.float32, **layout), slots)
    got = run_q8(x, make_stack(slot_ranks, dtype=torch.int8, **layout), slots)
    rel = float((got - exact).norm() / exact.norm())
    assert 0 < rel < 0.015, rel


def _args_q8(**over):
    stack = make_stack(MIXED_RANKS, dtype=torch.int8, **QKV_ODD)
    args = dict(x=torch.randn(3, 50), a=stack.a, a_scale=stack.a_scale, bt=stack.bt,
                bt_scale=stack.bt_scale, ranks=stack.ranks, scales=stack.scales,
                offsets=stack.offsets, token_slots=torch.tensor([0, NO_ADAPTER, 5]))
    args.update(over)
    return args


BAD_Q8 = {
    "a_not_int8": (dict(a=torch.zeros(6, 3, 16, 50)), r"a and bt must be int8 \(Char\), got a Float"),
    "a_scale_shape": (dict(a_scale=torch.zeros(6, 3, 8)), r"a_scale must be contiguous float32 \[S, P, R\] = \[6, 3, 16\]"),
    "a_scale_dtype": (dict(a_scale=torch.zeros(6, 3, 16, dtype=torch.float64)), "a_scale must be contiguous float32"),
    "bt_scale_shape": (dict(bt_scale=torch.zeros(6, 55)), r"bt_scale must be contiguous float32 \[S, out\] = \[6, 56\]"),
    "x_float16": (dict(x=torch.randn(3, 50).half()), "float32 or bfloat16"),
    "slot_range": (dict(token_slots=torch.tensor([0, 6, 1])), r"token_slots\[1\] = 6 is outside"),
}


# op name -> (its Python wrapper, valid arguments with overrides, bad cases)
OPS = {"lora_sgmv": (lora_sgmv.lora_sgmv, _args, BAD),
       "lora_sgmv_q8": (lora_sgmv.lora_sgmv_q8, _args_q8, BAD_Q8)}


@pytest.mark.parametrize("op, case", [(op, case) for op, (_, _, bad) in OPS.items() for case in bad])
def test_bad_inputs_raise_clear_errors(op, case):
    fn, args, bad = OPS[op]
    over, message = bad[case]
    with pytest.raises(RuntimeError, match=message):
        fn(**args(**over))


@pytest.mark.parametrize("op", OPS)
def test_fake_kernel_and_schema(op):
    args = OPS[op][1]()
    torch.library.opcheck(getattr(torch.ops.fleetlm, op).default, tuple(args.values()),
                          test_utils=("test_schema", "test_faketensor"))


def test_q8_compiled_fullgraph_equals_eager():
    layout, slot_ranks, slots = CASES["mixed"]
    stack = make_stack(slot_ranks, dtype=torch.int8, **layout)
    x = torch.randn(len(slots), layout["in_features"]).bfloat16()
    t = torch.tensor(slots)

    def proj(x, t):
        return x.new_ones(()) * 2 + lora_sgmv.lora_sgmv_q8(x * 0.5, stack.a, stack.a_scale, stack.bt,
                                                           stack.bt_scale, stack.ranks,
                                                           stack.scales, stack.offsets, t)

    torch._dynamo.reset()
    compiled = torch.compile(proj, fullgraph=True)
    torch.testing.assert_close(compiled(x, t), proj(x, t), atol=0, rtol=0)


_PREFETCH_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.kernels import test_lora_sgmv as t
from fleetlm.kernels import lora_sgmv
assert lora_sgmv.load()
outs = {{}}
for name, (layout, slot_ranks, slots) in t.CASES.items():
    for dtype in (torch.float32, torch.bfloat16):
        for q8 in (False, True):
            stack = t.make_stack(slot_ranks, dtype=torch.int8 if q8 else dtype, **layout)
            x = torch.randn(len(slots), layout["in_features"],
                            generator=torch.Generator().manual_seed(3)).to(dtype)
            outs[f"{{name}}-{{dtype}}-{{q8}}"] = (t.run_q8 if q8 else t.run)(x, stack, slots)
torch.save(outs, sys.argv[1])
"""


def test_software_prefetch_changes_no_result(tmp_path):
    """The op prefetches the next work item's weights; FLEETLM_LORA_PREFETCH=0 (read once
    per process) turns that off. Every case, float32, bfloat16 and int8 weights, gives
    bit-identical results either way."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "run.py"
    script.write_text(_PREFETCH_SCRIPT.format(root=root))
    results = []
    for flag in ("0", "1"):
        out = tmp_path / f"prefetch-{flag}.pt"
        env = {**os.environ, "FLEETLM_LORA_PREFETCH": flag}
        subprocess.run([sys.executable, str(script), str(out)], env=env, check=True,
                       timeout=300)
        results.append(torch.load(out))
    assert results[0].keys() == results[1].keys() and len(results[0]) == 4 * len(CASES)
    for key, off in results[0].items():
        assert torch.equal(off, results[1][key]), key
