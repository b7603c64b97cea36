"""``fleetlm bench serve``: what the HTTP server costs on top of the in-process engine.

The same workload as ``bench adapters`` (prompts of ``prompt_tokens`` tokens,
``max_new_tokens`` greedy tokens with end-of-sequence ignored, a closed loop of
``concurrency`` clients) runs twice: driven in-process on an engine, then through ``fleetlm serve`` started as
its own process (as users run it) on loopback, with an async httpx load generator in this
process (streaming ``/v1/completions`` with the prompt as token ids, so both runs see
identical tokens). Both share the machine's cores with their client, as a real
deployment's clients do not: on a 2-core box the load generator's CPU time is part of
what the server run pays.
Reported for single stream and for ``concurrency`` clients: tokens/s, TTFT and
inter-token latency p50/p99, and the server's throughput loss against the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from fleetlm.bench.common import environment, fleetlm_settings, percentile, write_json
from fleetlm.config import StrictModel
from fleetlm.progress import Progress, Update


class ServeBenchConfig(StrictModel):
    model: str = "smollm2-135m"
    dtype: str = "auto"
    quantize: str = "auto"  # fleetlm serve's defaults, unless asked otherwise
    compile: bool = True
    num_requests: int = 128
    concurrency: list[int] = Field(default_factory=lambda: [1, 32])
    prompt_tokens: int = 64
    max_new_tokens: int = 64
    time_budget_s: float = 300.0  # per configuration; a run stops submitting after it
    llama_cpp: bool = True  # also llama-cpp-python's server on the same GGUF, if installed
    llama_cpp_threads: int = 2
    # llama.cpp's own batching server (the speed anchor): the path of a llama-server binary;
    # None = $FLEETLM_LLAMA_SERVER, else `llama-server` on PATH, else `make llama-server`'s
    # build/llama-server/bin/llama-server; skipped (and said so) when there is none
    llama_server: Path | None = None
    llama_server_slots: int = 32  # --parallel: requests it batches together
    skip_llama_server: bool = False

    def check(self) -> None:
        from fleetlm.errors import ConfigError

        problems = []
        for name in ("num_requests", "prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 1")
        if not self.concurrency or min(self.concurrency) < 1:
            problems.append("--concurrency: positive integers, e.g. 1,32")
        if self.llama_server_slots < 1:
            problems.append(f"--llama-server-slots={self.llama_server_slots}: must be >= 1")
        if self.llama_server is not None and find_llama_server(self.llama_server) != self.llama_server:
            problems.append(f"--llama-server {self.llama_server}: not an executable file; build "
                            "one with `make llama-server` or leave the flag out")
        if self.time_budget_s <= 0:
            problems.append("--time-budget-s: must be > 0")
        if problems:
            raise ConfigError("invalid benchmark settings: " + "; ".join(problems))


def _summary(name: str, stamps: dict[int, list[float]], starts: dict[int, float], wall: float
             ) -> dict[str, Any]:
    done = [i for i, s in stamps.items() if s]
    ttft = [(stamps[i][0] - starts[i]) * 1e3 for i in done]
    itl = [(b - a) * 1e3 for i in done for a, b in zip(stamps[i], stamps[i][1:], strict=False)]
    tokens = sum(len(stamps[i]) for i in done)
    return {"name": name, "requests_completed": len(done), "generated_tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
            "itl_p50_ms": percentile(itl, 50), "itl_p99_ms": percentile(itl, 99)}


async def http_load(url: str, model: str, prompts: list[Any], concurrency: int,
                    max_new_tokens: int, budget_s: float, name: str = "server",
                    extra: dict[str, Any] | None = None,
                    progress: Update | None = None, keepalive: bool = True,
                    models: list[str] | None = None) -> dict[str, Any]:
    """A closed loop of ``concurrency`` streaming /v1/completions clients; ``extra`` joins
    every request body (how each server is told to ignore end-of-sequence); ``progress``
    hears the number of requests completed; ``keepalive=False`` opens a connection per
    request (llama-server's HTTP library closes a kept-alive connection after a few
    requests, and a client reusing it then sees "Server disconnected"); ``models`` gives
    request i the model ``models[i]`` instead of ``model`` (an adapter per request)."""
    import httpx

    stamps: dict[int, list[float]] = {}
    starts: dict[int, float] = {}
    next_i = 0
    completed = 0
    t0 = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_i, completed
        while next_i < len(prompts) and time.perf_counter() - t0 < budget_s:
            i = next_i
            next_i += 1
            body = {"model": models[i] if models else model, "prompt": prompts[i],
                    "max_tokens": max_new_tokens,
                    "temperature": 0, "stream": True, **(extra or {"ignore_eos": True})}
            starts[i] = time.perf_counter()
            stamps[i] = []
            async with http.stream("POST", f"{url}/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(f"stream error: {chunk['error']}")
                    for _ in chunk.get("choices", []):
                        stamps[i].append(time.perf_counter())
            completed += 1
            if progress is not None:
                progress(completed)

    limits = httpx.Limits(max_connections=concurrency,
                          max_keepalive_connections=concurrency if keepalive else 0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    # the last chunk of each stream carries finish_reason and no new token
    for i in stamps:
        if stamps[i]:
            stamps[i] = stamps[i][:max_new_tokens]
    return _summary(f"{name}-{concurrency}", stamps, starts, wall)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_process(cfg: ServeBenchConfig, max_batch: int) -> contextlib.AbstractContextManager[str]:
    """``fleetlm serve`` in its own process, as a user runs it; yields its ``/v1`` URL and
    stops it with SIGTERM (graceful shutdown) afterwards."""
    port = _free_port()
    cmd = [sys.executable, "-m", "fleetlm", "serve", "--model", cfg.model, "--dtype", cfg.dtype,
           "--quantize", cfg.quantize, "--compile" if cfg.compile else "--no-compile",
           "--port", str(port), "--max-batch", str(max_batch),
           "--max-len", str(cfg.prompt_tokens + cfg.max_new_tokens + 1)]
    return http_process(cmd, port, "/health")


LLAMA_SERVER_BUILD = Path("build/llama-server/bin/llama-server")  # where `make llama-server` puts it


def find_llama_server(path: Path | None) -> Path | None:
    """The llama-server binary to run: ``path``, $FLEETLM_LLAMA_SERVER, ``llama-server`` on
    PATH, or the Makefile's build output; None when there is none."""
    for candidate in (path, os.environ.get("FLEETLM_LLAMA_SERVER"), shutil.which("llama-server"),
                      LLAMA_SERVER_BUILD):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def llama_server_process(binary: Path, gguf: Path, ctx_per_slot: int, slots: int,
                         threads: int) -> contextlib.AbstractContextManager[str]:
    """llama.cpp's own server on the same GGUF: ``slots`` requests decoded together
    (continuous batching), ``threads`` threads for decode and for prompt batches."""
    port = _free_port()
    cmd = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(threads), "--threads-batch", str(threads),
           "--parallel", str(slots), "--ctx-size", str(ctx_per_slot * slots),
           "--cont-batching", "--no-webui"]
    return http_process(cmd, port, "/health")


