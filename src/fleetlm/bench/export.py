"""``fleetlm bench export``: what `fleetlm export` writes, and whether llama.cpp agrees.

1. export: the model with an adapter merged (a random rank-``rank`` adapter on every
   projection unless ``adapter`` names one) as the Hugging Face folder and each GGUF type;
   file sizes and the time taken;
2. greedy parity: for each GGUF type, llama.cpp's own server (``llama-server``) and
   fleetlm on the merged folder (float32, unquantised: the reference) continue the same
   prompts (token ids) greedily; prompts whose tokens all match, and the mean length of the
   common prefix;
3. speed: single-stream and ``concurrency``-stream decode over HTTP, llama-server on the
   q8_0 file against ``fleetlm serve`` on the merged folder with its defaults (the same
   closed-loop client as ``bench serve``).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field

from fleetlm.bench.common import environment, write_json
from fleetlm.config import StrictModel


class ExportBenchConfig(StrictModel):
    model: str = "smollm2-135m"
    adapter: str | None = None  # None: a random adapter of rank ``rank``
    rank: int = Field(16, ge=1)
    gguf: list[str] = Field(default_factory=lambda: ["f32", "f16", "q8_0", "q4_0"])
    prompts: int = Field(8, ge=1)  # greedy parity prompts
    prompt_tokens: int = Field(32, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    concurrency: int = Field(8, ge=1)  # the speed phase's second measurement
    num_requests: int = Field(32, ge=1)
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    llama_server: Path | None = None


def _greedy_reference(folder: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """fleetlm's greedy continuation on the merged folder, float32 and unquantised."""
    from fleetlm.engine.generate import Generator
    from fleetlm.engine.sampling_params import SamplingParams
    from fleetlm.models.loader import load_model

    lm = load_model(str(folder), dtype="float32", quantize="none")
    gen = Generator(lm, max_len=max(len(p) for p in prompts) + n + 1)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [gen.generate(p, params).token_ids for p in prompts]


def _llama_greedy(url: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    import httpx

    out = []
    for p in prompts:
        r = httpx.post(url.removesuffix("/v1") + "/completion", timeout=300, json={
            "prompt": p, "n_predict": n, "temperature": 0, "top_k": 1, "ignore_eos": True,
            "return_tokens": True, "cache_prompt": False})
        r.raise_for_status()
        out.append(list(r.json()["tokens"]))
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _speed(url: str, cfg: ExportBenchConfig, prompts: list[list[int]], name: str,
           extra: dict[str, Any], keepalive: bool) -> dict[str, Any]:
    from fleetlm.bench.serve import http_load

    runs = {}
    for c in (1, cfg.concurrency):
        n = cfg.num_requests if c > 1 else max(4, cfg.num_requests // 4)
        asyncio.run(http_load(url, name, prompts[:c], c, 4, 300, name, extra,
                              keepalive=keepalive))  # warm
        r = asyncio.run(http_load(url, name, (prompts * (1 + n // len(prompts)))[:n], c,
                                  cfg.max_new_tokens, 600, name, extra, keepalive=keepalive))
        runs[str(c)] = {k: r[k] for k in ("tokens_per_s", "ttft_p50_ms", "itl_p50_ms")
                        if k in r}
    return runs


def run(cfg: ExportBenchConfig, out: Path | None) -> dict[str, Any]:
    from rich.console import Console

    from fleetlm.adapters.listing import base_model_config
    from fleetlm.adapters.random import make_random_adapter
    from fleetlm.bench.harness import free_port
    from fleetlm.bench.serve import find_llama_server, http_process, llama_server_process
    from fleetlm.bench.workload import make_prompts
    from fleetlm.compress.export import ExportSettings, export
    from fleetlm.models.loader import load_model

    console = Console(stderr=True)
    say = console.print
    env = environment()
    say(f"bench export on {env.get('cpu')} ({env.get('cpu_count')} CPUs)")
    work = Path(tempfile.mkdtemp(prefix="fleetlm-bench-export-"))
    adapter = cfg.adapter
    if adapter is None:
        adapter = str(make_random_adapter(work / "random-adapter", base_model_config(cfg.model),
                                          rank=cfg.rank, alpha=2 * cfg.rank, std=0.02))
    done = export(ExportSettings(model=cfg.model, adapter=adapter, out=work / "out",
                                 gguf=cfg.gguf, name="merged"), say=say)
    results: dict[str, Any] = {"benchmark": "export", "config": cfg.model_dump(mode="json"),
                               "environment": env, "export_seconds": done.seconds,
                               "files": {f["kind"]: f["bytes"] for f in done.files}}
    hf = work / "out" / "hf"
    tok = load_model(str(hf), dtype="float32", quantize="none").tokenizer
    prompts = make_prompts(tok, max(cfg.prompts, cfg.concurrency), cfg.prompt_tokens, 0)
    want = _greedy_reference(hf, prompts[:cfg.prompts], cfg.max_new_tokens)
    binary = find_llama_server(cfg.llama_server)
    if binary is None:
        results["llama_server_skipped"] = ("no llama-server binary: build one with `make "
                                           "llama-server`, or give --llama-server PATH")
        say(f"  llama.cpp skipped: {results['llama_server_skipped']}")
        write_json(results, out)
        return results
    ctx = cfg.prompt_tokens + cfg.max_new_tokens + 8
    parity = {}
    for qtype in cfg.gguf:
        gguf = work / "out" / f"merged-{qtype}.gguf"
        with llama_server_process(binary, gguf, ctx, cfg.concurrency, cfg.threads) as url:
            got = _llama_greedy(url, prompts[:cfg.prompts], cfg.max_new_tokens)
            if qtype == "q8_0":
                results["llama_server_q8_0"] = _speed(url, cfg, prompts, "llama-server",
                                                      {"ignore_eos": True}, keepalive=False)
        prefix = [_common_prefix(a, b) for a, b in zip(got, want, strict=True)]
        parity[qtype] = {"identical_prompts": sum(p == cfg.max_new_tokens for p in prefix),
                         "prompts": len(prefix),
                         "mean_common_prefix": sum(prefix) / len(prefix)}
        say(f"  {qtype:>5}: {parity[qtype]['identical_prompts']}/{len(prefix)} prompts "
            f"identical over {cfg.max_new_tokens} greedy tokens (mean common prefix "
            f"{parity[qtype]['mean_common_prefix']:.1f})")
    results["greedy_parity"] = parity
    import sys

    port = free_port()
    cmd = [sys.executable, "-m", "fleetlm", "serve", "--model", str(hf), "--port", str(port),
           "--max-batch", str(cfg.concurrency), "--max-len", str(ctx)]
    with http_process(cmd, port, "/health") as url:
        import httpx

        served = httpx.get(f"{url}/models", timeout=30).json()["data"][0]["id"]
        results["fleetlm_serve"] = _speed(url, cfg, prompts, served, {"ignore_eos": True},
                                          keepalive=True)
    for c in ("1", str(cfg.concurrency)):
        ours = results["fleetlm_serve"][c]["tokens_per_s"]
        theirs = results["llama_server_q8_0"][c]["tokens_per_s"]
        say(f"  {c:>2} stream(s): fleetlm serve {ours:7.1f} tok/s, llama-server q8_0 "
            f"{theirs:7.1f} tok/s ({ours / theirs:.2f}x)")
    write_json(results, out)
    return results
