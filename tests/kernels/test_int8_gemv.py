"""fleetlm::int8_linear (C++ weight-only int8 GEMV) against the reference and ATen."""

from __future__ import annotations

import pytest
import torch

from fleetlm.kernels import int8_gemv

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    if not int8_gemv.load():
        pytest.skip("fleetlm int8 GEMV extension could not be built/loaded "
                    "(no compiler/ninja, or FLEETLM_INT8_KERNEL=0)")


def make(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(dtype)
    return x, w, s


def reference(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x.float() @ (w.float() * s.float()[:, None]).T).to(x.dtype)


def tol(dtype: torch.dtype, k: int) -> dict[str, float]:
    # |y| ~ sqrt(K) * 127 * 0.01; fp32 sums differ in order only, bf16 rounds the output
    if dtype == torch.float32:
        return {"rtol": 1e-4, "atol": 1e-4 * max(1.0, k ** 0.5)}
    return {"rtol": 1.6e-2, "atol": 1e-2 * max(1.0, k ** 0.5)}


DTYPES = [torch.float32, torch.bfloat16]
ODD = [(67, 45), (5, 7), (13, 16), (9, 17), (33, 130), (8, 64), (1, 1)]
MODEL = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 8, 33])
@pytest.mark.parametrize("n,k", ODD)
def test_odd_shapes(dtype: torch.dtype, m: int, n: int, k: int) -> None:
    x, w, s = make(m, n, k, dtype)
    y = int8_gemv.int8_linear(x, w, s)
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y, reference(x, w, s), **tol(dtype, k))