def llama_cpp_process(gguf: Path, ctx: int, threads: int) -> contextlib.AbstractContextManager[str]:
    """llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``) on the
    same GGUF file; it answers one request at a time."""
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(ctx), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--verbose", "False",
           "--interrupt_requests", "False"]  # queue concurrent requests, do not cut streams
    return http_process(cmd, port, "/v1/models")


@contextlib.contextmanager
def http_process(cmd: list[str], port: int, ready_path: str) -> Iterator[str]:
    import httpx

    home = tempfile.mkdtemp(prefix="fleetlm-bench-serve-")
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "FLEETLM_HOME": home})
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}:\n{log.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[2]} did not answer {ready_path} within 300 s")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def _gguf_of(model: str) -> Path | None:
    """The GGUF file a model is loaded from (embedded models ship one), if any."""
    from fleetlm.models.registry import EMBEDDED_MODELS, resolve_embedded

    if model in EMBEDDED_MODELS:
        return resolve_embedded(model)
    path = Path(model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def _llama_server_runs(cfg: ServeBenchConfig, texts: list[str], results: dict[str, Any],
                       console: Any) -> None:
    """llama-server on the same prompts (as text), each concurrency; its runs and settings
    go into ``results``, or why it was skipped."""
    binary = find_llama_server(cfg.llama_server)
    gguf = _gguf_of(cfg.model)
    if cfg.skip_llama_server:
        results["llama_server_skipped"] = "--skip-llama-server"
    elif binary is None or gguf is None:
        results["llama_server_skipped"] = (
            f"{cfg.model} has no GGUF file" if gguf is None else
            "no llama-server binary: build one with `make llama-server`, or give "
            "--llama-server PATH")
    if binary is None or gguf is None or cfg.skip_llama_server:
        console.print(f"  llama-server skipped: {results['llama_server_skipped']}")
        return
    ctx = 2 * (cfg.prompt_tokens + cfg.max_new_tokens)
    results["llama_server"] = {"binary": str(binary), "gguf": gguf.name,
                               "slots": cfg.llama_server_slots,
                               "threads": cfg.llama_cpp_threads, "ctx_per_slot": ctx}
    with llama_server_process(binary, gguf, ctx, cfg.llama_server_slots,
                              cfg.llama_cpp_threads) as url:
        for c in cfg.concurrency:
            n = min(cfg.num_requests, max(c * 4, 8))
            asyncio.run(http_load(url, cfg.model, texts[:c], c, 4, cfg.time_budget_s,
                                  "llama-server", {"ignore_eos": True},
                                  keepalive=False))  # warm
            with Progress("bench serve") as p:
                r = asyncio.run(http_load(
                    url, cfg.model, texts[:n], c, cfg.max_new_tokens, cfg.time_budget_s,
                    "llama-server", {"ignore_eos": True},
                    p.task(f"llama-server, {c} concurrent", n), keepalive=False))
            r.update(concurrency=c, system="llama-server")
            results["runs"].append(r)
            console.print(f"  llama-server, {c:>3} concurrent: {r['tokens_per_s']:7.1f} tok/s")


def run(cfg: ServeBenchConfig, out: Path | None) -> dict[str, Any]:
    import gc

    from rich.console import Console
    from rich.table import Table

    from fleetlm.bench.adapters import run_engine
    from fleetlm.bench.workload import make_prompts
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model

    cfg.check()
    console = Console(stderr=True, width=max(120, Console(stderr=True).width))
    lm = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize)
    prompts = make_prompts(lm.tokenizer, cfg.num_requests, cfg.prompt_tokens, 0)
    engine = Engine(lm, EngineConfig(max_running=max(cfg.concurrency),
                                     max_waiting=cfg.num_requests + max(cfg.concurrency),
                                     max_len=cfg.prompt_tokens + cfg.max_new_tokens + 1,
                                     max_hot_adapters=0, compile=cfg.compile))
    warmup_s = engine.warmup()  # what the server process also does before it answers
    results: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"), "environment": environment(),
        "fleetlm": fleetlm_settings(lm, warmup_s),
        "runs": []}
    console.print(f"  fleetlm: {results['fleetlm']}")
    for c in cfg.concurrency:
        run_engine(engine, prompts[:c], [None] * c, c, 4, f"warm-{c}")
        n = min(cfg.num_requests, max(c * 4, 8))
        with Progress("bench serve") as p:
            r = run_engine(engine, prompts[:n], [None] * n, c, cfg.max_new_tokens,
                           f"engine-{c}", p.task(f"engine, {c} concurrent", n))
        r.update(concurrency=c, system="engine")
        results["runs"].append(r)
        console.print(f"  engine, {c:>3} concurrent: {r['tokens_per_s']:7.1f} tok/s")
    tok, stop_ids = lm.tokenizer, lm.stop_token_ids
    del engine, lm  # the server process loads its own copy
    gc.collect()

    with serve_process(cfg, max(cfg.concurrency)) as url:
        for c in cfg.concurrency:
            n = min(cfg.num_requests, max(c * 4, 8))
            asyncio.run(http_load(url, cfg.model, prompts[:c], c, 4, cfg.time_budget_s))  # warm
            with Progress("bench serve") as p:
                r = asyncio.run(http_load(url, cfg.model, prompts[:n], c, cfg.max_new_tokens,
                                          cfg.time_budget_s,
                                          progress=p.task(f"server, {c} concurrent", n)))
            r.update(concurrency=c, system="server")
            results["runs"].append(r)
            console.print(f"  server, {c:>3} concurrent: {r['tokens_per_s']:7.1f} tok/s")

    _llama_server_runs(cfg, [tok.decode(p) for p in prompts], results, console)

    if cfg.llama_cpp:
        gguf = _gguf_of(cfg.model)
        if gguf is None or any(importlib.util.find_spec(m) is None
                               for m in ("llama_cpp", "sse_starlette", "starlette_context")):
            results["llama_cpp_skipped"] = ("llama-cpp-python[server] is not installed (make "
                                            "install EXTRAS=dev,bench)" if gguf else
                                            f"{cfg.model} has no GGUF file")
            console.print(f"  llama.cpp server skipped: {results['llama_cpp_skipped']}")
        else:
            texts = [tok.decode(p) for p in prompts]
            ban_eos = {"logit_bias": {str(i): -100.0 for i in stop_ids}}
            ctx = 4 * (cfg.prompt_tokens + cfg.max_new_tokens)
            with llama_cpp_process(gguf, ctx, cfg.llama_cpp_threads) as url:
                for c in cfg.concurrency:
                    n = min(cfg.num_requests, max(c * 4, 8))
                    asyncio.run(http_load(url, cfg.model, texts[:1], 1, 4, cfg.time_budget_s,
                                          "llama.cpp", ban_eos))  # warm
                    with Progress("bench serve") as p:
                        r = asyncio.run(http_load(
                            url, cfg.model, texts[:n], c, cfg.max_new_tokens,
                            cfg.time_budget_s, "llama.cpp", ban_eos,
                            p.task(f"llama.cpp server, {c} concurrent", n)))
                    r.update(concurrency=c, system="llama.cpp server")
                    results["runs"].append(r)
                    console.print(f"  llama.cpp server, {c:>3} concurrent: "
                                  f"{r['tokens_per_s']:7.1f} tok/s")

    by = {(r["system"], r["concurrency"]): r for r in results["runs"]}
    results["ratios"] = {
        f"server / engine throughput, {c} concurrent (target >= 0.90 at 32)":
            by[("server", c)]["tokens_per_s"] / by[("engine", c)]["tokens_per_s"]
        for c in cfg.concurrency}
    results["ratios"].update({
        f"server / llama-server throughput, {c} concurrent (targets: >= 1.2 at 1, >= 2 at 32)":
            by[("server", c)]["tokens_per_s"] / by[("llama-server", c)]["tokens_per_s"]
        for c in cfg.concurrency if ("llama-server", c) in by})
    results["ratios"].update({
        f"server / llama.cpp server throughput, {c} concurrent":
            by[("server", c)]["tokens_per_s"] / by[("llama.cpp server", c)]["tokens_per_s"]
        for c in cfg.concurrency if ("llama.cpp server", c) in by})
    t = Table(title="fleetlm bench serve")
    for col in ("system", "concurrent", "requests", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
                "ITL p50 ms", "ITL p99 ms"):
        t.add_column(col, no_wrap=True)

    def f(v: Any, nd: int = 1) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    for r in results["runs"]:
        t.add_row(r["system"], str(r["concurrency"]), str(r["requests_completed"]),
                  f(r["tokens_per_s"]), f(r["ttft_p50_ms"], 0), f(r["ttft_p99_ms"], 0),
                  f(r["itl_p50_ms"]), f(r["itl_p99_ms"]))
    console.print(t)
    for k, v in results["ratios"].items():
        console.print(f"  {k}: {v:.3f}")
    write_json(results, out)
    return results
