"""``fleetlm bench route``: how well the routers route, on recorded outcomes or on a tuned adapter.

Two kinds of data:

- RouteLLM's outcome sets (``run_routellm``): ``../shared/data/routellm/{mmlu,gsm8k}_train.jsonl``
  -- per prompt, whether Mixtral-8x7B (the small/weak model) and GPT-4-1106 (the large/strong
  model) answered correctly. No model is run: routing quality comes from these recorded
  outcomes, as in RouteLLM's own evaluation.
- CLINC150 (``run_clinc150``): the published ``clinc150`` adapter on smollm2-135m is the small
  model, run through fleetlm's engine on ``../shared/data/clinc150`` validation (``val.jsonl``
  plus ``oos_val.jsonl``, 3,100 rows) with the prompts and constrained decoding of the tuning
  pipeline's evaluation; the large model is not run and counts as correct when escalated.
  The small-model pass is cached as JSON lines beside the output, keyed by the adapter's and
  the data files' contents, so a re-run costs only the routing part.

What runs:

- ``classifier``: k-fold cross-validation (stratified on the label, shuffled with ``seed``);
  every prompt is scored by the router trained on the other folds. Embeddings are computed once
  and cached on disk (``CachedEmbedder``), so a re-run costs seconds.
- ``confidence`` (CLINC150 only): the probability of the chosen label under constrained decoding
  (the sum of the answer tokens' ``constrained_logprob``, exponentiated).
- ``random``: the ``RandomPolicy`` (hash of seed and prompt); its expected APGR is 0.5.
- ``oracle``: the best possible ordering, for the plot and as a ceiling.
- Router overhead per request, model time excluded: a router trained on all rows scores
  ``overhead_samples`` prompts one at a time (embedding one prompt + the logistic regression,
  no memo), on ``threads`` torch threads; p50/p99 in milliseconds. For ``confidence``: the
  score from a finished answer's log-probabilities, and apart from it what asking the sampler
  for log-probabilities adds per answer token.

Prints a RouteLLM-style table (APGR, CPT(50/80/95%)), writes JSON (``out``) and a PNG
(``plot``). Metrics are defined in :mod:`fleetlm.router.evaluate`, the cross-validation in
:mod:`fleetlm.router.training` (what ``fleetlm route train`` reports too); this module only
gathers the data, runs the routers and times them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetlm.adapters.task_card import TASK_FILE
from fleetlm.bench.common import environment, percentile, write_json
from fleetlm.errors import ConfigError
from fleetlm.router.calibrate import load_outcomes, outcome_arrays
from fleetlm.router.classifier import (
    MINILM_ID,
    MINILM_STATIC_ID,
    CachedEmbedder,
    Embedder,
    Target,
    fit_router,
    load_embedder,
)
from fleetlm.router.evaluate import (
    Curve,
    RouterReport,
    evaluate_scores,
    format_report,
    oracle_curve,
    plot_curves,
    report_from_curve,
    resample,
)
from fleetlm.router.policies import ConfidencePolicy, RandomPolicy, RouteContext, flatten_messages
from fleetlm.router.training import cross_val_scores
from fleetlm.tune.format import read_task_card

if TYPE_CHECKING:
    from fleetlm.tune.config import TaskConfig
    from fleetlm.tune.records import Example

DATASETS = {"mmlu": "mmlu_train.jsonl", "gsm8k": "gsm8k_train.jsonl"}
ROUTELLM_SETS = {"routellm-mmlu": "mmlu", "routellm-gsm8k": "gsm8k"}  # --data -> DATASETS key
DATA_RELATIVE = Path("shared/data/routellm")
CLINC_RELATIVE = Path("shared/data/clinc150")


def _beside_repo(relative: Path) -> Path:
    """``relative`` beside the repository root, else relative to the working folder's parent."""
    beside_repo = Path(__file__).resolve().parents[3].parent / relative
    return beside_repo if beside_repo.exists() else Path("..") / relative


def default_data_dir() -> Path:
    """../shared/data/routellm beside the repository."""
    return _beside_repo(DATA_RELATIVE)


