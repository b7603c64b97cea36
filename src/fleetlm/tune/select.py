"""``fleetlm select``: one task, several candidate bases, each tuned with the same budget
and evaluated the same way, then served as ``fleetlm serve`` would serve it; quality,
latency per request, memory and cost per 1M requests side by side, and a recommendation
that says why (001 §V.D).

Each candidate runs the whole tune pipeline (:class:`~fleetlm.tune.pipeline.Pipeline`)
with only ``base_model`` changed (same data, split, seed, training budget and evaluation),
its adapter published into the selection's own folder (never the user's store). Serving
is then measured on the candidate's validation prompts with the serving defaults (dtype
and weight format ``auto``, compiled decode): latency one request at a time, throughput
with ``concurrency`` requests in flight. Cost per 1M requests is ``cost_per_hour`` over the
requests an hour at that throughput; memory is what serving holds (the model's tensors,
the KV cache for ``concurrency`` sequences, the adapter slot). Everything a candidate
measured is written as soon as it is known (``select.json``), so an interrupted selection
keeps its finished candidates, and the tune stages of a candidate are cached (a rerun
skips finished training).

This module knows the tune pipeline, the engine and files; the CLI prints its table.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from fleetlm.config import StrictModel, format_errors, load_yaml, problems_error
from fleetlm.errors import ConfigError
from fleetlm.tune.config import TuneConfig, load_config

DOCS = "docs/tuning.md#choosing-a-base-fleetlm-select"
QUALITY = {"classification": "accuracy"}  # other task types: rouge_l


def _default_candidates() -> list[str]:
    from fleetlm.models.registry import EMBEDDED_MODELS

    return list(EMBEDDED_MODELS)


class SelectConfig(StrictModel):
    tune: Path  # the tune config every candidate is tuned with (its base_model is replaced)
    candidates: list[str] = Field(default_factory=_default_candidates, min_length=1)
    cost_per_hour: float = Field(0.10, gt=0)  # of the machine that serves, in your currency
    latency_requests: int = Field(16, gt=0)  # validation prompts timed one at a time
    throughput_requests: int = Field(64, gt=0)  # ... and with `concurrency` in flight
    concurrency: int = Field(16, gt=0)
    quality_tolerance: float = Field(0.01, ge=0)  # within this of the best counts as as good
    compile: bool = True  # measure the serving default (compiled decode)
    output_dir: Path | None = None  # default: the tune config's output_dir + "-select"

    @field_validator("candidates")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"a candidate is listed twice: {v}")
        return v


def load_select_config(path: Path) -> tuple[SelectConfig, TuneConfig]:
    """The selection config at ``path`` and the tune config it names (relative paths are
    taken from the selection config's folder)."""
    path = Path(path)
    raw = load_yaml(path, missing=f"select config {path} does not exist; pass the path of a "
                    "YAML file (examples/select-banking77.yaml is one)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the select config must be a mapping of keys")
    for key in ("tune", "output_dir"):
        if isinstance(raw.get(key), str):
            raw[key] = str((path.parent / raw[key]).expanduser())
    try:
        cfg = SelectConfig.model_validate(raw)
    except ValidationError as e:
        raise problems_error(str(path), "select config", format_errors(e, DOCS)) from None
    tune = load_config(cfg.tune)
    if tune.train.method != "lora":
        raise ConfigError(f"{cfg.tune}: train.method is {tune.train.method!r}; fleetlm select "
                          "compares LoRA adapters on each base (set train.method: lora)")
    if not tune.eval.enabled:
        raise ConfigError(f"{cfg.tune}: eval.enabled is false; fleetlm select compares the "
                          "bases by the tune run's evaluation (set eval.enabled: true)")
    return cfg, tune


def slug(base: str) -> str:
    """A candidate's name in adapter and folder names: the embedded name, or the folder's."""
    name = Path(base.rstrip("/")).name or base
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "model"


def tune_candidate(tune: TuneConfig, base: str, folder: Path) -> Any:
    """The tune pipeline's result for ``base``: ``tune`` with only the base, the adapter's
    name and the folders changed."""
    from fleetlm.tune.pipeline import Pipeline

    name = f"{tune.name}-{slug(base)}"[:64]
    cfg = tune.model_copy(update={
        "base_model": base, "name": name, "output_dir": folder / "run",
        "publish": tune.publish.model_copy(update={"adapters_dir": folder / "adapters",
                                                   "serve_url": None, "overwrite": True})})
    return Pipeline(cfg).run()


def _tensor_bytes(module: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:  # tied weights once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def measure_serving(cfg: SelectConfig, tune: TuneConfig, base: str, result: Any) -> dict[str, Any]:
    """Latency, throughput and memory of the tuned adapter on ``base``, served with the
    serving defaults, on the candidate's validation prompts."""
    from fleetlm.adapters import AdapterStore
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model
    from fleetlm.tune.evaluate import eval_requests, generate_all
    from fleetlm.tune.records import read_jsonl

    adapter = Path(result.adapter_dir)
    card = json.loads((adapter / "fleetlm_task.json").read_text())
    prepare = result.summary["stages"]["prepare"]["key"]
    rows = read_jsonl(Path(result.run_dir) / "stages" / f"prepare-{prepare}" / "val.jsonl")
    lm = load_model(base, dtype="auto", quantize="auto")
    prompts, params = eval_requests(lm.tokenizer, rows, tune.task, card.get("labels"),
                                    max_new_tokens=tune.eval.max_new_tokens)
    longest = max(len(p) for p in prompts) + params.max_tokens + 1
    store = AdapterStore(adapter.parent, lm.config, dtype=lm.model.dtype,
                         max_rank=max(16, tune.train.rank))
    engine = Engine(lm, EngineConfig(max_running=cfg.concurrency, max_len=longest,
                                     max_hot_adapters=1, max_lora_rank=max(16, tune.train.rank),
                                     compile=cfg.compile), store=store)
    try:
        warmup_s = engine.warmup()
        generate_all(engine, prompts[:2], params, adapter.name)  # the adapter loaded, untimed
        one = [prompts[i % len(prompts)] for i in range(cfg.latency_requests)]
        lat = []
        for p in one:
            t = time.perf_counter()
            generate_all(engine, [p], params, adapter.name)
            lat.append(1000 * (time.perf_counter() - t))
        many = [prompts[i % len(prompts)] for i in range(cfg.throughput_requests)]
        t = time.perf_counter()
        generate_all(engine, many, params, adapter.name)
        rps = len(many) / (time.perf_counter() - t)
        runner = engine.runner
        memory = (_tensor_bytes(lm.model) + runner.cache.nbytes()
                  + (runner.lora.nbytes() if runner.lora is not None else 0))
    finally:
        engine.shutdown()
    return {"dtype": str(lm.dtype).removeprefix("torch."), "weights": lm.quantize,
            "compiled": bool(lm.model.decode_compiled), "warmup_s": warmup_s,
            "latency_ms_p50": statistics.median(lat),
            "latency_ms_p90": sorted(lat)[int(0.9 * (len(lat) - 1))],
            "requests_per_s": rps, "concurrency": cfg.concurrency,
            "memory_bytes": memory,
            "cost_per_1m_requests": cfg.cost_per_hour / (rps * 3600) * 1e6}


def recommend(rows: list[dict[str, Any]], metric: str, tolerance: float
              ) -> tuple[str, list[str]]:
    """The candidate to use and why: among those within ``tolerance`` of the best quality,
    the cheapest per request (then the fastest)."""
    best = max(rows, key=lambda r: r["quality"])
    near = [r for r in rows if r["quality"] >= best["quality"] - tolerance]
    pick = min(near, key=lambda r: (r["cost_per_1m_requests"], r["latency_ms_p50"]))
    why = [f"{pick['base']}: {metric} {pick['quality']:.3f}, "
           + ("the best" if pick is best else
              f"within {tolerance:g} of the best ({best['base']}, {best['quality']:.3f})")
           + f"; {pick['cost_per_1m_requests']:.3f} per 1M requests, p50 latency "
           f"{pick['latency_ms_p50']:.0f} ms"]
    for r in rows:
        if r is pick:
            continue
        if r in near:
            reason = (f"as good within {tolerance:g}, but {r['cost_per_1m_requests'] / pick['cost_per_1m_requests']:.1f}x "
                      "the cost per request")
        else:
            reason = f"{pick['quality'] - r['quality']:.3f} {metric} behind"
        why.append(f"not {r['base']}: {metric} {r['quality']:.3f}, "
                   f"{r['cost_per_1m_requests']:.3f} per 1M requests: {reason}")
    return pick["base"], why


def plot(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Quality against cost per 1M requests, one point per candidate."""
    from fleetlm.plots import png

    with png(path, (7, 4.5)) as (_, ax):
        for r in rows:
            ax.scatter(r["cost_per_1m_requests"], r["quality"], s=60)
            ax.annotate(f"{slug(r['base'])}\n{r['latency_ms_p50']:.0f} ms p50",
                        (r["cost_per_1m_requests"], r["quality"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
        ax.set_xlabel("cost per 1M requests (measured throughput x cost per hour)")
        ax.set_ylabel(f"validation {metric}")
        ax.set_title("fleetlm select: quality against cost")
        ax.margins(x=0.3, y=0.2)  # room for the labels
        ax.grid(alpha=0.3)


def run_select(cfg: SelectConfig, tune: TuneConfig, say: Any = print) -> dict[str, Any]:
    """Tune, evaluate and measure every candidate; the table, the plot and the
    recommendation in ``select.json`` / ``select.png`` of the output folder."""
    out = cfg.output_dir or Path(str(tune.run_dir()) + "-select")
    out.mkdir(parents=True, exist_ok=True)
    metric = QUALITY.get(tune.task.type, "rouge_l")
    report: dict[str, Any] = {"task": tune.name, "tune_config": str(cfg.tune), "metric": metric,
                              "config": json.loads(cfg.model_dump_json()), "candidates": []}
    for i, base in enumerate(cfg.candidates, 1):
        say(f"select: candidate {i}/{len(cfg.candidates)}: {base} (tuning)")
        t = time.perf_counter()
        result = tune_candidate(tune, base, out / slug(base))
        tune_s = time.perf_counter() - t
        say(f"select: {base}: measuring serving")
        served = measure_serving(cfg, tune, base, result)
        tuned = result.summary["metrics"].get("tuned", {})
        if metric not in tuned:
            raise ConfigError(f"select: {base}'s tune run reported no {metric!r}")
        report["candidates"].append({
            "base": base, "quality": tuned[metric], "metrics": tuned,
            "train_tokens_per_s": result.summary["stages"]["train"].get("tokens_per_s"),
            "tune_s": tune_s, "adapter": str(result.adapter_dir), **served})
        (out / "select.json").write_text(json.dumps(report, indent=1))  # nothing lost
    pick, why = recommend(report["candidates"], metric, cfg.quality_tolerance)
    report.update(recommendation=pick, reasons=why)
    plot(report["candidates"], metric, out / "select.png")
    report["plot"] = str(out / "select.png")
    (out / "select.json").write_text(json.dumps(report, indent=1))
    return report
