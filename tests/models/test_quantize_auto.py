"""``--quantize auto`` (fleetlm serve's default): int8 where the int8 kernel runs a vector
path on this CPU, float weights where only its scalar loop would run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fleetlm.errors import ModelLoadError
from fleetlm.models.loader import resolve_quantize

PROBE = ("from fleetlm.models.loader import resolve_quantize;"
         "from fleetlm.kernels.cpu import kernel_isa;"
         "q = resolve_quantize('auto'); print(q, kernel_isa().get('int8_linear'))")


def probe(isa: str) -> list[str]:
    env = {**os.environ, "FLEETLM_CPU_ISA": isa}
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_auto_is_int8_on_this_cpus_vector_path():
    from fleetlm.kernels import int8_gemv
    from fleetlm.kernels.cpu import expected_isa

    assert int8_gemv.load(), "the int8 kernel should build here (a C++ compiler is installed)"
    best = expected_isa("auto")
    assert probe("auto") == (["int8", best] if best != "scalar" else ["none", "scalar"])


def test_auto_is_float_when_only_the_scalar_loop_would_run():
    assert probe("scalar") == ["none", "scalar"]


def test_explicit_choices_pass_and_unknown_ones_are_refused():
    assert resolve_quantize("none") == "none" and resolve_quantize("int8") == "int8"
    assert resolve_quantize("int4") == "int4"  # explicit only: auto never picks it
    assert resolve_quantize("auto", device="cuda") == "none"
    with pytest.raises(ModelLoadError,
                       match="--quantize 'int3' is not one of auto, none, int8, int4"):
        resolve_quantize("int3")
