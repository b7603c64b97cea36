"""Run-time choice of the kernels' SIMD path (fleetlm.kernels.cpu, csrc/cpu_isa.h).

Every path this CPU can run is checked against the plain PyTorch reference, for both
kernels; forcing each value of FLEETLM_CPU_ISA must report the path the CPU's flags
predict (the forced one, or the fallback below it where the CPU lacks it).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fleetlm.engine.lora import NO_ADAPTER
from fleetlm.kernels import cpu, int8_gemv, lora_sgmv
from tests.kernels.paths import PATHS, forced_path
from tests.kernels.test_int8_gemv import make as make_int8
from tests.kernels.test_int8_gemv import reference as int8_reference
from tests.kernels.test_int8_gemv import tol as int8_tol
from tests.kernels.test_lora_sgmv import CASES as LORA_CASES
from tests.kernels.test_lora_sgmv import check_against_reference as check_lora_against_reference
from tests.kernels.test_lora_sgmv import make_stack, random_ranks
from tests.kernels.test_lora_sgmv import run as lora_run

pytestmark = pytest.mark.timeout(600)



@pytest.fixture(scope="module", autouse=True)
def _kernels() -> None:
    if not (int8_gemv.load() and lora_sgmv.load()):
        pytest.skip("fleetlm native kernels could not be built/loaded")


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest):
    """Each path this CPU can run, forced for the test (the previous one restored)."""
    isa = request.param
    with forced_path(isa) as used:
        assert used["int8_linear"] == isa and used["lora_sgmv"].split("+")[0] == isa
        yield isa


# ---------------------------------------------------------------- dispatch


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_forcing_reports_the_path_or_its_fallback(isa: str) -> None:
    want = cpu.expected_isa(isa)
    assert cpu.isa_supported(want)
    with cpu.forced_isa(isa) as used:
        assert used["int8_linear"] == want
        assert used["lora_sgmv"].split("+")[0] == want
        assert cpu.kernel_isa() == used
    if isa != "auto" and not cpu.isa_supported(isa):
        assert cpu.RANKED.index(want) < cpu.RANKED.index(isa)  # fell back below


def test_fallback_order_on_other_cpus() -> None:
    epyc = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})  # AMD Zen 2/3: no AVX-512
    old = frozenset({"sse4_2", "avx"})  # Sandy Bridge: AVX without AVX2/FMA
    if cpu._is_arm():
        pytest.skip("x86 flag sets")
    assert cpu.expected_isa("auto", epyc) == "avx2"
    assert cpu.expected_isa("avx512", epyc) == "avx2"
    assert cpu.expected_isa("neon", epyc) == "scalar"
    assert cpu.expected_isa("avx512", old) == "scalar"
    assert cpu.expected_isa("auto", cpu.NEEDS["avx512"]) == "avx512"


def test_auto_is_the_best_path_and_matches_torch() -> None:
    with cpu.forced_isa("auto") as used:
        assert used["int8_linear"] == cpu.expected_isa("auto")
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if capability == "AVX512":
        assert cpu.expected_isa("auto") == "avx512"
    if capability == "AVX2":
        assert cpu.expected_isa("auto") == "avx2"


def test_unknown_isa_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        cpu.set_kernel_isa("sse9")
    with pytest.raises(RuntimeError, match="unknown CPU ISA 'sse9'"):
        torch.ops.fleetlm.int8_linear_set_isa("sse9")


def test_cpu_features_report() -> None:
    f = cpu.cpu_features()
    assert f["best_isa"] == cpu.expected_isa("auto")
    assert f["best_isa"] in f["supported_isas"] and "scalar" in f["supported_isas"]
    assert isinstance(f["torch_capability"], str) and f["model"]


@pytest.mark.parametrize("isa", ["avx2", "neon", "bogus"])
def test_env_var_picks_the_path_at_first_use(isa: str) -> None:
    code = ("import torch; from fleetlm.kernels import int8_gemv, lora_sgmv; "
            "assert int8_gemv.load() and lora_sgmv.load(); "
            "print(torch.ops.fleetlm.int8_linear_isa(), torch.ops.fleetlm.lora_sgmv_isa())")
    env = {**os.environ, cpu.ENV_VAR: isa}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    int8_path, lora_path = out.stdout.split()
    want = cpu.expected_isa("auto" if isa == "bogus" else isa)
    assert int8_path == want and lora_path.split("+")[0] == want
    if isa == "bogus":
        assert "is not one of auto" in out.stderr


# ---------------------------------------------------------------- int8_linear per path

INT8_M = [1, 2, 3, 4, 5, 8, 17, 32]
# N odd, K off every SIMD width (tails), plus model rows with a K tail and long K
INT8_SHAPES = [(67, 45), (5, 7), (33, 130), (1, 1), (129, 200), (961, 577), (15, 1536 + 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k", INT8_SHAPES)
def test_int8_linear_each_path(path: str, dtype: torch.dtype, n: int, k: int) -> None:
    for m in INT8_M:
        x, w, s = make_int8(m, n, k, dtype, seed=m * 7 + n)
        y = int8_gemv.int8_linear(x, w, s)
        assert y.shape == (m, n) and y.dtype == dtype
        torch.testing.assert_close(y, int8_reference(x, w, s), **int8_tol(dtype, k),
                                   msg=lambda e, m=m: f"{path} M={m}: {e}")


@pytest.mark.parametrize("m", [1, 32])
def test_int8_linear_each_path_model_shape(path: str, m: int) -> None:
    x, w, s = make_int8(m, 3072, 576, torch.float32, seed=m)
    torch.testing.assert_close(int8_gemv.int8_linear(x, w, s), int8_reference(x, w, s),
                               **int8_tol(torch.float32, 576))


# ---------------------------------------------------------------- lora_sgmv per path

LORA_EXTRA = {
    # SmolLM2's q|k|v (576 -> 576 + 192 + 192) with mixed ranks, 32 decode tokens
    "smollm2_qkv": (dict(in_features=576, parts=(576, 192, 192), max_rank=16),
                    [(16, 8, 8), (4, None, 4), (1, 1, 1), (13, 5, 16)],
                    [0, 1, 2, 3, NO_ADAPTER, 3, 2, 1] * 4),
    "odd_columns": (dict(in_features=33, parts=(71, 9, 23), max_rank=9),
                    random_ranks(5, 3, 9, seed=4), [4, 3, 2, 1, 0, 0, 1, 4, 4, 4, 4]),
}
LORA_ALL = {**LORA_CASES, **LORA_EXTRA}


@pytest.mark.parametrize("weights", ["x_dtype", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LORA_ALL)
def test_lora_sgmv_each_path(path: str, case: str, dtype: torch.dtype, weights: str) -> None:
    """lora_sgmv (weights in x's dtype) and lora_sgmv_q8 (int8 weights) on each path."""
    check_lora_against_reference(*LORA_ALL[case], dtype, weights, seed=5)


def test_lora_sgmv_bf16_output_within_one_ulp_of_fp32(path: str) -> None:
    """The vector fp32 -> bf16 rounding and column interleave (software, or AVX512_BF16)
    put every output within one bf16 ulp of the same sums done in fp32."""
    layout, slot_ranks, slots = LORA_EXTRA["smollm2_qkv"]
    bf = make_stack(slot_ranks, dtype=torch.bfloat16, **layout)
    x = torch.randn(len(slots), layout["in_features"],
                    generator=torch.Generator().manual_seed(2)).bfloat16()
    got = lora_run(x, bf, slots).float()
    f32 = bf.dequantized()  # the same values in float32 buffers
    want = lora_run(x.float(), f32, slots)  # bf16 inputs are exact in fp32
    # fp32 sums in another order differ by ~1e-7 of the terms: near-zero (cancelled)
    # outputs get an absolute allowance
    slack = 1e-5 * float(want.abs().max())
    assert bool(((got - want).abs() <= want.abs() * 2 ** -7 + slack).all())


# ---------------------------------------------------------------- build cache key


def test_build_tag_follows_sources_not_the_cpu(tmp_path, monkeypatch) -> None:
    """One library serves every CPU of an architecture: the cache key hashes the sources
    (and the headers next to them) and the architecture, never /proc/cpuinfo."""
    from pathlib import Path

    from fleetlm.kernels import _build

    src = tmp_path / "k.cpp"
    src.write_text('#include "shared.h"\n')
    (tmp_path / "shared.h").write_text("// v1\n")
    real_read = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:
        assert str(self) != "/proc/cpuinfo", "the build key must not depend on the CPU"
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    tag = _build.build_tag(src)
    assert _build.build_tag(src) == tag
    (tmp_path / "shared.h").write_text("// v2\n")  # an included header changed
    tag2 = _build.build_tag(src)
    assert tag2 != tag
    monkeypatch.setattr(_build.platform, "machine", lambda: "other-arch")
    assert _build.build_tag(src) != tag2
