"""``fleetlm bench adapters``: many LoRA adapters batched together, against the baselines.

Workload (issue 3): ``num_requests`` requests, ``concurrency`` in flight (a closed loop:
a finished request is replaced by the next one at the following step), prompts of
``prompt_tokens`` tokens, ``max_new_tokens`` greedy tokens with end-of-sequence ignored,
rank-16 adapters on all seven projections, N distinct adapters with uniform or Zipf
popularity. For each N and popularity: tokens/s, TTFT and inter-token latency p50/p99,
peak RSS. Every adapter of a run is loaded warm (in RAM) before timing: the benchmark
measures serving, not the first read from disk (measured separately as ``load_s``).

Baselines in the same run, on the same weights and prompts: the same engine with no
adapters; transformers + PEFT switching adapters per request (``set_adapter``);
transformers + PEFT mixed-adapter batches (``adapter_names=``); transformers' own
continuous batching (``generate_batch``) with no adapters. The PEFT baselines are slow,
so they serve a time-boxed prefix of the same request stream; their rate is over the
requests they completed.

Also: what 256 resident adapters cost in RSS against their tensor bytes.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from fleetlm.bench.common import environment, fleetlm_settings, percentile, write_json
from fleetlm.config import StrictModel
from fleetlm.progress import Progress, Update

POPULARITIES = ("uniform", "zipf")
BASELINES = ("peft-switching", "peft-mixed", "hf-continuous")


class AdaptersBenchConfig(StrictModel):
    model: str = "smollm2-135m"
    dtype: str = "auto"
    quantize: str = "auto"  # fleetlm serve's defaults
    compile: bool = True
    num_requests: int = 256
    concurrency: int = 32
    # the engine's batch (max_running); None: concurrency. Below concurrency a queue forms
    # and the scheduler may group requests by adapter (max_overtakes)
    max_batch: int | None = None
    max_overtakes: int = 64  # EngineConfig.max_overtakes, as fleetlm serve
    # rounds of (no adapters, every adapter setting), interleaved: each setting's figures
    # are its median-throughput run, its ratio the median of the per-round ratios
    repeat: int = 1
    prompt_tokens: int = 64
    max_new_tokens: int = 64
    rank: int = 16
    adapter_counts: list[int] = Field(default_factory=lambda: [1, 8, 64, 256])
    popularities: list[str] = Field(default_factory=lambda: list(POPULARITIES))
    max_hot_adapters: int = 64
    lora_dtype: Literal["auto", "float32", "bfloat16", "int8"] = "auto"  # EngineConfig.lora_dtype
    baseline_budget_s: float = 180.0  # most seconds of generation per transformers baseline
    # The transformers baselines serve the first requests of the same stream (their
    # rates are over what they completed): one-at-a-time switching takes ~4 s a request.
    switching_requests: int = 16
    mixed_requests: int = 64
    continuous_requests: int = 128
    # Each baseline in the dtype it ran fastest in on the development CPU (2 cores):
    # PEFT is slower in bfloat16 (switching 15.8 vs 21.3 tok/s, mixed 36 vs 54), transformers'
    # continuous batching faster (292 vs 133 tok/s).
    peft_dtype: str = "float32"
    continuous_dtype: str = "bfloat16"
    skip: list[str] = Field(default_factory=list)
    adapters_dir: Path | None = None  # where the random adapters are written (cached)
    seed: int = 0

    def check(self) -> None:
        from fleetlm.errors import ConfigError

        problems = []
        for name in ("num_requests", "concurrency", "prompt_tokens", "max_new_tokens", "rank",
                     "max_hot_adapters", "repeat", "switching_requests", "mixed_requests",
                     "continuous_requests"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 1")
        if not self.adapter_counts or min(self.adapter_counts) < 1:
            problems.append("--adapter-counts: positive integers, e.g. 1,8,64,256")
        bad = [p for p in self.popularities if p not in POPULARITIES]
        if bad:
            problems.append(f"--popularities {bad}: choose from {', '.join(POPULARITIES)}")
        bad = [s for s in self.skip if s not in BASELINES]
        if bad:
            problems.append(f"--skip {bad}: choose from {', '.join(BASELINES)}")
        if self.max_batch is not None and self.max_batch < 1:
            problems.append(f"--max-batch={self.max_batch}: must be >= 1")
        if self.max_overtakes < 0:
            problems.append(f"--max-overtakes={self.max_overtakes}: must be >= 0")
        if self.baseline_budget_s <= 0:
            problems.append("--baseline-budget-s: must be > 0")
        for name in ("peft_dtype", "continuous_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                problems.append(f"{name}={getattr(self, name)!r}: float32 or bfloat16")
        if problems:
            raise ConfigError("invalid benchmark settings: " + "; ".join(problems))


def run_engine(engine: Any, prompts: list[list[int]], adapters: list[str | None],
               concurrency: int, max_new_tokens: int, name: str,
               progress: Update | None = None) -> dict[str, Any]:
    """Closed loop through the engine, driven step by step on this thread; ``progress``
    hears the number of requests completed."""
    from fleetlm.bench.rss import PeakRSS
    from fleetlm.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    submitted: dict[str, float] = {}
    stamps: dict[str, list[float]] = {}
    done: list[str] = []

    def on_event(ev: Any) -> None:
        if ev.token_id is not None:
            stamps[ev.request_id].append(time.perf_counter())
        if ev.finish_reason is not None:
            if ev.finish_reason not in ("length", "stop"):
                raise RuntimeError(f"{ev.request_id} ended with {ev.finish_reason}: {ev.error}")
            done.append(ev.request_id)

    next_req = 0
    in_flight = 0
    distinct: list[int] = []  # distinct adapters among the running sequences, per step
    steps0 = engine.steps  # the engine is shared by every run: count this run's steps
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        while next_req < len(prompts) or in_flight:
            while in_flight < concurrency and next_req < len(prompts):
                rid = f"{name}-{next_req}"
                submitted[rid] = time.perf_counter()
                stamps[rid] = []
                engine.submit(prompts[next_req], params, adapter=adapters[next_req],
                              request_id=rid, callback=on_event)
                next_req += 1
                in_flight += 1
            before = len(done)
            engine.step()
            in_flight -= len(done) - before
            distinct.append(len({s.adapter for s in engine.scheduler.running
                                 if s.adapter is not None}))
            if progress is not None and len(done) != before:
                progress(len(done))
        wall = time.perf_counter() - t0
    ttft = [(stamps[r][0] - submitted[r]) * 1e3 for r in done if stamps[r]]
    itl = [(b - a) * 1e3 for r in done for a, b in zip(stamps[r], stamps[r][1:], strict=False)]
    generated = sum(len(stamps[r]) for r in done)
    return {
        "name": name,
        "requests_completed": len(done),
        "generated_tokens": generated,
        "wall_s": wall,
        "tokens_per_s": generated / wall,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50), "itl_p99_ms": percentile(itl, 99),
        "peak_rss_mb": rss.peak_bytes / 2**20,
        "steps": engine.steps - steps0,
        "distinct_adapters_per_step": sum(distinct) / max(len(distinct), 1),
    }


def run(cfg: AdaptersBenchConfig, out: Path | None) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from fleetlm.adapters import AdapterStore
    from fleetlm.bench import hf_baselines
    from fleetlm.bench.workload import assign_adapters, make_adapter_set, make_prompts
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.gguf_convert import cache_root
    from fleetlm.models.loader import load_model

    cfg.check()
    console = Console(stderr=True, width=max(140, Console(stderr=True).width))
    lm = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize)
    prompts = make_prompts(lm.tokenizer, cfg.num_requests, cfg.prompt_tokens, cfg.seed)
    n_max = max(cfg.adapter_counts)
    root = cfg.adapters_dir or cache_root().parent / "bench-adapters" / f"{lm.name}-r{cfg.rank}"
    console.print(f"[bold]adapters[/] writing/reusing {n_max} random rank-{cfg.rank} adapters in {root}")
    t = time.perf_counter()
    dirs = make_adapter_set(root, lm.config, n_max, rank=cfg.rank, seed=cfg.seed)
    console.print(f"  ready in {time.perf_counter() - t:.1f} s")
    names = [d.name for d in dirs]

    # resident cost, measured in a fresh process (this one's heap already holds freed
    # memory that new tensors would reuse, which would flatter the ratio)
    resident = _resident_in_subprocess(lm.folder, root, names, cfg.rank, str(lm.model.dtype))
    console.print(f"  {len(names)} adapters warm: {resident['tensor_bytes'] / 2**20:.0f} MiB of "
                  f"tensors, RSS +{resident['rss_growth_bytes'] / 2**20:.0f} MiB "
                  f"({resident['ratio']:.2f}x), loaded in {resident['load_s']:.1f} s")
    store = AdapterStore(root, lm.config, dtype=lm.model.dtype, max_rank=cfg.rank,
                         warm_budget_bytes=1 << 40)
    for n in names:  # every adapter warm before timing: serving, not first reads from disk
        store.get(n)

    engine = Engine(lm, EngineConfig(
        max_running=cfg.max_batch or cfg.concurrency,
        max_waiting=cfg.num_requests + cfg.concurrency, max_overtakes=cfg.max_overtakes,
        max_len=cfg.prompt_tokens + cfg.max_new_tokens + 1,
        max_hot_adapters=cfg.max_hot_adapters, max_lora_rank=cfg.rank, compile=cfg.compile,
        lora_dtype=cfg.lora_dtype),
        store=store)
    warmup_s = engine.warmup()
    console.print(f"  engine: {str(lm.dtype).removeprefix('torch.')}, weights {lm.quantize}, "
                  f"compiled {lm.model.decode_compiled} (warm-up {warmup_s:.1f} s)")
    results: dict[str, Any] = {"config": {**cfg.model_dump(), "adapters_dir": str(root)},
                               "environment": environment(), "resident": resident,
                               "fleetlm": fleetlm_settings(lm, warmup_s),
                               "hot_buffer_bytes": engine.runner.lora.nbytes() if engine.runner.lora else 0,
                               "engine": [], "baselines": []}

    def engine_run(label: str, assignment: list[int | None]) -> dict[str, Any]:
        adapters = [None if a is None else names[a] for a in assignment]
        # warm-up: one short pass so one-off costs (allocations, first loads) are not timed
        run_engine(engine, prompts[: cfg.concurrency], adapters[: cfg.concurrency],
                   cfg.concurrency, 4, f"warm-{label}")
        with Progress("bench adapters") as p:
            r = run_engine(engine, prompts, adapters, cfg.concurrency, cfg.max_new_tokens,
                           label, p.task(f"{label} requests", len(prompts)))
        console.print(f"  {label:>24}: {r['tokens_per_s']:8.1f} tok/s  TTFT p50 "
                      f"{r['ttft_p50_ms']:.0f} ms  ITL p50 {r['itl_p50_ms']:.1f} ms  "
                      f"{r['distinct_adapters_per_step']:.1f} adapters per step")
        return r

    console.print("[bold]fleetlm engine[/]")
    settings = [(count, pop) for count in cfg.adapter_counts for pop in cfg.popularities]
    rounds: list[dict[Any, dict[str, Any]]] = []
    for k in range(cfg.repeat):
        if cfg.repeat > 1:
            console.print(f"  round {k + 1} of {cfg.repeat}")
        runs: dict[Any, dict[str, Any]] = {None: engine_run("no-adapters", [None] * cfg.num_requests)}
        for count, pop in settings:
            assignment = assign_adapters(cfg.num_requests, count, pop, cfg.seed)
            runs[count, pop] = engine_run(f"{count}-{pop}", assignment)
            runs[count, pop]["distinct_used"] = len({a for a in assignment if a is not None})
        rounds.append(runs)
    results["engine"] = _median_runs(rounds, settings)
    engine.shutdown()
    folder = lm.folder
    peft_dtype = getattr(torch, cfg.peft_dtype)
    cont_dtype = getattr(torch, cfg.continuous_dtype)
    gc.collect()
    torch.manual_seed(cfg.seed)
    mix_n = 64 if 64 in cfg.adapter_counts else n_max
    mix = assign_adapters(cfg.num_requests, mix_n, "uniform", cfg.seed)
    mix_dirs = [dirs[a] for a in sorted({a for a in mix if a is not None})]
    if "peft-switching" not in cfg.skip:
        console.print("[bold]transformers + PEFT, set_adapter per request[/]")
        k = cfg.switching_requests
        r = hf_baselines.peft_switching(folder, mix_dirs, prompts[:k], _names(mix, dirs)[:k],
                                        cfg.max_new_tokens, dtype=peft_dtype,
                                        time_budget_s=cfg.baseline_budget_s)
        results["baselines"].append({**r, "system": "peft-switching", "num_adapters": mix_n,
                                     "popularity": "uniform"})
    if "peft-mixed" not in cfg.skip:
        console.print("[bold]transformers + PEFT, mixed-adapter batches[/]")
        k = cfg.mixed_requests
        r = hf_baselines.peft_mixed_batches(folder, mix_dirs, prompts[:k], _names(mix, dirs)[:k],
                                            cfg.concurrency, cfg.max_new_tokens, dtype=peft_dtype,
                                            time_budget_s=cfg.baseline_budget_s)
        results["baselines"].append({**r, "system": "peft-mixed", "num_adapters": mix_n,
                                     "popularity": "uniform"})
    if "hf-continuous" not in cfg.skip:
        console.print("[bold]transformers continuous batching, no adapters[/]")
        r = hf_baselines.hf_continuous_batching(folder, prompts[: cfg.continuous_requests],
                                                cfg.concurrency,
                                                cfg.max_new_tokens, dtype=cont_dtype,
                                                time_budget_s=cfg.baseline_budget_s)
        results["baselines"].append({**r, "system": "hf-continuous", "num_adapters": 0,
                                     "popularity": None})
    for r in results["baselines"]:
        r.pop("outputs", None)  # token ids per request: large, and only the tests need them
    results["ratios"] = _ratios(results, mix_n)
    _print_table(results, console)
    write_json(results, out)
    return results


def _median_runs(rounds: list[dict[Any, dict[str, Any]]],
                 settings: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """Per setting (None: no adapters), its median-throughput run of the rounds, with every
    round's tokens/s; ``vs_no_adapters`` is the median over rounds of the setting's rate
    over the no-adapter rate of the same round (the machine's speed drifts between
    rounds more than between neighbouring runs)."""
    out = []
    for key in [None, *settings]:
        runs = sorted((r[key] for r in rounds), key=lambda r: r["tokens_per_s"])
        best = dict(runs[(len(runs) - 1) // 2])
        best["tokens_per_s_runs"] = [r[key]["tokens_per_s"] for r in rounds]
        if key is None:
            best.update(num_adapters=0, popularity=None)
        else:
            ratios = sorted(r[key]["tokens_per_s"] / r[None]["tokens_per_s"] for r in rounds)
            best.update(num_adapters=key[0], popularity=key[1],
                        vs_no_adapters=ratios[(len(ratios) - 1) // 2],
                        vs_no_adapters_runs=[r[key]["tokens_per_s"] / r[None]["tokens_per_s"]
                                             for r in rounds])
        out.append(best)
    return out


def _resident_worker(folder: str, root: str, names: list[str], rank: int, dtype: str) -> dict:
    import torch

    from fleetlm.adapters import AdapterStore
    from fleetlm.bench.rss import rss_bytes
    from fleetlm.models.loader import read_config

    config = read_config(Path(folder))
    store = AdapterStore(Path(root), config, dtype=getattr(torch, dtype.removeprefix("torch.")),
                         max_rank=rank, warm_budget_bytes=1 << 40)
    store.validate(names[0])  # imports and first-use setup before the baseline reading
    before = rss_bytes()
    t = time.perf_counter()
    tensor_bytes = sum(store.get(n).nbytes for n in names)
    load_s = time.perf_counter() - t
    growth = rss_bytes() - before
    return {"adapters": len(names), "tensor_bytes": tensor_bytes, "rss_growth_bytes": growth,
            "ratio": growth / tensor_bytes, "load_s": load_s,
            "how": "fresh process: RSS after loading every adapter warm minus RSS before"}


def _resident_in_subprocess(folder: Path, root: Path, names: list[str], rank: int,
                            dtype: str) -> dict:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_resident_worker, (str(folder), str(root), names, rank, dtype))


def _names(assignment: list[int | None], dirs: list[Path]) -> list[int | str | None]:
    return [None if a is None else dirs[a].name for a in assignment]


def _ratios(results: dict[str, Any], mix_n: int) -> dict[str, Any]:
    eng = {(r["num_adapters"], r["popularity"]): r["tokens_per_s"] for r in results["engine"]}
    base = eng[(0, None)]
    bl = {r["system"]: r for r in results["baselines"]}
    ratios: dict[str, Any] = {}
    for r in results["engine"]:
        if r["num_adapters"]:  # the median of the per-round ratios (one round: the ratio)
            ratios[f"{r['num_adapters']}-{r['popularity']} / no-adapters (target >= 0.85 "
                   "at 64)"] = r["vs_no_adapters"]
    ours_mix = eng.get((mix_n, "uniform"))
    for key, label in (("peft-switching", "PEFT switching (target >= 20)"),
                       ("peft-mixed", "PEFT mixed batches")):
        if key in bl and bl[key].get("tokens_per_s") and ours_mix:
            ratios[f"{mix_n}-uniform / {label}"] = ours_mix / bl[key]["tokens_per_s"]
    if "hf-continuous" in bl and bl["hf-continuous"].get("tokens_per_s"):
        ratios["no-adapters / transformers generate_batch (target >= 2)"] = (
            base / bl["hf-continuous"]["tokens_per_s"])
    ratios["resident RSS / tensor bytes, all adapters (target <= 1.3)"] = results["resident"]["ratio"]
    return ratios


def _print_table(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title="fleetlm bench adapters")
    for col in ("system", "adapters", "popularity", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
                "ITL p50 ms", "ITL p99 ms", "adapters per step", "peak RSS MiB", "requests"):
        t.add_column(col, no_wrap=True)

    def f(v: Any, nd: int = 1) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    for r in results["engine"] + results["baselines"]:
        system = "fleetlm" if r in results["engine"] else r["system"]
        t.add_row(system, str(r.get("num_adapters", "")), str(r.get("popularity") or "-"),
                  f(r.get("tokens_per_s")), f(r.get("ttft_p50_ms"), 0), f(r.get("ttft_p99_ms"), 0),
                  f(r.get("itl_p50_ms")), f(r.get("itl_p99_ms")),
                  f(r.get("distinct_adapters_per_step")), f(r.get("peak_rss_mb"), 0),
                  str(r.get("requests_completed", "")))
    console.print(t)
    r = Table(title="ratios")
    r.add_column("ratio")
    r.add_column("value")
    for k, v in results["ratios"].items():
        r.add_row(k, f"{v:.2f}")
    console.print(r)
