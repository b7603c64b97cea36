"""``fleetlm bench route``: how well the ``classifier`` router routes on RouteLLM's outcome sets.

Data: ``../shared/data/routellm/{mmlu,gsm8k}_train.jsonl`` -- per prompt, whether Mixtral-8x7B
(the small/weak model) and GPT-4-1106 (the large/strong model) answered correctly. No model is
run: routing quality comes from these recorded outcomes, as in RouteLLM's own evaluation.

What runs:

- ``classifier``: k-fold cross-validation (stratified on the label, shuffled with ``seed``);
  every prompt is scored by the router trained on the other folds. Embeddings are computed once
  and cached on disk (``CachedEmbedder``), so a re-run costs seconds.
- ``random``: the ``RandomPolicy`` (hash of seed and prompt); its expected APGR is 0.5.
- ``oracle``: the best possible ordering, for the plot and as a ceiling.
- Router overhead per request, model time excluded: a router trained on all rows scores
  ``overhead_samples`` prompts one at a time (embedding one prompt + the logistic regression,
  no memo), on ``threads`` torch threads; p50/p99 in milliseconds.

Prints a RouteLLM-style table (APGR, CPT(50/80/95%)), writes JSON (``out``) and a PNG
(``plot``). Metrics are defined in :mod:`fleetlm.router.evaluate`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fleetlm.bench.common import environment, percentile, write_json
from fleetlm.errors import ConfigError
from fleetlm.router.calibrate import load_outcomes, outcome_arrays
from fleetlm.router.classifier import (
    MINILM_ID,
    MINILM_STATIC_ID,
    CachedEmbedder,
    Target,
    fit_router,
    labels,
    load_embedder,
)
from fleetlm.router.evaluate import (
    RouterReport,
    evaluate_scores,
    format_report,
    oracle_curve,
    plot_curves,
    report_from_curve,
)
from fleetlm.router.policies import RandomPolicy, RouteContext

DATASETS = {"mmlu": "mmlu_train.jsonl", "gsm8k": "gsm8k_train.jsonl"}
DATA_RELATIVE = Path("shared/data/routellm")


def default_data_dir() -> Path:
    """../shared/data/routellm beside the repository root, else relative to the working folder."""
    beside_repo = Path(__file__).resolve().parents[3].parent / DATA_RELATIVE
    return beside_repo if beside_repo.exists() else Path("..") / DATA_RELATIVE


def cross_val_scores(x: np.ndarray, small: np.ndarray, large: np.ndarray, folds: int,
                     seed: int, target: Target, C: float, model_id: str) -> np.ndarray:
    """Out-of-fold scores (fleetlm convention) for every row."""
    from sklearn.model_selection import StratifiedKFold

    y = labels(small, large, target)
    scores = np.zeros(len(y), dtype=np.float64)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        r = fit_router(x[train], small[train], large[train], model_id, target=target, C=C)
        scores[test] = r.scores_from_embeddings(x[test])
    return scores


def run_routellm(dataset: str = "mmlu", folds: int = 5, out: Path | None = None,
                 plot: Path | None = None, data_dir: Path | None = None,
                 embedding_models: Sequence[str] = (MINILM_ID, MINILM_STATIC_ID),
                 targets: Sequence[Target] = ("large_needed",), C: float = 1.0, seed: int = 0,
                 cache_dir: Path | None = None, limit: int | None = None, threads: int = 1,
                 overhead_samples: int = 200,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Cross-validated classifier router(s) vs random on a RouteLLM outcome set.

    One classifier row per (embedding model, target). Returns (and writes to ``out``)
    ``{"dataset", "n", "folds", "acc_small", "acc_large", "routers": [RouterReport.as_dict()
    ...], "overhead_ms": {embedding model: {"p50", "p99", ...}}, ...}``. ``limit`` keeps the
    first N rows (quick runs). ``plot`` defaults to ``out`` with ``.png``.
    """
    say = log or (lambda s: print(s, file=sys.stderr))
    problems = []
    if dataset not in DATASETS:
        problems.append(f"--data {dataset!r}: one of {', '.join(DATASETS)} "
                        f"(routellm-mmlu, routellm-gsm8k)")
    if folds < 2:
        problems.append(f"--folds={folds}: must be >= 2")
    if limit is not None and limit < 10 * folds:
        problems.append(f"--limit={limit}: needs at least {10 * folds} rows for {folds} folds")
    if not embedding_models or not targets:
        problems.append("need at least one embedding model and one target")
    path = (data_dir if data_dir is not None else default_data_dir()) / DATASETS.get(dataset, "")
    if not problems and not path.is_file():
        problems.append(f"{path}: no such file; RouteLLM's outcome sets live in "
                        f"../shared/data/routellm beside the repository")
    if problems:
        raise ConfigError("invalid route benchmark settings: " + "; ".join(problems))

    import torch

    torch.set_num_threads(threads)
    rows = load_outcomes(path)[:limit]
    prompts, small, large = outcome_arrays(rows)
    reports: list[RouterReport] = []
    overhead: dict[str, dict[str, Any]] = {}
    embed_s: dict[str, float] = {}
    for model_id in embedding_models:
        say(f"{dataset}: {len(prompts)} prompts; embedding with {model_id} (cached)")
        t0 = time.perf_counter()
        embedder = CachedEmbedder(load_embedder(model_id), cache_dir)
        x = embedder.embed(prompts).astype(np.float64)
        embed_s[model_id] = time.perf_counter() - t0
        for target in targets:
            t = time.perf_counter()
            s = cross_val_scores(x, small, large, folds, seed, target, C, model_id)
            name = f"classifier [{model_id}]" + (f" ({target})" if len(targets) > 1 else "")
            reports.append(evaluate_scores(name, s, small, large))
            say(f"{name}: {folds}-fold CV in {time.perf_counter() - t:.1f}s")
        overhead[model_id] = measure_overhead(x, small, large, prompts, model_id, targets[0], C,
                                              overhead_samples, seed)
    rnd = RandomPolicy(seed)
    reports.append(evaluate_scores("random", [rnd.score(RouteContext(p)) for p in prompts],
                                   small, large))
    oracle = oracle_curve(small, large)
    reports.append(report_from_curve("oracle", oracle, len(prompts)))

    lines = [f"router overhead per request ({threads} thread(s), model time excluded):"]
    for model_id, o in overhead.items():
        lines.append(f"  classifier [{model_id}]: p50 {o['p50']:.2f} ms  p99 {o['p99']:.2f} ms")
    print(f"\nroute bench: RouteLLM {dataset} ({len(prompts)} prompts, {folds}-fold CV)\n"
          f"{format_report(reports)}\n" + "\n".join(lines))

    plot_path = plot if plot is not None else (out.with_suffix(".png") if out else None)
    if plot_path is not None:
        plot_curves({r.name: r.curve for r in reports if r.name != "oracle"}, plot_path,
                    title=f"Routing on RouteLLM {dataset} ({folds}-fold CV)", oracle=oracle,
                    small_label="always small (Mixtral-8x7B)",
                    large_label="always large (GPT-4-1106)")
    result: dict[str, Any] = {
        "bench": "route", "dataset": dataset, "data": str(path), "n": len(prompts),
        "folds": folds, "seed": seed, "C": C, "targets": list(targets),
        "acc_small": reports[0].acc_small, "acc_large": reports[0].acc_large,
        "routers": [r.as_dict() for r in reports], "overhead_ms": overhead,
        "embed_seconds": embed_s, "plot": str(plot_path) if plot_path else None,
        "environment": environment(),
    }
    write_json(result, out)
    return result


def measure_overhead(x: np.ndarray, small: np.ndarray, large: np.ndarray,
                     prompts: Sequence[str], embedding_model: str, target: Target, C: float,
                     samples: int, seed: int) -> dict[str, Any]:
    """Per-request routing time (embed one prompt + predict), model load excluded."""
    router = fit_router(x, small, large, embedding_model, target=target, C=C,
                        embedder=load_embedder(embedding_model))
    router.memo_size = 0
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(prompts), size=min(samples, len(prompts)), replace=False)
    for i in picks[:5]:  # warm-up
        router.score(prompts[i])
    times, cpu = [], []
    for i in picks:
        t, c = time.perf_counter(), time.thread_time()
        router.score(prompts[i])
        cpu.append((time.thread_time() - c) * 1000.0)
        times.append((time.perf_counter() - t) * 1000.0)
    return {"p50": percentile(times, 50), "p90": percentile(times, 90),
            "p99": percentile(times, 99), "mean": float(np.mean(times)),
            "cpu_p50": percentile(cpu, 50), "cpu_p99": percentile(cpu, 99), "samples": len(times),
            "prompt_chars_p50": float(np.median([len(prompts[i]) for i in picks]))}
