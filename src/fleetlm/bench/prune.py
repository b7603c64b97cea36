"""``fleetlm bench prune``: a tuned adapter merged, pruned, then distilled from the merged
model -- against the same pruned model tuned (LoRA) without distillation -- each measured
the same way: parameters, accuracy on the run's validation rows (the sample its own
evaluation drew, for the same count) through fleetlm's engine
and the tune evaluator, evaluation wall time, and single-stream decode speed.

Input is a finished ``fleetlm tune`` run folder: its config, its prepared rows (the
calibration and distillation rows are its training rows, rendered with the task's system
prompt as served) and its published adapter. Everything is written under ``--work-dir``;
the JSON gives each model's row, the ratios and the issue's targets (at least 30% fewer
parameters with accuracy within 1 point of the merged model). Each model's figures are
written as soon as they are known.

This module drives compress/ (export, prune, distill), tune/ (the comparison run, the
evaluator) and the engine; it knows nothing of how any of them work.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from fleetlm.bench.common import environment, write_json
from fleetlm.config import StrictModel
from fleetlm.errors import ConfigError

TARGETS = {"parameter_reduction_min": 0.30, "accuracy_drop_max": 0.01}


class PruneBenchConfig(StrictModel):
    run: Path  # a finished `fleetlm tune` run folder (classification)
    work_dir: Path | None = None  # default: RUN/bench-prune
    mlp: float = Field(0.5, ge=0.0, lt=1.0)  # fleetlm prune --mlp
    layers: int = Field(2, ge=0)  # fleetlm prune --layers
    kv_groups: int = Field(0, ge=0)
    calibration_rows: int = Field(128, ge=1)
    distill_steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    temperature: float = Field(1.0, gt=0)
    distill_eval_rows: int = Field(64, ge=1)  # rows held out to report the KL to the teacher
    max_len: int = Field(96, ge=8)
    tune_steps: int = Field(200, ge=0)  # the pruned model tuned without distillation; 0: skip
    eval_rows: int = Field(300, ge=1)  # validation rows every model answers (seeded sample)
    decode_tokens: int = Field(64, ge=1)
    decode_repeats: int = Field(3, ge=1)


def read_run(run: Path) -> tuple[Any, dict[str, Any], Path]:
    """(tune config, summary, prepare stage folder) of a finished tune run."""
    from fleetlm.tune.config import TuneConfig

    try:
        summary = json.loads((run / "summary.json").read_text())
        cfg = TuneConfig.model_validate_json((run / "config.json").read_text())
        prepare = run / "stages" / f"prepare-{summary['stages']['prepare']['key']}"
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--run {run}: not a finished fleetlm tune run ({type(e).__name__}: "
                          f"{e}); run fleetlm tune first and pass its run folder",
                          param="run") from None
    if cfg.task.type != "classification":
        raise ConfigError(f"--run {run}: a {cfg.task.type} task; bench prune scores "
                          "classification runs (accuracy)", param="run")
    if cfg.train.method != "lora" or not summary.get("published"):
        raise ConfigError(f"--run {run}: needs a published LoRA adapter", param="run")
    return cfg, summary, prepare


def write_rows(tune: Any, prepare: Path, out: Path) -> list[Any]:
    """The run's training rows as `prune` and `distill` read them (chat prompt with the
    task's system prompt, answer); returns the validation rows."""
    from fleetlm.adapters.task_card import task_messages
    from fleetlm.tune.records import read_jsonl

    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for ex in read_jsonl(prepare / "train.jsonl"):
            f.write(json.dumps({"prompt": task_messages(ex, tune.task), "answer": ex.answer})
                    + "\n")
    return read_jsonl(prepare / "val.jsonl")


def eval_rows(tune: Any, rows: list[Any], n: int) -> list[Any]:
    """The validation rows every model answers: the tune run's own choice for ``n`` rows
    (a sample seeded by the run's seed, as its evaluation stage draws ``eval.max_rows``),
    never the first ``n`` (a split of a file sorted by label holds a few labels there)."""
    import random

    return list(rows) if len(rows) <= n else random.Random(tune.seed).sample(list(rows), n)


def measure(model: str, tune: Any, rows: list[Any], labels: list[str], cfg: PruneBenchConfig,
            adapter: Path | None = None) -> dict[str, Any]:
    """Parameters, accuracy and evaluation time (engine + tune evaluator, batched), and
    single-stream decode tok/s of ``model`` (with ``adapter`` when given)."""
    from fleetlm.adapters import AdapterStore
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.engine.generate import Generator
    from fleetlm.engine.sampling_params import SamplingParams
    from fleetlm.models.loader import load_model
    from fleetlm.tune.evaluate import evaluate

    lm = load_model(model, dtype="auto")
    params = sum(p.numel() for p in {id(p): p for p in lm.model.parameters()}.values())
    store = None if adapter is None else AdapterStore(adapter.parent, lm.config,
                                                      dtype=lm.model.dtype, max_rank=64)
    from fleetlm.models.kv_cache import max_kv_len

    max_len = max_kv_len(lm.model, 1024)  # the rotary table bounds the KV rows
    engine = Engine(lm, EngineConfig(max_running=16, max_len=max_len,
                                     max_hot_adapters=0 if adapter is None else 1,
                                     max_lora_rank=64), store=store)
    try:
        t = time.perf_counter()
        res = evaluate(engine, rows, tune.task, labels,
                       adapter=None if adapter is None else adapter.name, name=model)
        eval_s = time.perf_counter() - t
    finally:
        engine.shutdown()
    speeds = []
    if adapter is None:  # the one-stream generator serves no adapters
        gen = Generator(lm, max_len=256)
        prompt = lm.tokenizer("Tell me about my card payment that was declined")["input_ids"]
        p = SamplingParams(max_tokens=cfg.decode_tokens, temperature=0.0, ignore_eos=True)
        gen.generate(prompt, p)  # warm
        for _ in range(cfg.decode_repeats):
            r = gen.generate(prompt, p)
            speeds.append((len(r.token_ids) - 1) / r.decode_s)
    return {"model": model, "adapter": None if adapter is None else str(adapter),
            "parameters": params, "accuracy": res.metrics["accuracy"],
            "macro_f1": res.metrics.get("macro_f1"), "eval_rows": res.rows, "eval_s": eval_s,
            "decode_tok_s": statistics.median(speeds) if speeds else None,
            "dtype": str(lm.dtype).removeprefix("torch."), "weights": lm.quantize}