def default_clinc_dir() -> Path:
    """../shared/data/clinc150 beside the repository."""
    return _beside_repo(CLINC_RELATIVE)


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
                     samples: int, seed: int, embedder: Embedder | None = None) -> dict[str, Any]:
    """Per-request routing time (embed one prompt + predict), model load excluded."""
    router = fit_router(x, small, large, embedding_model, target=target, C=C,
                        embedder=embedder or load_embedder(embedding_model))
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


# --- CLINC150: the tuned adapter is the small model ------------------------------------------

CLINC_FILES = ("val.jsonl", "oos_val.jsonl")
TARGET_ACCURACY = 0.95  # the hybrid router issue's target: >= 0.95 accuracy ...
TARGET_SHARE = 0.20  # ... with at most 20% of the requests escalated
ACCURACY_AT = (0.1, 0.2, 0.3)  # shares escalated at which the table reads the accuracy
SMALL_PASS_VERSION = 1  # bump when what the cached small-model pass records changes


def clinc_examples(data_dir: Path) -> tuple[list[Example], list[str | None]]:
    """The rows of val.jsonl then oos_val.jsonl as classification examples, normalised as
    ``fleetlm tune`` normalises validation rows (no dedup: every row is kept), and each
    row's CLINC150 domain (``domains.json``; "oos" for out-of-scope, None when unknown)."""
    from fleetlm.tune.prepare import normalize_row
    from fleetlm.tune.records import classification_example

    domain_of: dict[str, str] = {"oos": "oos"}
    if (data_dir / "domains.json").is_file():
        for domain, intents in json.loads((data_dir / "domains.json").read_text()).items():
            domain_of.update({intent: domain for intent in intents})
    rows: list[Example] = []
    for name in CLINC_FILES:
        with (data_dir / name).open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj.get("text"), str) or not isinstance(obj.get("label"), str):
                    raise ConfigError(f"{data_dir / name} line {lineno}: needs \"text\" and "
                                      f"\"label\" strings")
                rows.append(normalize_row(classification_example(obj["text"], obj["label"])))
    return rows, [domain_of.get(ex.answer) for ex in rows]


def stratified_head(labels: Sequence[str], n: int) -> list[int]:
    """Indices of ``n`` rows: the first row of every label (in order of first appearance),
    then the second of each, and so on; returned in file order. Deterministic, and every
    label is present once ``n`` >= the number of labels."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    n = min(n, len(labels))
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        picked.extend(g[depth] for g in groups.values() if depth < len(g))
        depth += 1
    return sorted(picked[:n])


def _card_base_model(folder: Path) -> str | None:
    """``base_model:`` of the model card's front matter (README.md), when there is one."""
    readme = folder / "README.md"
    if readme.is_file():
        for line in readme.read_text(encoding="utf-8").splitlines()[:12]:
            if line.startswith("base_model:"):
                return line.split(":", 1)[1].strip() or None
    return None


