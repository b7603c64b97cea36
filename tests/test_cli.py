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


@pytest.mark.slow
def test_bench_decode_writes_json_with_ratios(tmp_path):
    out = tmp_path / "decode.json"
    r = run("bench", "decode", "--no-compile", "--prompt-lengths", "8", "--new-tokens", "6",
            "--repeats", "1", "--skip", "fleetlm-float32,fleetlm-bfloat16,transformers-bfloat16,llama.cpp",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    import json

    data = json.loads(out.read_text())
    systems = {m["system"]: m for m in data["results"]}
    assert set(systems) == {"fleetlm-int8", "transformers-float32"}
    for m in systems.values():
        assert m["prompt_tokens"] == 8 and m["decode_tok_s"] > 0 and m["ttft_ms"] > 0
        assert len(m["runs"]) == 1
    ratio = data["ratios"]["prompt_8"]
    expected = systems["fleetlm-int8"]["decode_tok_s"] / systems["transformers-float32"]["decode_tok_s"]
    assert ratio["decode_vs_transformers-float32"] == round(expected, 2)
    assert data["quality"]["fleetlm-int8"]["perplexity"] > 1
    assert "decode tok/s" in r.stdout  # the table
