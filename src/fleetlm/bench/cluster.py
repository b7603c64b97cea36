"""``fleetlm bench cluster``: what serving through Ray Serve costs and what it buys.

Every system is started as a user starts it (``fleetlm serve`` / ``fleetlm serve --ray``,
its own process, a local Ray cluster each time) and driven over HTTP by the same
closed-loop streaming client as ``bench serve`` (prompts as token ids, greedy, end of
sequence ignored). Four measurements, in one run:

1. overhead: the base model at ``concurrency`` streams, ``fleetlm serve`` against
   ``fleetlm serve --ray`` with one engine replica holding all the machine's threads, one
   token per message from replica to ingress and ``stream_interval`` tokens (target: the Ray
   path loses <= 10% of the throughput);
2. adapter affinity: ``adapters`` distinct adapters (uniform), ``replicas`` engine replicas
   whose hot sets hold ``hot_per_replica`` each, with Serve's multiplexed routing and
   without it (``--no-adapter-affinity``): throughput, and the share of requests whose
   adapter was already loaded on the replica that took them (the ingress's counts);
3. cold start: the engine deployment scaled to zero, then one request: seconds to its
   first token;
4. scale-up: from one replica, a step to ``concurrency`` streams held for ``step_s``;
   seconds until the second replica runs (Ray Serve's own status).

On 2 cores the point is overhead and correctness, not scale: two one-thread replicas
share the cores the single process has to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from fleetlm.bench.common import environment, write_json
from fleetlm.bench.serve import http_load, http_process
from fleetlm.config import StrictModel
from fleetlm.progress import Progress


class ClusterBenchConfig(StrictModel):
    model: str = "smollm2-135m"
    dtype: str = "auto"
    quantize: str = "auto"
    compile: bool = True
    concurrency: int = Field(32, ge=1)
    num_requests: int = Field(96, ge=1)  # per throughput measurement
    prompt_tokens: int = Field(64, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    adapters: int = Field(64, ge=1)
    adapter_requests: int = Field(192, ge=1)
    hot_per_replica: int = Field(16, ge=1)
    replicas: int = Field(2, ge=1)
    stream_interval: int = Field(4, ge=1, le=64)  # the overhead phase's second Ray run
    rounds: int = Field(1, ge=1)  # alternations of the overhead phase's systems
    rank: int = Field(16, ge=1)
    time_budget_s: float = Field(300.0, gt=0)  # per measurement
    step_s: float = Field(90.0, gt=0)  # how long the scale-up phase's step in load lasts
    zero_timeout_s: float = Field(180.0, gt=0)  # waiting for the deployment to reach zero
    skip: list[str] = Field(default_factory=list)  # of overhead, affinity, cold-start, scale-up

    def phases(self) -> list[str]:
        from fleetlm.errors import ConfigError

        every = ["overhead", "affinity", "cold-start", "scale-up"]
        bad = [p for p in self.skip if p not in every]
        if bad:
            raise ConfigError(f"skip: {', '.join(bad)} is not a phase; choose from "
                              f"{', '.join(every)}", param="skip")
        return [p for p in every if p not in self.skip]


def _serve_cmd(cfg: ClusterBenchConfig, port: int, max_batch: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fleetlm", "serve", "--model", cfg.model,
            "--dtype", cfg.dtype, "--quantize", cfg.quantize,
            "--compile" if cfg.compile else "--no-compile", "--port", str(port),
            "--max-batch", str(max_batch),
            "--max-len", str(cfg.prompt_tokens + cfg.max_new_tokens + 1), *extra]


@contextlib.contextmanager
def _joined() -> Iterator[None]:
    """This process joined to the local cluster the server started (to read its status)."""
    import ray

    ray.init(address="auto", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _health(url: str) -> dict[str, Any]:
    import httpx

    return dict(httpx.get(url.removesuffix("/v1") + "/health", timeout=30).json())


def _load(url: str, cfg: ClusterBenchConfig, prompts: list[list[int]], n: int,
          label: str, models: list[str] | None = None) -> dict[str, Any]:
    c = cfg.concurrency
    asyncio.run(http_load(url, cfg.model, prompts[:c], c, 2, cfg.time_budget_s,
                          models=models[:c] if models else None))  # warm
    with Progress("bench cluster") as p:
        return asyncio.run(http_load(url, cfg.model, prompts[:n], c, cfg.max_new_tokens,
                                     cfg.time_budget_s, models=models[:n] if models else None,
                                     progress=p.task(label, n)))


def overhead(cfg: ClusterBenchConfig, prompts: list[list[int]], say: Any) -> dict[str, Any]:
    """The single process against one Ray replica holding all the machine's threads, with
    one token per message between replica and ingress and with ``stream_interval``;
    ``rounds`` alternations (the machine's noise moves all systems alike), medians."""
    import statistics

    from fleetlm.bench.harness import free_port

    threads = os.cpu_count() or 1
    ray = ("--ray", "--replica-threads", str(threads))
    systems = {"single-process": (), "ray-1-replica": (*ray, "--stream-interval", "1")}
    if cfg.stream_interval > 1:
        systems[f"ray-1-replica-interval-{cfg.stream_interval}"] = (
            *ray, "--stream-interval", str(cfg.stream_interval))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    for i in range(cfg.rounds):
        for system, extra in systems.items():
            port = free_port()
            cmd = _serve_cmd(cfg, port, cfg.concurrency, *extra)
            with http_process(cmd, port, "/health") as url:
                r = _load(url, cfg, prompts, cfg.num_requests,
                          f"{system}, {cfg.concurrency} streams, round {i + 1}/{cfg.rounds}")
            runs[system].append(r)
            say(f"  {system:>28}: {r['tokens_per_s']:7.1f} tok/s at {cfg.concurrency} "
                f"streams (round {i + 1})")
    median = {s: statistics.median(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
    ratios = {s: median[s] / median["single-process"] for s in systems if s.startswith("ray")}
    for s, ratio in ratios.items():
        say(f"  {s} / single process: {ratio:.2f}x (medians of {cfg.rounds})")
    return {"runs": runs, "median_tokens_per_s": median, "ray_over_single": ratios,
            "target_min_ratio": 0.9, "met": {s: r >= 0.9 for s, r in ratios.items()}}


def affinity(cfg: ClusterBenchConfig, prompts: list[list[int]], adapters_dir: Path,
             names: list[str], say: Any) -> dict[str, Any]:
    import random

    from fleetlm.bench.harness import free_port

    rng = random.Random(0)
    models = [names[i % len(names)] for i in range(cfg.adapter_requests)]
    rng.shuffle(models)
    out = {}
    for label, flag in (("affine", "--adapter-affinity"), ("random", "--no-adapter-affinity")):
        port = free_port()
        cmd = _serve_cmd(cfg, port, cfg.concurrency, "--ray", "--adapters-dir", str(adapters_dir),
                         "--max-hot-adapters", str(cfg.hot_per_replica),
                         "--max-lora-rank", str(cfg.rank), "--min-replicas", str(cfg.replicas),
                         "--max-replicas", str(cfg.replicas), "--replica-threads", "1", flag)
        with http_process(cmd, port, "/health") as url:
            before = _health(url)
            r = _load(url, cfg, prompts, cfg.adapter_requests,
                      f"{label} routing, {cfg.adapters} adapters", models)
            after = _health(url)
        asked = after["adapter_requests"] - before["adapter_requests"]
        hot = after["adapter_hot_hits"] - before["adapter_hot_hits"]
        r.update(adapter_requests=asked, adapter_hot_hits=hot,
                 hot_hit_rate=hot / asked if asked else None,
                 requests_per_replica=after["replicas"])
        out[label] = r
        say(f"  {label:>7} routing: {r['tokens_per_s']:7.1f} tok/s, adapter already hot for "
            f"{hot}/{asked} requests")
    return out


def cold_start_and_scale_up(cfg: ClusterBenchConfig, prompts: list[list[int]],
                            phases: list[str], say: Any) -> dict[str, Any]:
    """One deployment (0..2 replicas, scaling on 4 requests in flight each): wait for zero,
    time one request's first token, then step to ``concurrency`` streams and time the
    second replica's start."""
    import httpx

    from fleetlm.bench.harness import free_port
    from fleetlm.cluster.deploy import replica_count
    from fleetlm.cluster.settings import ClusterSettings

    port = free_port()
    threads = max(1, (os.cpu_count() or 2) // 2)
    cmd = _serve_cmd(cfg, port, cfg.concurrency, "--ray", "--min-replicas", "0",
                     "--max-replicas", "2", "--replica-threads", str(threads),
                     "--target-ongoing-requests", "4", "--downscale-delay-s", "5",
                     "--downscale-to-zero-delay-s", "5")
    result: dict[str, Any] = {}
    cluster = ClusterSettings()
    with http_process(cmd, port, "/health") as url, _joined():
        t0 = time.perf_counter()
        while replica_count(cluster) > 0:
            if time.perf_counter() - t0 > cfg.zero_timeout_s:
                raise RuntimeError(f"the engine deployment did not scale to zero in "
                                   f"{cfg.zero_timeout_s:.0f} s")
            time.sleep(0.5)
        result["seconds_to_zero"] = time.perf_counter() - t0
        # the first request after zero: timed for the cold start, and what brings the
        # replica the scale-up step starts from
        body = {"model": cfg.model, "prompt": prompts[0], "max_tokens": 4,
                "temperature": 0, "stream": True}
        t0 = time.perf_counter()
        first = None
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and first is None:
                    first = time.perf_counter() - t0
        if "cold-start" in phases:
            result["cold_start_ttft_s"] = first
            say(f"  cold start from zero replicas: first token after {first:.1f} s")
        if "scale-up" in phases:
            while replica_count(cluster) < 1:
                time.sleep(0.2)
            load = asyncio.run(_step_and_watch(url, cfg, prompts, cluster))
            result["scale_up_s"] = load.pop("scale_up_s")
            result["step_load"] = load
            up = result["scale_up_s"]
            say(f"  scale-up under a step to {cfg.concurrency} streams: " + (
                f"second replica running after {up:.1f} s" if up is not None
                else "no second replica started while the step lasted"))
    return result


async def _step_and_watch(url: str, cfg: ClusterBenchConfig,
                          prompts: list[list[int]], cluster: Any) -> dict[str, Any]:
    from fleetlm.cluster.deploy import replica_count

    t0 = time.perf_counter()
    # the step lasts step_s whatever the throughput (the prompts repeat): Serve's autoscaler
    # reacts within tens of seconds, and a step that ends first measures nothing
    many = prompts[:cfg.num_requests] * (1 + int(cfg.step_s))
    task = asyncio.ensure_future(http_load(url, cfg.model, many, cfg.concurrency,
                                           cfg.max_new_tokens, cfg.step_s))
    scale_up: float | None = None
    while not task.done():
        if scale_up is None and await asyncio.to_thread(replica_count, cluster) >= 2:
            scale_up = time.perf_counter() - t0
        await asyncio.sleep(0.5)
    out = dict(task.result())
    out["scale_up_s"] = scale_up
    return out


def run(cfg: ClusterBenchConfig, out: Path | None) -> dict[str, Any]:
    import gc

    from rich.console import Console

    from fleetlm.bench.workload import adapter_name, make_adapter_set, make_prompts
    from fleetlm.models.gguf_convert import cache_root
    from fleetlm.models.loader import load_model

    phases = cfg.phases()
    console = Console(stderr=True)
    say = console.print
    lm = load_model(cfg.model, dtype="float32", quantize="none")
    prompts = make_prompts(lm.tokenizer, max(cfg.num_requests, cfg.adapter_requests),
                           cfg.prompt_tokens, 0)
    adapters_dir = cache_root().parent / "bench-adapters" / f"{lm.name}-r{cfg.rank}"
    names: list[str] = []
    if "affinity" in phases:
        make_adapter_set(adapters_dir, lm.config, cfg.adapters, rank=cfg.rank)
        names = [adapter_name(i) for i in range(cfg.adapters)]
    del lm
    gc.collect()
    env = environment()
    say(f"bench cluster on {env.get('cpu')} ({env.get('cpu_count')} CPUs): {', '.join(phases)}")
    results: dict[str, Any] = {"benchmark": "cluster", "config": cfg.model_dump(mode="json"),
                               "environment": env}
    if "overhead" in phases:
        results["overhead"] = overhead(cfg, prompts, say)
    if "affinity" in phases:
        results["affinity"] = affinity(cfg, prompts, adapters_dir, names, say)
    if "cold-start" in phases or "scale-up" in phases:
        results["autoscaling"] = cold_start_and_scale_up(cfg, prompts, phases, say)
    write_json(results, out)
    return results