class _LogprobTap:
    """An Engine as :func:`fleetlm.tune.evaluate.evaluate` drives it, so the bench sends
    the tuning evaluation's requests (prompts, greedy, output constrained to the labels, up
    to the longest label's bytes + 1 tokens, so every answer is a whole label) with one
    change that leaves greedy choices alone: ``logprobs=0``, so every token event carries
    ``constrained_logprob``, kept here per request in submission order (``generate_all``
    submits rows in order).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.lm = engine.lm
        self.config = engine.config
        self.logprobs: list[list[float]] = []

    def submit(self, prompt: list[int], params: Any, *, callback: Callable[[Any], object],
               adapter: str | None = None) -> str:
        lps: list[float] = []
        self.logprobs.append(lps)

        def on(ev: Any) -> None:
            if ev.constrained_logprob is not None:  # EOS after a label that prefixes another too
                lps.append(ev.constrained_logprob)
            callback(ev)
        params = dataclasses.replace(params, logprobs=0)
        return str(self.engine.submit(prompt, params, callback=on, adapter=adapter))

    def step(self) -> bool:
        return bool(self.engine.step())


def _small_pass_key(files: Sequence[Path], base_model: str, indices: Sequence[int]) -> str:
    h = hashlib.sha256(f"v{SMALL_PASS_VERSION}\0{base_model}\0{list(indices)}".encode())
    for p in files:
        h.update(f"\0{p.name}\0".encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def small_pass(rows: Sequence[Example], task: TaskConfig, labels: Sequence[str], adapter: str,
               adapters_dir: Path, base_model: str, show_progress: bool = True
               ) -> tuple[list[str], list[list[float]], dict[str, float]]:
    """The adapter's greedy, label-constrained answers through fleetlm's engine, as the
    tuning pipeline's evaluation runs them: (predictions, constrained log-probs per answer
    token, metrics)."""
    from fleetlm.adapters import AdapterStore
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.kv_cache import max_kv_len
    from fleetlm.models.loader import load_model
    from fleetlm.progress import Progress
    from fleetlm.tune.evaluate import evaluate

    lm = load_model(base_model, dtype="auto")
    store = AdapterStore(adapters_dir, lm.config, dtype=lm.model.dtype)
    rank = max(16, store.validate(adapter).rank)
    # as Pipeline._engine: the rotary table bounds the KV rows, 32 sequences at once
    max_len = max_kv_len(lm.model, 4096)
    engine = Engine(lm, EngineConfig(max_running=32, max_len=max_len, max_hot_adapters=1,
                                     max_lora_rank=rank, max_step_tokens=2048,
                                     prefill_chunk=2048), store=store)
    tap = _LogprobTap(engine)
    try:
        if show_progress:
            with Progress("bench route") as p:
                update = p.task(f"{adapter} (small model)", len(rows))
                res = evaluate(tap, rows, task, labels, adapter=adapter, name="small",
                               progress=lambda done, total: update(done, total))
        else:
            res = evaluate(tap, rows, task, labels, adapter=adapter, name="small")
    finally:
        engine.shutdown(10)
    assert len(tap.logprobs) == len(rows)
    return res.predictions, tap.logprobs, res.metrics


def _check_clinc(data_dir: Path, adapters_dir: Path, adapter: str, folds: int,
                 limit: int | None) -> list[str]:
    from fleetlm.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE

    problems = []
    missing = [f for f in CLINC_FILES if not (data_dir / f).is_file()]
    if missing:
        problems.append(f"{data_dir}: {', '.join(missing)} not found; CLINC150 lives in "
                        f"../shared/data/clinc150 beside the repository")
    folder = adapters_dir / adapter
    lacks = [f for f in (CONFIG_FILE, WEIGHTS_FILE, TASK_FILE) if not (folder / f).is_file()]
    if not folder.is_dir():
        problems.append(f"--adapter {adapter}: not in the adapter store {adapters_dir}; tune "
                        f"and publish it with `fleetlm tune examples/clinc150.yaml`")
    elif lacks:
        problems.append(f"--adapter {adapter}: {folder} lacks {', '.join(lacks)}; re-publish "
                        f"it with `fleetlm tune examples/clinc150.yaml`")
    if folds < 2:
        problems.append(f"--folds={folds}: must be >= 2")
    if limit is not None and limit < 2 * folds:
        problems.append(f"--limit={limit}: needs at least {2 * folds} rows for {folds} folds")
    return problems


def _ms(times: Sequence[float]) -> dict[str, Any]:
    return {"p50": percentile(list(times), 50), "p90": percentile(list(times), 90),
            "p99": percentile(list(times), 99), "mean": float(np.mean(times)),
            "samples": len(times)}


def confidence_overhead(prompts: Sequence[str], logprobs: Sequence[Sequence[float]],
                        vocab_size: int, samples: int, seed: int) -> dict[str, Any]:
    """The confidence policy's cost per request beyond the small model's own work: its score
    from a finished answer (sum the constrained log-probs, exp, ``ConfidencePolicy.score``),
    and apart (``sampler_per_token``) the two log-softmaxes over the vocabulary that
    ``logprobs=0`` adds to the sampler per answer token (raw and constrained)."""
    import torch

    policy = ConfidencePolicy()
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(prompts), size=min(samples, len(prompts)), replace=False)
    times = []
    for i in (*picks[:5], *picks):  # the first five warm up
        t = time.perf_counter()
        policy.score(RouteContext(prompts[i], label_prob=math.exp(sum(logprobs[i]))))
        times.append((time.perf_counter() - t) * 1000.0)
    logits = torch.randn(vocab_size)
    masked = logits.masked_fill(torch.rand(vocab_size) < 0.99, float("-inf"))
    per_token = []
    for k in range(len(picks) + 5):
        t = time.perf_counter()
        float(torch.log_softmax(logits, dim=-1)[k % vocab_size])
        float(torch.log_softmax(masked, dim=-1)[0])
        per_token.append((time.perf_counter() - t) * 1000.0)
    tokens = float(np.mean([len(lp) for lp in logprobs]))
    return {**_ms(times[5:]), "sampler_per_token": _ms(per_token[5:]),
            "answer_tokens_mean": tokens}


def _vocab_size(base_model: str) -> int:
    from fleetlm.models.loader import read_config, resolve_source

    return int(read_config(resolve_source(base_model)).vocab_size)


def _share_reaching(curve: Curve, goal: float) -> tuple[float, float] | None:
    """(share escalated, threshold) of the first achievable point with accuracy >= goal."""
    ok = np.flatnonzero(curve.accuracy >= goal - 1e-12)
    return None if len(ok) == 0 else (float(curve.share[ok[0]]), float(curve.threshold[ok[0]]))


def target_summary(report: RouterReport, goal: float = TARGET_ACCURACY,
                   max_share: float = TARGET_SHARE) -> dict[str, Any]:
    """Hybrid accuracy at ``ACCURACY_AT`` shares escalated (linear between achievable
    points: ties broken at random), the least achievable share reaching ``goal`` and its
    threshold, and whether that share is <= ``max_share``."""
    at = resample(report.curve, ACCURACY_AT)
    hit = _share_reaching(report.curve, goal)
    return {"accuracy_at": {f"{round(s * 100)}%": float(a)
                            for s, a in zip(at.share, at.accuracy, strict=True)},
            "share_for_target": None if hit is None else hit[0],
            "threshold_for_target": None if hit is None else hit[1],
            "target_met": hit is not None and hit[0] <= max_share + 1e-12}


def format_targets(reports: Sequence[RouterReport], summaries: Mapping[str, Mapping[str, Any]],
                   goal: float = TARGET_ACCURACY, max_share: float = TARGET_SHARE) -> str:
    head = ["router", *(f"acc@{round(s * 100)}%" for s in ACCURACY_AT),
            f"escalated for {goal:.0%}", f"target (>= {goal:.0%} at <= {max_share:.0%})"]
    rows = [head]
    for r in reports:
        t = summaries[r.name]
        share = t["share_for_target"]
        rows.append([r.name, *(f"{a:.1%}" for a in t["accuracy_at"].values()),
                     "never" if share is None else f"{share:.1%}",
                     "met" if t["target_met"] else "not met"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


@dataclasses.dataclass
class _ClincRows:
    """The CLINC150 rows the bench runs (after ``limit``), as the small model sees them."""

    folder: Path  # the adapter's folder in the store
    task: TaskConfig
    labels: list[str]
    base: str  # the base model the adapter runs on
    examples: list[Example]
    domains: list[str | None]
    keep: list[int]  # indices of the rows kept, in the files' order
    prompts: list[str]  # what the routers score (the task's messages, flattened)
    golds: list[str]


def _clinc_rows(adapter: str, data_dir: Path, adapters_dir: Path, base_model: str | None,
                limit: int | None) -> _ClincRows:
    from fleetlm.tune.format import task_messages

    folder = adapters_dir / adapter
    task, labels = read_task_card(folder)
    base = base_model or _card_base_model(folder) or "smollm2-135m"
    examples, domains = clinc_examples(data_dir)
    unknown = sorted({ex.answer for ex in examples} - set(labels))
    if unknown:
        raise ConfigError(f"--adapter {adapter}: its labels lack {', '.join(unknown[:5])} "
                          f"found in {data_dir}; it was not tuned on CLINC150")
    keep = (stratified_head([ex.answer for ex in examples], limit) if limit is not None
            else list(range(len(examples))))
    examples, domains = [examples[i] for i in keep], [domains[i] for i in keep]
    return _ClincRows(folder, task, list(labels), base, examples, domains, keep,
                      [flatten_messages(task_messages(ex, task)) for ex in examples],
                      [ex.answer for ex in examples])


def _small_pass_cache(c: _ClincRows, data_dir: Path, stem: Path) -> Path:
    """Where the small-model pass is cached: beside the output, keyed by what it depends on."""
    from fleetlm.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE

    files = [c.folder / WEIGHTS_FILE, c.folder / CONFIG_FILE, c.folder / TASK_FILE,
             *(data_dir / f for f in CLINC_FILES)]
    return stem.with_name(f"{stem.name}.small-{_small_pass_key(files, c.base, c.keep)}.jsonl")


def _small_model_rows(c: _ClincRows, adapter: str, adapters_dir: Path, cache: Path,
                      show_progress: bool, say: Callable[[str], None]
                      ) -> tuple[list[dict[str, Any]], bool]:
    """Each row's small-model answer and its label probability, from ``cache`` or by running
    the adapter (then cached): (rows, cached)."""
    if cache.is_file():
        rows = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
        if [r["prompt"] for r in rows] != c.prompts:
            raise ConfigError(f"{cache}: does not match the rows; delete it and run again")
        say(f"clinc150: small-model pass from {cache}")
        return rows, True
    say(f"clinc150: {len(c.examples)} rows through {adapter} on {c.base} (greedy, "
        f"constrained to {len(c.labels)} labels)")
    preds, lps, _ = small_pass(c.examples, c.task, c.labels, adapter, adapters_dir, c.base,
                               show_progress)
    rows = [{"prompt": p, "text": ex.text, "label": g, "prediction": y, "domain": d,
             "small_correct": y == g, "label_prob": math.exp(sum(lp)), "logprobs": lp}
            for p, ex, g, y, d, lp in zip(c.prompts, c.examples, c.golds, preds, c.domains,
                                          lps, strict=True)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    tmp.replace(cache)
    return rows, False


def _small_only(rows: Sequence[Mapping[str, Any]], golds: Sequence[str],
                labels: Sequence[str], small: np.ndarray) -> dict[str, Any]:
    """The small model alone: classification metrics, in-scope accuracy, oos recall."""
    from fleetlm.tune.evaluate import classification_metrics

    oos = np.array([g == "oos" for g in golds], dtype=bool)
    return {
        **classification_metrics([r["prediction"] for r in rows], golds, labels),
        "in_scope_accuracy": float(small[~oos].mean()) if (~oos).any() else None,
        "oos_recall": float(small[oos].mean()) if oos.any() else None,
        "oos_predicted": int(sum(r["prediction"] == "oos" for r in rows)),
        "not_a_label": int(sum(r["prediction"] not in labels for r in rows)),
        "n_in_scope": int((~oos).sum()), "n_oos": int(oos.sum()),
    }


@dataclasses.dataclass
class _ClincScores:
    reports: list[RouterReport]
    confidence: np.ndarray  # each row's confidence score
    oracle: Curve
    cv_folds: int
    overhead: dict[str, dict[str, Any]]
    embed_s: dict[str, float]
    notes: list[str]


def _clinc_scores(prompts: list[str], rows: Sequence[Mapping[str, Any]], small: np.ndarray,
                  large: np.ndarray, base: str, *, folds: int, seed: int, C: float,
                  embedding_models: Sequence[str], embedders: Mapping[str, Embedder] | None,
                  cache_dir: Path | None, overhead_samples: int,
                  say: Callable[[str], None]) -> _ClincScores:
    """Confidence, cross-validated classifiers, random and the oracle on the rows."""
    label_prob = np.array([r["label_prob"] for r in rows], dtype=np.float64)
    reports: list[RouterReport] = []
    confidence = ConfidencePolicy()
    conf = np.array([confidence.score(RouteContext(p, label_prob=lp))
                     for p, lp in zip(prompts, label_prob, strict=True)])
    reports.append(evaluate_scores("confidence", conf, small, large))
    # StratifiedKFold needs `folds` rows of the rarer outcome (the small model's mistakes)
    rarer = int(min(small.sum(), (~small).sum()))
    cv_folds = min(folds, rarer)
    notes: list[str] = []
    overhead: dict[str, dict[str, Any]] = {}
    embed_s: dict[str, float] = {}
    if cv_folds < 2:
        notes.append(f"classifier skipped: only {rarer} row(s) of the rarer outcome (small "
                     f"model right or wrong); cross-validation needs 2 or more")
    else:
        if cv_folds < folds:
            notes.append(f"classifier: {cv_folds}-fold CV (only {rarer} rows of the rarer "
                         f"outcome for {folds} folds)")
        for model_id in embedding_models:
            inner = (embedders or {}).get(model_id) or load_embedder(model_id)
            t = time.perf_counter()
            x = CachedEmbedder(inner, cache_dir).embed(prompts).astype(np.float64)
            embed_s[model_id] = time.perf_counter() - t
            s = cross_val_scores(x, small, large, cv_folds, seed, "large_needed", C, model_id)
            reports.append(evaluate_scores(f"classifier [{model_id}]", s, small, large))
            say(f"classifier [{model_id}]: embedded in {embed_s[model_id]:.1f}s, "
                f"{cv_folds}-fold CV done")
            overhead[f"classifier [{model_id}]"] = measure_overhead(
                x, small, large, prompts, model_id, "large_needed", C, overhead_samples, seed,
                embedder=inner)
    overhead["confidence"] = confidence_overhead(
        prompts, [r["logprobs"] for r in rows], _vocab_size(base), overhead_samples, seed)
    rnd = RandomPolicy(seed)
    reports.append(evaluate_scores("random", [rnd.score(RouteContext(p)) for p in prompts],
                                   small, large))
    oracle = oracle_curve(small, large)
    reports.append(report_from_curve("oracle", oracle, len(prompts)))
    return _ClincScores(reports, conf, oracle, cv_folds, overhead, embed_s, notes)


def _write_outcomes(path: Path, rows: Sequence[Mapping[str, Any]], conf: np.ndarray) -> None:
    """Per-row outcomes, score = the confidence: what ``fleetlm route calibrate`` reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r, score in zip(rows, conf, strict=True):
            f.write(json.dumps({"prompt": r["prompt"], "small_correct": r["small_correct"],
                                "large_correct": True, "score": float(score),
                                "domain": r["domain"], "label": r["label"],
                                "prediction": r["prediction"]}, ensure_ascii=False) + "\n")


