"""fleetlm::int4_linear (C++ 4-bit group-wise GEMV): every SIMD path this CPU can run
against the reference (dequantised weight @ x; below ``activation_rows()`` rows, where the
AVX-512 and AVX2 paths quantise x to int8, against their slow twin
``reference_int8_activations``), the quantiser's round trip, input checks, torch.compile,
and a model loaded with ``quantize="int4"``."""

from __future__ import annotations

import pytest
import torch

from fleetlm.kernels import cpu, int4_gemv
from tests.kernels.paths import PATHS, forced_path

pytestmark = pytest.mark.timeout(600)

DTYPES = [torch.float32, torch.bfloat16]
MS = [1, 2, 3, 5, 8, 17, 32]
# (N, K, group size): odd N (row tails), K with several groups, G = 32 / 64 / 128
SHAPES = [(67, 64, 32), (5, 96, 32), (13, 128, 64), (1, 32, 32), (33, 384, 128), (131, 576, 32)]


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    if not int4_gemv.load():
        pytest.skip("fleetlm int4 GEMV extension could not be built/loaded")


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest):
    isa = request.param
    with forced_path(isa) as used:
        assert used["int4_linear"] == isa
        yield isa


def make(m: int, n: int, k: int, g: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen) * 0.05
    packed, scales, mins = int4_gemv.quantize(w, g)
    return x, w, packed, scales, mins


def reference(x: torch.Tensor, packed, scales, mins, g: int) -> torch.Tensor:
    """What the op must return on the current path: its int8-activation twin for few
    rows on AVX-512 / AVX2, else dequantised weight @ x."""
    if x.shape[0] < int4_gemv.activation_rows():
        return int4_gemv.reference_int8_activations(x, packed, scales, mins, g)
    w = int4_gemv.dequantize(packed, scales, mins, g)
    return (x.float() @ w.T).to(x.dtype)


