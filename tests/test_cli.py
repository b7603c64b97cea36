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
    for cmd in ("generate", "bench", "adapters"):
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
            "--repeats", "1", "--skip", "fleetlm-float32,fleetlm-bfloat16,fleetlm-int4,transformers-bfloat16,llama.cpp",
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


def test_bench_adapters_rejects_bad_settings():
    r = run("bench", "adapters", "--popularities", "pareto", "--concurrency", "0",
            "--max-overtakes", "-1")
    assert r.returncode == 2
    assert "pareto" in r.stderr and "--concurrency" in r.stderr and "Traceback" not in r.stderr
    assert "--max-overtakes=-1" in r.stderr


@pytest.mark.slow
def test_generate_with_an_adapter_from_the_store(tmp_path):
    from fleetlm.adapters.random import make_random_adapter
    from fleetlm.models.loader import load_model

    cfg = load_model("smollm2-135m", dtype="float32", with_tokenizer=False).config
    make_random_adapter(tmp_path / "demo", cfg, rank=8, alpha=16, seed=0, std=0.05)
    args = ("generate", "--dtype", "float32", "--max-tokens", "12", "--adapters-dir", str(tmp_path))
    with_adapter = run(*args, "--adapter", "demo", "The river town")
    plain = run(*args, "The river town")
    assert with_adapter.returncode == 0, with_adapter.stderr
    assert "smollm2-135m:demo" in with_adapter.stderr and "generated 12 tok" in with_adapter.stderr
    assert with_adapter.stdout != plain.stdout  # the adapter changes the answer
    missing = run(*args, "--adapter", "nope", "hi")
    assert missing.returncode == 2 and "'nope'" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_bench_adapters_writes_json_with_every_baseline(tmp_path):
    out = tmp_path / "adapters.json"
    r = run("bench", "adapters", "--num-requests", "6", "--concurrency", "3", "--prompt-tokens", "16",
            "--max-new-tokens", "4", "--adapter-counts", "1,3", "--popularities", "uniform,zipf",
            "--switching-requests", "2", "--mixed-requests", "3", "--continuous-requests", "3",
            "--adapters-dir", str(tmp_path / "adapters"), "--no-compile", "--max-batch", "2",
            "--repeat", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    import json

    data = json.loads(out.read_text())
    assert data["config"]["max_batch"] == 2 and data["config"]["max_overtakes"] == 64
    assert data["fleetlm"]["compiled"] is False and data["fleetlm"]["warmup_s"] == 0.0
    runs = {(e["num_adapters"], e["popularity"]): e for e in data["engine"]}
    assert set(runs) == {(0, None), (1, "uniform"), (1, "zipf"), (3, "uniform"), (3, "zipf")}
    for e in runs.values():
        assert e["requests_completed"] == 6 and e["generated_tokens"] == 24
        assert e["tokens_per_s"] > 0 and e["ttft_p50_ms"] > 0 and e["itl_p99_ms"] > 0
        # a batch of 2 holds at most 2 adapters; the base run none
        assert 0 <= e["distinct_adapters_per_step"] <= min(e["num_adapters"], 2)
        # this run's engine steps only (the engine is shared by every run): 6 requests of
        # 4 tokens, at most 2 at a time, need 12 to 24 decode steps plus their prefills
        assert 12 <= e["steps"] <= 6 * 5, e["steps"]
    assert runs[(3, "uniform")]["distinct_adapters_per_step"] > 0
    assert all(len(e["tokens_per_s_runs"]) == 2 for e in runs.values())  # --repeat 2
    assert {b["system"] for b in data["baselines"]} == {"peft-switching", "peft-mixed", "hf-continuous"}
    for b in data["baselines"]:
        assert b["tokens_per_s"] > 0 and "outputs" not in b
    assert data["resident"]["adapters"] == 3 and data["resident"]["ratio"] > 0
    assert any("PEFT switching" in k for k in data["ratios"])
    assert any("generate_batch" in k for k in data["ratios"])


@pytest.mark.slow
def test_bench_serve_runs_the_real_server_and_writes_json(tmp_path):
    import json

    out = tmp_path / "serve.json"
    # serve's default int8 weights where this CPU has a vector path; compiled decode steps
    # are tested on the engine (tests/engine/test_compiled_decode.py), not rebuilt here
    r = run("bench", "serve", "--dtype", "float32", "--no-compile", "--num-requests", "4",
            "--concurrency", "1,2",
            "--prompt-tokens", "8", "--max-new-tokens", "4", "--skip-llama-cpp",
            "--skip-llama-server", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    runs = {(x["system"], x["concurrency"]): x for x in data["runs"]}
    from fleetlm.kernels import cpu
    from fleetlm.models.loader import resolve_quantize

    quantize = resolve_quantize("auto")
    settings = data["fleetlm"]
    assert {k: settings.pop(k) for k in ("dtype", "quantize", "compiled", "warmup_s")} == {
        "dtype": "float32", "quantize": quantize, "compiled": False, "warmup_s": 0.0}
    # int8 weights: the kernels' paths and the native one-sequence stack are reported
    assert settings.pop("fused_decode") is (quantize == "int8")
    if quantize == "int8":
        assert settings.pop("kernels")["int8_linear"] == cpu.expected_isa()
        assert settings.pop("int8_bf16_dot") is False  # float32 activations never use it
    assert settings == {}
    assert set(runs) == {("engine", 1), ("engine", 2), ("server", 1), ("server", 2)}
    for x in runs.values():
        assert x["requests_completed"] >= 1 and x["tokens_per_s"] > 0
        assert x["generated_tokens"] == 4 * x["requests_completed"]  # every token came back
    assert len(data["ratios"]) == 2 and all(v > 0 for v in data["ratios"].values())
    assert data["llama_server_skipped"] == "--skip-llama-server"


def test_bench_serve_finds_and_checks_the_llama_server_binary(tmp_path, monkeypatch):
    from fleetlm.bench import serve
    from fleetlm.bench.serve import ServeBenchConfig, find_llama_server
    from fleetlm.errors import ConfigError

    monkeypatch.chdir(tmp_path)  # no build/llama-server here
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("FLEETLM_LLAMA_SERVER", raising=False)
    assert find_llama_server(None) is None
    plain = tmp_path / "llama-server.txt"
    plain.write_text("not a program")
    assert find_llama_server(plain) is None  # not executable
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert find_llama_server(binary) == binary
    monkeypatch.setenv("FLEETLM_LLAMA_SERVER", str(binary))
    assert find_llama_server(None) == binary
    monkeypatch.delenv("FLEETLM_LLAMA_SERVER")
    built = tmp_path / serve.LLAMA_SERVER_BUILD
    built.parent.mkdir(parents=True)
    built.write_text("#!/bin/sh\n")
    built.chmod(0o755)
    assert find_llama_server(None) == serve.LLAMA_SERVER_BUILD  # `make llama-server`'s
    with pytest.raises(ConfigError) as e:
        ServeBenchConfig(llama_server=plain, llama_server_slots=0).check()
    assert "--llama-server-slots=0" in str(e.value) and f"--llama-server {plain}" in str(e.value)


def test_adapters_add_list_remove_through_an_object_store_url(tmp_path):
    """--adapters-url (a file:// URL standing in for s3://): add uploads, another machine's
    copies (another --adapters-dir) list it, remove deletes it remotely."""
    from fleetlm.adapters.listing import base_model_config
    from fleetlm.adapters.random import make_random_adapter

    src = make_random_adapter(tmp_path / "src", base_model_config("smollm2-135m"), rank=4)
    url = f"file://{tmp_path / 'bucket'}"
    r = run("adapters", "add", str(src), "--name", "demo", "--adapters-url", url,
            "--adapters-dir", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bucket" / "demo" / "adapter_model.safetensors").is_file()
    r = run("adapters", "list", "--json", "--adapters-url", url,
            "--adapters-dir", str(tmp_path / "b"))
    assert r.returncode == 0 and '"demo"' in r.stdout, r.stderr
    r = run("adapters", "remove", "demo", "--adapters-url", url,
            "--adapters-dir", str(tmp_path / "b"))
    assert r.returncode == 0 and url in r.stdout, r.stderr
    assert not (tmp_path / "bucket" / "demo").exists()


def test_the_console_script_is_main_so_long_commands_get_jemalloc() -> None:
    """`fleetlm` (the installed script) must enter through main(), which restarts tune and
    distill with jemalloc (fleetlm/allocator.py); an entry point at the typer app skipped it."""
    from importlib.metadata import entry_points

    from fleetlm.cli import LONG_RUNNING

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "fleetlm"]
    assert ep.value == "fleetlm.cli:main"
    assert {"tune", "select", "distill"} <= LONG_RUNNING
