"""Weight-only int8 GEMV for CPU decode: the ``fleetlm::int8_linear`` custom op.

``int8_linear(x, w, scales)`` computes ``(x @ w.T) * scales`` with ``x`` [M, K] float32 or
bfloat16, ``w`` [N, K] int8 (contiguous) and ``scales`` [N] in ``x``'s dtype, accumulating
in float32 and returning [M, N] in ``x``'s dtype -- the same contract as
``torch._weight_int8pack_mm``, but 2-3x faster on cold (larger-than-cache) weights for the
small M of single-stream decode.

The C++ source (``csrc/int8_gemv.cpp``) is compiled on first use with
``torch.utils.cpp_extension.load`` (needs a C++ compiler and ``ninja``; cached under
``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). ``load()`` returns
False -- after logging one warning -- when the build fails, and when the environment
variable ``FLEETLM_INT8_KERNEL=0`` disables the kernel; callers then fall back to
``torch._weight_int8pack_mm``. A fake (meta) kernel is registered so the op traces
under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

ENV_VAR = "FLEETLM_INT8_KERNEL"
_SOURCE = Path(__file__).with_name("csrc") / "int8_gemv.cpp"
_lock = threading.Lock()
_state: bool | None = None  # None: not tried yet


def _disabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() in {"0", "false", "no", "off"}


def _fake_int8_linear(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    torch._check(x.dim() == 2, lambda: f"fleetlm::int8_linear: x must be 2-D, got {x.dim()}-D")
    torch._check(w.dim() == 2, lambda: f"fleetlm::int8_linear: w must be 2-D, got {w.dim()}-D")
    torch._check(
        x.shape[1] == w.shape[1],
        lambda: f"fleetlm::int8_linear: shape mismatch, x {tuple(x.shape)} w {tuple(w.shape)}",
    )
    return x.new_empty((x.shape[0], w.shape[0]))


def _ensure_ninja_on_path() -> None:
    # torch's builder runs `ninja` from PATH; a venv used without activation lacks it
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore[import-untyped]

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join([*dirs, os.environ.get("PATH", "")])


def _cpu_tag() -> str:
    """Short hash of this CPU's model and flags: the build uses -march=native, so a
    cached build must never be reused on a different CPU (shared home directories)."""
    import hashlib

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        key = "|".join(ln for ln in lines if ln.startswith(("model name", "flags")))[:8192]
    except OSError:
        import platform

        key = platform.processor() or platform.machine()
    return hashlib.sha256((key + _SOURCE.read_text()).encode()).hexdigest()[:10]


def _build() -> None:
    from torch.utils.cpp_extension import load as cpp_load

    _ensure_ninja_on_path()

    cpp_load(
        name=f"fleetlm_int8_gemv_{_cpu_tag()}",
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    torch.library.register_fake("fleetlm::int8_linear")(_fake_int8_linear)


def load() -> bool:
    """Build/load the kernel once per process; True when ``fleetlm::int8_linear`` is usable."""
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is not None:
            return _state
        if _disabled():
            log.info("int8 GEMV kernel disabled by %s=0", ENV_VAR)
            _state = False
            return _state
        try:
            _build()
            _state = True
        except Exception as e:  # compiler missing, ninja missing, build error, ...
            log.warning(
                "fleetlm int8 GEMV kernel unavailable (%s: %s); "
                "falling back to torch._weight_int8pack_mm",
                type(e).__name__,
                str(e).strip().splitlines()[-1] if str(e).strip() else "",
            )
            _state = False
        return _state


def is_loaded() -> bool:
    """True when ``load()`` has already succeeded (never triggers a build)."""
    return _state is True


def int8_linear(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    """``(x @ w.T) * scales`` -> [M, N] in x's dtype; call ``load()`` first.

    x: [M, K] float32/bfloat16; w: [N, K] int8, contiguous; scales: [N], x's dtype.
    """
    return torch.ops.fleetlm.int8_linear(x, w, scales)