def tune_pruned(tune: Any, pruned: Path, work: Path, steps: int) -> Path:
    """The pruned model LoRA-tuned on the run's data for ``steps`` (no distillation);
    its adapter's folder."""
    from fleetlm.tune.pipeline import Pipeline

    cfg = tune.model_copy(update={
        "name": f"{tune.name}-pruned"[:64], "base_model": str(pruned),
        "output_dir": work / "tuned-run",
        "train": tune.train.model_copy(update={"max_steps": steps}),
        "eval": tune.eval.model_copy(update={"enabled": False}),
        "publish": tune.publish.model_copy(update={"adapters_dir": work / "tuned-adapters",
                                                   "serve_url": None, "overwrite": True})})
    return Path(Pipeline(cfg).run().adapter_dir)


def run(cfg: PruneBenchConfig, out: Path | None, say: Any = print) -> dict[str, Any]:
    from fleetlm.compress.distill import DistillSettings, distill
    from fleetlm.compress.export import ExportSettings, export
    from fleetlm.compress.prune import PruneSettings, prune

    tune, summary, prepare = read_run(cfg.run)
    work = cfg.work_dir or cfg.run / "bench-prune"
    rows_file = work / "train.jsonl"
    val = eval_rows(tune, write_rows(tune, prepare, rows_file), cfg.eval_rows)
    adapter = Path(summary["published"])
    labels = json.loads((adapter / "fleetlm_task.json").read_text())["labels"]
    result: dict[str, Any] = {"benchmark": "prune", "config": json.loads(cfg.model_dump_json()),
                              "environment": environment(), "base_model": tune.base_model,
                              "adapter": str(adapter), "models": {}}

    def record(name: str, row: dict[str, Any]) -> None:
        result["models"][name] = row
        say(f"bench prune: {name}: {row['parameters'] / 1e6:.1f}M parameters, accuracy "
            f"{row['accuracy']:.3f} on {row['eval_rows']} rows"
            + (f", decode {row['decode_tok_s']:.1f} tok/s" if row["decode_tok_s"] else ""))
        write_json(result, work / "bench-prune.json")

    say(f"bench prune: merging {adapter.name} into {tune.base_model}")
    export(ExportSettings(model=tune.base_model, adapter=str(adapter), out=work / "merged",
                          gguf=[]), say=say)
    merged = work / "merged" / "hf"
    record("merged", measure(str(merged), tune, val, labels, cfg))
    t = time.perf_counter()
    report = prune(PruneSettings(model=str(merged), data=rows_file, out=work / "pruned",
                                 mlp=cfg.mlp, layers=cfg.layers, kv_groups=cfg.kv_groups,
                                 calibration_rows=cfg.calibration_rows, max_len=cfg.max_len),
                   say=say)
    result["prune"] = {**report, "seconds": time.perf_counter() - t}
    record("pruned", measure(str(work / "pruned"), tune, val, labels, cfg))
    t = time.perf_counter()
    report = distill(DistillSettings(
        teacher=str(merged), student=str(work / "pruned"), data=rows_file,
        out=work / "distilled", steps=cfg.distill_steps, batch_size=cfg.batch_size,
        max_len=cfg.max_len, learning_rate=cfg.learning_rate, temperature=cfg.temperature,
        eval_rows=cfg.distill_eval_rows),
        say=say)
    result["distill"] = {**report, "seconds": time.perf_counter() - t}
    record("pruned+distilled", measure(str(work / "distilled"), tune, val, labels, cfg))
    if cfg.tune_steps:
        t = time.perf_counter()
        tuned = tune_pruned(tune, work / "pruned", work, cfg.tune_steps)
        result["tune_pruned_s"] = time.perf_counter() - t
        record("pruned+tuned (no distillation)",
               measure(str(work / "pruned"), tune, val, labels, cfg, adapter=tuned))
    result["ratios"] = ratios(result["models"])
    write_json(result, work / "bench-prune.json")
    if out is not None:
        write_json(result, out)
    return result


def ratios(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    m, d = models["merged"], models["pruned+distilled"]
    fewer = 1 - d["parameters"] / m["parameters"]
    drop = m["accuracy"] - d["accuracy"]
    speedup = (d["decode_tok_s"] / m["decode_tok_s"]
               if d["decode_tok_s"] and m["decode_tok_s"] else None)
    return {"parameter_reduction": fewer, "accuracy_drop_distilled": drop,
            "decode_speedup": speedup,
            "targets_met": {"parameters": fewer >= TARGETS["parameter_reduction_min"],
                            "accuracy": drop <= TARGETS["accuracy_drop_max"]}}
