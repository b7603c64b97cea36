"""The fleetlm command line, run as a user would (a subprocess of the installed entry point)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FLEETLM = shutil.which("fleetlm", path=str(Path(sys.executable).parent))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    assert FLEETLM, "the fleetlm entry point is not installed in this environment"
    return subprocess.run([FLEETLM, *args], capture_output=True, text=True, timeout=600)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("generate", "bench"):
        assert cmd in r.stdout


def test_generate_missing_model_is_a_clear_error(tmp_path):
    r = run("generate", "--model", str(tmp_path / "nope"), "hi")
    assert r.returncode == 2
    assert "nope" in r.stderr and "no such file or folder" in r.stderr
    assert "Traceback" not in r.stderr


def test_generate_bad_parameter_names_the_field():
    r = run("generate", "--top-p", "1.5", "hi")
    assert r.returncode == 2
    assert "top_p" in r.stderr and "Traceback" not in r.stderr


def test_bench_rejects_unknown_system():
    r = run("bench", "decode", "--skip", "gpt-5")
    assert r.returncode == 2
    assert "gpt-5" in r.stderr


@pytest.mark.slow
def test_generate_chat_streams_an_answer():
    r = run("generate", "--chat", "--dtype", "float32", "--max-tokens", "24",
            "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "finish=stop" in r.stderr and "decode" in r.stderr