def _clinc_lines(small_only: Mapping[str, Any], small_s: float, cached: bool, n_rows: int,
                 threads: int, sc: _ClincScores, outcomes: Path, plot_path: Path) -> list[str]:
    """The summary under the tables: the small model alone, timings, overheads, notes."""
    alone = [f"in-scope {small_only['in_scope_accuracy']:.1%} of {small_only['n_in_scope']}"
             if small_only["in_scope_accuracy"] is not None else "",
             f"oos recall {small_only['oos_recall']:.1%} of {small_only['n_oos']}"
             if small_only["oos_recall"] is not None else ""]
    lines = [f"small model alone: accuracy {small_only['accuracy']:.1%} "
             f"({', '.join(a for a in alone if a)}), macro-F1 {small_only['macro_f1']:.3f}",
             f"small-model pass: {small_s:.1f}s" + (" (cached)" if cached else
                                                     f" with the model load, "
                                                     f"{n_rows / small_s:.1f} rows/s"),
             f"router overhead per request ({threads} thread(s), model time excluded):"]
    for name, o in sc.overhead.items():
        lines.append(f"  {name}: p50 {o['p50']:.3f} ms  p99 {o['p99']:.3f} ms")
    pt = sc.overhead["confidence"]["sampler_per_token"]
    lines.append(f"  (confidence also makes the sampler compute log-probs: p50 {pt['p50']:.3f} ms "
                 f"per answer token, {sc.overhead['confidence']['answer_tokens_mean']:.1f} tokens "
                 f"per answer)")
    lines += sc.notes
    lines += [f"outcomes (for `fleetlm route calibrate --data FILE --policy confidence`): "
              f"{outcomes}", f"plot: {plot_path}"]
    return lines