# the LM head (49152 x 576) only at the decode sizes, to keep the test quick
MODEL_CASES = [(m, n, k) for (n, k) in MODEL for m in [1, 2, 3, 8, 33]
               if n != 49152 or m in (1, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", MODEL_CASES)
def test_model_shapes(dtype: torch.dtype, m: int, n: int, k: int) -> None:
    x, w, s = make(m, n, k, dtype, seed=n + k + m)
    y = int8_gemv.int8_linear(x, w, s)
    ref = reference(x, w, s)
    torch.testing.assert_close(y, ref, **tol(dtype, k))
    aten = torch._weight_int8pack_mm(x, w, s)
    torch.testing.assert_close(y, aten, **tol(dtype, k))


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts_agree(threads: int) -> None:
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x, w, s = make(1, 3072, 576, torch.float32, seed=3)
        y = int8_gemv.int8_linear(x, w, s)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(y, reference(x, w, s), **tol(torch.float32, 576))


def test_noncontiguous_x_and_empty() -> None:
    x, w, s = make(4, 40, 64, torch.float32)
    xt = torch.randn(64, 4).T  # non-contiguous view [4, 64]
    torch.testing.assert_close(int8_gemv.int8_linear(xt, w, s), reference(xt, w, s))
    assert int8_gemv.int8_linear(x[:0], w, s).shape == (0, 40)
    y = int8_gemv.int8_linear(torch.zeros(2, 0), torch.zeros(3, 0, dtype=torch.int8),
                              torch.ones(3))
    assert y.shape == (2, 3) and not y.any()


def test_input_validation() -> None:
    x, w, s = make(2, 16, 32, torch.float32)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        int8_gemv.int8_linear(x.half(), w, s.half())
    with pytest.raises(RuntimeError, match="w must be int8"):
        int8_gemv.int8_linear(x, w.float(), s)
    with pytest.raises(RuntimeError, match="scales must have x's dtype"):
        int8_gemv.int8_linear(x, w, s.bfloat16())
    with pytest.raises(RuntimeError, match="shape mismatch"):
        int8_gemv.int8_linear(x[:, :31], w, s)
    with pytest.raises(RuntimeError, match="scales has 15 elements"):
        int8_gemv.int8_linear(x, w, s[:15])
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        int8_gemv.int8_linear(x[None], w, s)
    with pytest.raises(RuntimeError, match="w must be contiguous"):
        int8_gemv.int8_linear(x, torch.randint(-5, 5, (32, 16), dtype=torch.int8).T, s)


class _Tiny(torch.nn.Module):
    """Two int8 projections with an op in between, as in an MLP."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        _, w1, s1 = make(1, 96, 64, dtype, seed=1)
        _, w2, s2 = make(1, 64, 96, dtype, seed=2)
        for name, t in {"w1": w1, "s1": s1, "w2": w2, "s2": s2}.items():
            self.register_buffer(name, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(int8_gemv.int8_linear(x, self.w1, self.s1))
        return int8_gemv.int8_linear(h, self.w2, self.s2) + x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_compile_fullgraph_freezing(dtype: torch.dtype) -> None:
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    mod = _Tiny(dtype).eval()
    x = torch.randn(3, 64).to(dtype)
    with torch.inference_mode(), inductor_config.patch(freezing=True):
        eager = mod(x)
        compiled = torch.compile(mod, fullgraph=True)
        out = compiled(x)
        out2 = compiled(torch.randn(1, 64).to(dtype))  # another M (may recompile)
    assert out2.shape == (1, 64)
    torch.testing.assert_close(out, eager, **tol(dtype, 96))
    torch._dynamo.reset()


def test_fake_kernel_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 576, dtype=torch.bfloat16)
        w = torch.empty(960, 576, dtype=torch.int8)
        s = torch.empty(960, dtype=torch.bfloat16)
        y = torch.ops.fleetlm.int8_linear(x, w, s)
    assert y.shape == (5, 960) and y.dtype == torch.bfloat16


# ---------------------------------------------------------------- bfloat16 dot products


def _has_avx512_bf16() -> bool:
    from fleetlm.kernels import cpu

    return "avx512_bf16" in cpu.cpu_flags() and cpu.isa_supported("avx512")


@pytest.fixture
def restore_bf16_dot():
    yield
    int8_gemv.set_bf16_dot("auto")


@pytest.mark.parametrize("how", ["on", "off"])
@pytest.mark.parametrize("m", [10, 13, 32, 33, 63])
@pytest.mark.parametrize("n,k", [(67, 45), (5, 33), (9, 64), (960, 576), (576, 1536)])
def test_batched_bf16_with_and_without_vdpbf16ps(how: str, m: int, n: int, k: int,
                                                 restore_bf16_dot) -> None:
    """The batched bfloat16 path, with bfloat16 dot products where this CPU has them, and
    with fp32 FMAs: both against the reference, odd shapes included (K not a multiple of
    32, N not a multiple of 4)."""
    assert int8_gemv.set_bf16_dot(how) == (how == "on" and _has_avx512_bf16())
    x, w, s = make(m, n, k, torch.bfloat16, seed=m + n)
    y = int8_gemv.int8_linear(x, w, s)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, reference(x, w, s), **tol(torch.bfloat16, k))


def test_bf16_dot_is_decided_by_measurement_and_can_be_forced(restore_bf16_dot) -> None:
    from fleetlm.kernels import cpu

    # auto measures both paths on this CPU; never on where the CPU lacks AVX512_BF16
    auto = int8_gemv.set_bf16_dot("auto")
    assert isinstance(auto, bool) and (auto <= _has_avx512_bf16())
    assert int8_gemv.bf16_dot() == auto
    assert int8_gemv.set_bf16_dot("off") is False and int8_gemv.bf16_dot() is False
    assert int8_gemv.set_bf16_dot("on") == _has_avx512_bf16()
    with cpu.forced_isa("avx2"):  # the path belongs to the avx512 kernels
        assert int8_gemv.bf16_dot() is False
    with pytest.raises(RuntimeError, match="not one of auto, on, off"):
        int8_gemv.set_bf16_dot("sometimes")


def test_bf16_dot_environment_variable(tmp_path) -> None:
    """FLEETLM_INT8_BF16DOT is read when the path is first needed, in a fresh process."""
    import os
    import subprocess
    import sys

    code = ("from fleetlm.kernels import int8_gemv; int8_gemv.load(); "
            "print(int8_gemv.bf16_dot())")
    for value, want in (("off", "False"), ("on", str(_has_avx512_bf16()))):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "FLEETLM_INT8_BF16DOT": value}, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == want
