"""The NEON (aarch64) micro-kernels, cross-compiled and run under qemu on other machines.

On an ARM machine the NEON path is tested like every other path against PyTorch
(``test_cpu_dispatch.py``); elsewhere this test pastes the kernels' ``namespace neon``
blocks into ``neon_harness.cpp``, builds it with ``aarch64-linux-gnu-g++ -static`` and runs
it under ``qemu-aarch64-static`` (Debian: g++-aarch64-linux-gnu, qemu-user-static). It is
skipped where those tools are missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fleetlm.kernels._build import CSRC

pytestmark = pytest.mark.timeout(600)

CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64-static"
HARNESS = Path(__file__).with_name("neon_harness.cpp")


def neon_block(source: Path, rename: str | None = None) -> str:
    text = source.read_text()
    start = text.index("namespace neon {")
    end = text.index("}  // namespace neon", start) + len("}  // namespace neon")
    block = text[start:end]
    return block.replace("namespace neon", f"namespace {rename}") if rename else block


@pytest.mark.skipif(not (shutil.which(CXX) and shutil.which(QEMU)),
                    reason=f"needs {CXX} and {QEMU}")
def test_neon_kernels_under_qemu(tmp_path: Path) -> None:
    kernels = "\n".join([neon_block(CSRC / "int8_gemv.cpp", "i8neon"),
                         neon_block(CSRC / "int4_gemv.cpp", "i4neon"),
                         neon_block(CSRC / "lora_sgmv.cpp"),
                         neon_block(CSRC / "decode_stack.inc", "stneon")])
    src = tmp_path / "harness.cpp"
    src.write_text(HARNESS.read_text().replace("// NEON_KERNELS", kernels))
    exe = tmp_path / "harness"
    subprocess.run([CXX, "-std=c++17", "-O2", "-static", str(src), "-o", str(exe)], check=True,
                   timeout=300)
    out = subprocess.run([QEMU, str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "0 failures" in out.stdout, out.stdout[-2000:]