def run_clinc150(adapter: str = "clinc150", folds: int = 5, out: Path | None = None,
                 plot: Path | None = None, data_dir: Path | None = None,
                 adapters_dir: Path | None = None, base_model: str | None = None,
                 embedding_models: Sequence[str] = (MINILM_STATIC_ID, MINILM_ID),
                 embedders: Mapping[str, Embedder] | None = None, C: float = 1.0, seed: int = 0,
                 cache_dir: Path | None = None, limit: int | None = None, threads: int = 1,
                 overhead_samples: int = 200, show_progress: bool = True,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The ``adapter`` (tuned on CLINC150) as the small model, the large model counted correct
    whenever a row is escalated: hybrid accuracy against share escalated for ``confidence``,
    cross-validated ``classifier`` (one per embedding model), ``random`` and the oracle.

    ``limit`` keeps N rows chosen by :func:`stratified_head` (every label in turn, oos
    included). ``embedders`` replaces :func:`load_embedder` per model id (tests). Writes, beside
    ``out`` (``bench-results/route-clinc150.*`` without it): the cached small-model pass
    (``.small-KEY.jsonl``), the per-row outcomes for ``fleetlm route calibrate``
    (``.outcomes.jsonl``: prompt, small_correct, large_correct, score = the confidence) and the
    PNG (``plot`` overrides); the JSON only with ``out``. Returns the JSON's dict.
    """
    from fleetlm.paths import default_adapters_dir

    say = log or (lambda s: print(s, file=sys.stderr))
    data_dir = data_dir if data_dir is not None else default_clinc_dir()
    adapters_dir = Path(adapters_dir if adapters_dir is not None else default_adapters_dir())
    problems = _check_clinc(data_dir, adapters_dir, adapter, folds, limit)
    if problems:
        raise ConfigError("invalid route benchmark settings: " + "; ".join(problems))
    c = _clinc_rows(adapter, data_dir, adapters_dir, base_model, limit)

    # --- the small model (cached) ---
    stem = out.with_suffix("") if out is not None else Path("bench-results") / "route-clinc150"
    cache = _small_pass_cache(c, data_dir, stem)
    t0 = time.perf_counter()
    rows, cached = _small_model_rows(c, adapter, adapters_dir, cache, show_progress, say)
    small_s = time.perf_counter() - t0
    small = np.array([r["small_correct"] for r in rows], dtype=bool)
    large = np.ones(len(rows), dtype=bool)  # the large model is not run: escalated = correct
    small_only = _small_only(rows, c.golds, c.labels, small)

    # --- scores ---
    import torch

    torch.set_num_threads(threads)
    sc = _clinc_scores(c.prompts, rows, small, large, c.base, folds=folds, seed=seed, C=C,
                       embedding_models=embedding_models, embedders=embedders,
                       cache_dir=cache_dir, overhead_samples=overhead_samples, say=say)
    reports = sc.reports
    targets = {r.name: target_summary(r) for r in reports}

    # --- outputs ---
    outcomes = stem.with_name(stem.name + ".outcomes.jsonl")
    _write_outcomes(outcomes, rows, sc.confidence)
    plot_path = plot if plot is not None else stem.with_suffix(".png")
    plot_curves({r.name: r.curve for r in reports if r.name != "oracle"}, plot_path,
                title=f"Routing on CLINC150 validation ({len(c.prompts)} rows): {adapter} "
                      f"adapter as the small model", oracle=sc.oracle,
                small_label=f"always small ({adapter} on {c.base})",
                large_label="always large (counted correct)")
    lines = _clinc_lines(small_only, small_s, cached, len(rows), threads, sc, outcomes,
                         plot_path)
    print(f"\nroute bench: CLINC150 validation ({len(c.prompts)} rows"
          + (f", stratified --limit {limit}" if limit is not None else "")
          + f"), {adapter} adapter as the small model, large counted correct when escalated\n"
          f"{format_report(reports)}\n\n{format_targets(reports, targets)}\n" + "\n".join(lines))

    result: dict[str, Any] = {
        "bench": "route", "dataset": "clinc150", "data": [str(data_dir / f) for f in CLINC_FILES],
        "adapter": adapter, "adapter_dir": str(c.folder), "base_model": c.base,
        "n": len(c.prompts), "limit": limit,
        "limit_rule": "stratified: the first row of every label in turn",
        "folds": sc.cv_folds, "seed": seed, "C": C,
        "large_model": "not run; counted correct when escalated",
        "target": {"accuracy": TARGET_ACCURACY, "max_share_escalated": TARGET_SHARE},
        "small_only": small_only, "acc_small": reports[0].acc_small,
        "acc_large": reports[0].acc_large,
        "routers": [{**r.as_dict(), **targets[r.name]} for r in reports],
        "overhead_ms": sc.overhead, "threads": threads, "embed_seconds": sc.embed_s,
        "small_pass": {"seconds": small_s, "cached": cached, "file": str(cache)},
        "outcomes": str(outcomes), "plot": str(plot_path), "notes": sc.notes,
        "environment": environment(),
    }
    write_json(result, out)
    return result
