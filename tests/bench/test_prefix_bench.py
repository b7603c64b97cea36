"""``fleetlm bench prefix`` end to end on the embedded model (short settings): the JSON has
both runs, the cached run found the prefix, and the greedy tokens of both runs agree."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FLEETLM = shutil.which("fleetlm", path=str(Path(sys.executable).parent))


def test_bench_prefix_writes_json_and_the_cache_is_used(tmp_path):
    out = tmp_path / "prefix.json"
    fleetlm = FLEETLM
    assert fleetlm, "the fleetlm entry point is not installed in this environment"
    r = subprocess.run([fleetlm, "bench", "prefix", "--no-compile", "--prefix-tokens", "96",
                        "--suffix-tokens", "8", "--requests", "3", "--max-new-tokens", "4",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["runs"]["uncached"]["prefix_hits"] == 0
    assert data["runs"]["cached"]["prefix_hits"] == 3  # every timed request reused the prefix
    assert data["greedy_identical"] is True
    assert data["ttft_ratio_cached_vs_uncached"] > 0
    assert data["fleetlm"]["compiled"] is False


def test_bench_prefix_refuses_a_bad_setting():
    fleetlm = FLEETLM
    r = subprocess.run([fleetlm, "bench", "prefix", "--requests", "0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "requests=0: must be >= 1" in r.stderr
