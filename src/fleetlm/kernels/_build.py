"""Shared lazy build of fleetlm's C++ custom ops (``torch.utils.cpp_extension.load``).

A :class:`NativeKernel` compiles one ``csrc/*.cpp`` file the first time ``load()`` is
called (ninja, ``-O3 -march=native -fopenmp``; cached under ``$TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``), registers the op's fake (meta) kernel so it traces
under ``torch.compile``, and remembers the outcome for the rest of the process. An
environment variable (``FLEETLM_..._KERNEL=0``) disables it; a failed build logs one
warning and makes ``load()`` return False, so callers keep their pure-PyTorch path.

This module knows nothing about any particular op: each kernel module owns its source,
its fake kernel and its Python wrapper.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
_FALSE = {"0", "false", "no", "off"}


def ensure_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; a venv used without activation lacks it."""
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore[import-untyped]

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join([*dirs, os.environ.get("PATH", "")])


def cpu_tag(source: Path) -> str:
    """Short hash of this CPU's model and flags and of the source text.

    The build uses ``-march=native``, so a cached build must never be reused on a
    different CPU (shared home directories); hashing the source rebuilds on every edit.
    """
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        key = "|".join(ln for ln in lines if ln.startswith(("model name", "flags")))[:8192]
    except OSError:
        key = platform.processor() or platform.machine()
    return hashlib.sha256((key + source.read_text()).encode()).hexdigest()[:10]


class NativeKernel:
    """One lazily built C++ op library: ``load()`` once per process, thread-safe.

    name:          build name prefix (the CPU tag is appended), e.g. ``fleetlm_int8_gemv``
    source:        the .cpp file
    env_var:       ``<env_var>=0`` (or false/no/off) disables the kernel
    register_fake: called once after a successful build (fake kernels for torch.compile)
    fallback:      what callers do instead, for the warning ("falling back to ...")
    """

    def __init__(self, name: str, source: Path, env_var: str,
                 register_fake: Callable[[], None], fallback: str) -> None:
        self.name = name
        self.source = source
        self.env_var = env_var
        self.register_fake = register_fake
        self.fallback = fallback
        self._lock = threading.Lock()
        self._state: bool | None = None  # None: not tried yet

    def disabled(self) -> bool:
        return os.environ.get(self.env_var, "1").strip().lower() in _FALSE

    def _build(self) -> None:
        from torch.utils.cpp_extension import load as cpp_load

        ensure_ninja_on_path()
        cpp_load(
            name=f"{self.name}_{cpu_tag(self.source)}",
            sources=[str(self.source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        self.register_fake()

    def load(self) -> bool:
        """Build/load once per process; True when the op is usable."""
        if self._state is not None:
            return self._state
        with self._lock:
            if self._state is not None:
                return self._state
            if self.disabled():
                log.info("%s disabled by %s=0", self.name, self.env_var)
                self._state = False
                return self._state
            try:
                self._build()
                self._state = True
            except Exception as e:  # compiler missing, ninja missing, build error, ...
                msg = str(e).strip()
                log.warning("%s unavailable (%s: %s); falling back to %s", self.name,
                            type(e).__name__, msg.splitlines()[-1] if msg else "", self.fallback)
                self._state = False
            return self._state

    def is_loaded(self) -> bool:
        """True when ``load()`` has already succeeded (never triggers a build)."""
        return self._state is True
