"""Forcing the native kernels onto each SIMD path, for tests that run every path this CPU
has (fleetlm.kernels.cpu.forced_isa), skipping the ones it cannot run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fleetlm.kernels import cpu

PATHS = ["avx512", "avx2", "neon", "scalar"]


@contextmanager
def forced_path(isa: str) -> Iterator[dict[str, str]]:
    """``with forced_path("avx2") as used:`` -- the loaded kernels run ``isa`` inside (the
    previous path restored after); ``used`` is what each reports. Skips the test where this
    CPU cannot run ``isa``."""
    if not cpu.isa_supported(isa):
        pytest.skip(f"this CPU ({cpu.cpu_features()['model']}) cannot run the {isa} path")
    with cpu.forced_isa(isa) as used:
        yield used