def tol(dtype: torch.dtype, k: int) -> dict[str, float]:
    # |y| ~ sqrt(K) * 0.05; fp32 sums differ in order only, bf16 rounds the output
    if dtype == torch.float32:
        return {"rtol": 1e-4, "atol": 2e-5 * max(1.0, k ** 0.5)}
    return {"rtol": 1.6e-2, "atol": 1e-3 * max(1.0, k ** 0.5)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,g", SHAPES)
def test_every_path_matches_reference(path: str, dtype: torch.dtype, n: int, k: int,
                                      g: int) -> None:
    for m in MS:  # batched (M >= 8) and per-pass variants, every row-count remainder
        x, _, packed, scales, mins = make(m, n, k, g, dtype, seed=m + n + k)
        y = int4_gemv.int4_linear(x, packed, scales, mins, g)
        assert y.shape == (m, n) and y.dtype == dtype
        torch.testing.assert_close(y, reference(x, packed, scales, mins, g), **tol(dtype, k))


@pytest.mark.parametrize("mode", ["int8", "int8-novnni", "float"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activation_modes_match_their_twin(path: str, mode: str, dtype: torch.dtype) -> None:
    """Each way of treating x on each path: int8 with and without VNNI against the int8
    twin, float against dequantised weight @ x; and int8 stays within ~1% of float."""
    try:
        used = int4_gemv.set_activations(mode)
        expected = {"float": "float", "scalar": "float", "neon": "float", "avx2": "avx2",
                    "avx512": "avx512-bw" if mode == "int8-novnni" else (
                        "avx512-vnni" if "avx512_vnni" in cpu.cpu_flags() else "avx512-bw")}
        assert used == expected["float" if mode == "float" else path]
        assert int4_gemv.activation_rows() == (0 if used == "float" else 8)
        for n, k, g in SHAPES:
            for m in (1, 2, 4, 7):
                x, w, packed, scales, mins = make(m, n, k, g, dtype, seed=7 * m + n + k)
                y = int4_gemv.int4_linear(x, packed, scales, mins, g)
                torch.testing.assert_close(y, reference(x, packed, scales, mins, g),
                                           **tol(dtype, k))
                if n > 1:  # a single output of one run is too few numbers for a norm
                    exact = x.float() @ int4_gemv.dequantize(packed, scales, mins, g).T
                    err = (y.float() - exact).norm() / exact.norm()
                    assert err < 0.03, (n, k, g, m, err)  # ~0.5% typical
    finally:
        int4_gemv.set_activations("int8")


def test_activation_settings() -> None:
    with pytest.raises(RuntimeError, match="not int8, int8-novnni or float"):
        int4_gemv.set_activations("int4")
    with cpu.forced_isa("scalar"):
        assert int4_gemv.activation_rows() == 0 and int4_gemv.activation_path() == "float"
    # the twin quantises like the kernel: the largest |x| of a run gets +-127, a tie
    # (-1.0 * 127 / 2 = -63.5) rounds half to even, an all-zero run gets scale 0, codes 0
    x = torch.zeros(1, 96)
    x[0, :32] = torch.linspace(-1.0, 2.0, 32)
    x[0, 40] = -0.5
    q, s = int4_gemv.quantize_activations(x)
    assert q[0, 31] == 127 and q[0, 0] == -64 and s[0, 0] == pytest.approx(2 / 127)
    assert q[0, 40] == -127 and s[0, 1] == pytest.approx(0.5 / 127)
    assert s[0, 2] == 0 and not q[0, 64:].any()
    # and the kernel agrees with it on these runs (a zero run, a run with a tie)
    w = torch.randn(8, 96) * 0.05
    packed, scales, mins = int4_gemv.quantize(w, 32)
    if int4_gemv.activation_rows():
        torch.testing.assert_close(int4_gemv.int4_linear(x, packed, scales, mins, 32),
                                   int4_gemv.reference_int8_activations(x, packed, scales, mins, 32),
                                   rtol=1e-5, atol=1e-6)


MODEL = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]


@pytest.mark.parametrize("m", [1, 5, 32])
@pytest.mark.parametrize("n,k", MODEL)
def test_model_shapes(m: int, n: int, k: int) -> None:
    x, _, packed, scales, mins = make(m, n, k, 32, torch.float32, seed=n + m)
    y = int4_gemv.int4_linear(x, packed, scales, mins, 32)
    torch.testing.assert_close(y, reference(x, packed, scales, mins, 32), **tol(torch.float32, k))


def test_round_trip_error_bound() -> None:
    w = torch.randn(96, 256) * 0.1
    for g in (32, 64, 128):
        packed, scales, mins = int4_gemv.quantize(w, g)
        assert packed.dtype == torch.uint8 and packed.shape == (96, 128)
        assert scales.shape == mins.shape == (96, 256 // g) and scales.dtype == torch.float32
        back = int4_gemv.dequantize(packed, scales, mins, g)
        err = (back - w).abs().reshape(96, -1, g)
        # every weight within one step of its group (the refit may move the grid off
        # min/max), and the mean error well under half a step
        assert (err <= scales[..., None] * 1.0 + 1e-6).all()
        assert err.mean() < 0.3 * scales.mean()
        rel = ((back - w).pow(2).mean() / w.pow(2).mean()).item()
        assert rel < {32: 0.007, 64: 0.009, 128: 0.011}[g]
    # pack / unpack are inverses, and a group of equal weights comes back exactly
    q = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    assert torch.equal(int4_gemv.unpack(int4_gemv.pack(q)), q)
    const = torch.full((2, 32), 0.25)
    p, s, mn = int4_gemv.quantize(const, 32)
    torch.testing.assert_close(int4_gemv.dequantize(p, s, mn, 32), const)


def test_bad_group_size_or_k_is_refused() -> None:
    with pytest.raises(ValueError, match=r"K \(80\) must be a multiple of group_size \(32\)"):
        int4_gemv.quantize(torch.randn(4, 80), 32)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        int4_gemv.quantize(torch.randn(4, 96), 48)
    x, _, packed, scales, mins = make(2, 8, 64, 32, torch.float32)
    with pytest.raises(RuntimeError, match=r"K \(64\) must be a multiple of group_size \(128\)"):
        int4_gemv.int4_linear(x, packed, scales, mins, 128)
    with pytest.raises(RuntimeError, match="group_size must be a positive multiple of 32"):
        int4_gemv.int4_linear(x, packed, scales, mins, 16)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        int4_gemv.int4_linear(torch.randn(2, 96), packed, scales, mins, 32)
    with pytest.raises(RuntimeError, match="scales must be"):
        int4_gemv.int4_linear(x, packed, scales[:, :1], mins, 32)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        int4_gemv.int4_linear(x.half(), packed, scales, mins, 32)
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        int4_gemv.int4_linear(x, packed.to(torch.int8), scales, mins, 32)


def test_empty_and_noncontiguous_x() -> None:
    _, _, packed, scales, mins = make(1, 8, 64, 32, torch.float32)
    xt = torch.randn(64, 3).T
    torch.testing.assert_close(int4_gemv.int4_linear(xt, packed, scales, mins, 32),
                               reference(xt, packed, scales, mins, 32))
    assert int4_gemv.int4_linear(torch.zeros(0, 64), packed, scales, mins, 32).shape == (0, 8)


class _Tiny(torch.nn.Module):
    """Two int4 projections with an op in between, as in an MLP."""

    def __init__(self) -> None:
        super().__init__()
        for name, (n, k) in {"a": (96, 64), "b": (64, 96)}.items():
            p, s, mn = int4_gemv.quantize(torch.randn(n, k) * 0.1, 32)
            self.register_buffer(f"{name}_p", p)
            self.register_buffer(f"{name}_s", s)
            self.register_buffer(f"{name}_m", mn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = int4_gemv.int4_linear(x, self.a_p, self.a_s, self.a_m, 32)
        h = torch.nn.functional.silu(h)
        return int4_gemv.int4_linear(h, self.b_p, self.b_s, self.b_m, 32) + x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_compile_fullgraph_dynamic_m(dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    mod = _Tiny().eval()
    compiled = torch.compile(mod, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        for m in (1, 3, 17):
            x = torch.randn(m, 64).to(dtype)
            torch.testing.assert_close(compiled(x), mod(x), **tol(dtype, 96))
    torch._dynamo.reset()


def test_fake_kernel_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 576, dtype=torch.bfloat16)
        p = torch.empty(960, 288, dtype=torch.uint8)
        s = torch.empty(960, 18)
        y = torch.ops.fleetlm.int4_linear(x, p, s, s, 32)
    assert y.shape == (5, 960) and y.dtype == torch.bfloat16


def test_int4_linear_module_prefill_and_decode_agree() -> None:
    from fleetlm.models.layers import PREFILL_ROWS, Int4Linear, Linear

    lin = Linear(128, 40, bias=True)
    lin.weight.data = torch.randn(40, 128) * 0.1
    lin.bias.data = torch.randn(40)  # type: ignore[union-attr]
    q = Int4Linear.from_linear(lin, torch.float32, use_kernel=True)
    w = q.dequantized(torch.float32)
    assert (w - lin.weight).abs().max() <= q.scales.max()
    x = torch.randn(PREFILL_ROWS + 3, 128)
    ref = x @ w.T + lin.bias
    torch.testing.assert_close(q(x), ref, rtol=1e-4, atol=1e-4)  # dense path
    few = reference(x[:5], q.packed, q.scales, q.mins, q.group_size) + lin.bias
    torch.testing.assert_close(q(x[:5]), few, rtol=1e-4, atol=1e-4)  # the op


@pytest.mark.parametrize("family", ["llama", "qwen2-bias", "smollm2-tied"])
def test_load_model_int4(tiny_checkpoints, family) -> None:
    from fleetlm.models.layers import Int4Linear, Int8Linear, Linear
    from fleetlm.models.loader import load_model

    folder = tiny_checkpoints[family]
    ref = load_model(str(folder), dtype="float32", with_tokenizer=False)
    q = load_model(str(folder), dtype="float32", quantize="int4", with_tokenizer=False)
    assert q.quantize == "int4"
    float_names = {n for n, m in ref.model.named_modules() if isinstance(m, Linear)}
    int4_names = {n for n, m in q.model.named_modules() if isinstance(m, Int4Linear)}
    # hidden 64, MLP 96: every projection in int4; the LM head in int8 (the default)
    assert "lm_head" in float_names and int4_names == float_names - {"lm_head"}
    assert isinstance(q.model.lm_head, Int8Linear)
    assert all(m.use_kernel for m in q.model.modules() if isinstance(m, Int4Linear))
    assert q.model.model.embed_tokens.weight.dtype == torch.float32  # the lookup stays float
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    outs = []
    for lm in (ref, q):
        with torch.inference_mode():
            cache = lm.model.allocate_cache(1, 64)
            outs.append(lm.model(ids, torch.arange(20)[None], cache, torch.tensor([0]), 32,
                                 torch.tensor([19]))[0])
    assert not torch.equal(outs[0], outs[1])
    assert torch.nn.functional.cosine_similarity(outs[0], outs[1], dim=0) > 0.98


def test_int4_head_on_request(tiny_checkpoints) -> None:
    from fleetlm.models.layers import Int4Linear
    from fleetlm.models.loader import load_model, quantize_int4

    lm = load_model(str(tiny_checkpoints["smollm2-tied"]), dtype="float32", with_tokenizer=False)
    embed = lm.model.model.embed_tokens.weight.clone()
    formats = quantize_int4(lm.model, head="int4")
    assert formats["lm_head"] == "int4" and set(formats.values()) == {"int4"}
    assert isinstance(lm.model.lm_head, Int4Linear)
    assert torch.equal(lm.model.model.embed_tokens.weight, embed)  # the lookup untouched
    with pytest.raises(ValueError, match="head='int2'"):
        quantize_int4(lm.model, head="int2")


def test_layers_off_the_group_size_stay_int8() -> None:
    from fleetlm.models.layers import Int4Linear, Int8Linear, Linear
    from fleetlm.models.loader import quantize_int4

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Module()
            self.model.embed_tokens = torch.nn.Embedding(10, 64)  # type: ignore[assignment]
            self.a = Linear(64, 48)
            self.b = Linear(48, 64)  # 48 % 32 != 0

        @property
        def dtype(self) -> torch.dtype:
            return torch.float32

    net = Net()
    formats = quantize_int4(net)  # type: ignore[arg-type]
    assert formats == {"a": "int4", "b": "int8"}
    assert isinstance(net.a, Int4Linear) and isinstance(net.b, Int8Linear)
