"""Shared lazy build of fleetlm's C++ custom ops (``torch.utils.cpp_extension.load``).

A :class:`NativeKernel` compiles one ``csrc/*.cpp`` file the first time ``load()`` is
called (ninja, ``-O3 -fopenmp``; cached under ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), registers the op's fake (meta) kernel so it traces under
``torch.compile``, and remembers the outcome for the rest of the process.

The build targets the architecture's baseline (no ``-march=native``): the SIMD paths
(AVX-512, AVX2+FMA on x86; NEON on aarch64; scalar) are compiled into every library with
per-function ``#pragma GCC target`` and chosen when the op runs from what the CPU reports
(``csrc/cpu_isa.h``; ``FLEETLM_CPU_ISA`` forces one, see ``fleetlm.kernels.cpu``). A cached
build is therefore valid on any CPU of the same architecture; its name carries a hash of
the sources only (:func:`build_tag`).

An environment variable (``FLEETLM_..._KERNEL=0``) disables a kernel; a failed build logs
one warning and makes ``load()`` return False, so callers keep their pure-PyTorch path.

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


def build_tag(source: Path) -> str:
    """Short hash of the machine architecture, the source and the shared headers.

    The library no longer depends on the CPU model (the SIMD path is chosen at run time),
    only on the architecture (x86_64 / aarch64: different code is compiled). Hashing the
    source and every ``csrc/*.h`` / ``*.inc`` it may include rebuilds on every edit.
    """
    texts = [platform.machine(), source.read_text()]
    for header in sorted([*source.parent.glob("*.h"), *source.parent.glob("*.inc")]):
        texts.append(header.name + "\0" + header.read_text())
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:10]



class NativeKernel:
    """One lazily built C++ op library: ``load()`` once per process, thread-safe.

    name:          build name prefix (the build tag is appended), e.g. ``fleetlm_int8_gemv``
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
            name=f"{self.name}_{build_tag(self.source)}",
            sources=[str(self.source)],
            extra_cflags=["-O3", "-fopenmp"],
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
