"""Score a tuned adapter (and the untuned base beside it) on the validation rows.

Generation runs through fleetlm's own batching engine -- the code that will serve the
adapter -- so the figures are those users get. Classification output is constrained to
the label set (``response_format`` type ``choice``): accuracy, macro-F1 and a confusion
matrix. Generation tasks: exact match and ROUGE-L (F-measure over whitespace tokens).
The base is scored zero-shot (labels listed in the prompt) and few-shot (plus ``k``
solved training rows as earlier turns).

This module knows prompts and metrics; it does not know how the adapter was made.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetlm.tune.config import TaskConfig
from fleetlm.tune.format import prompt_ids, task_messages
from fleetlm.tune.records import Example


@dataclass
class EvalResult:
    name: str  # "tuned", "base zero-shot", "base few-shot (k=5)"
    rows: int
    metrics: dict[str, float]
    predictions: list[str]
    references: list[str]


def generate_all(engine: Any, prompts: list[list[int]], params: Any, adapter: str | None,
                 progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Greedy answers of ``prompts`` through ``engine`` (driven on this thread)."""
    texts: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    errors: list[str] = []
    done = 0
    next_i = 0

    def callback(i: int) -> Callable[[Any], None]:
        def on(ev: Any) -> None:
            nonlocal done
            texts[i].append(ev.text)
            if ev.finish_reason is not None:
                done += 1
                if ev.finish_reason == "error":
                    errors.append(f"row {i}: {ev.error}")
        return on

    limit = engine.config.max_running * 2  # keep the queue short: submit as rows finish
    while done < len(prompts):
        while next_i < len(prompts) and next_i - done < limit:
            engine.submit(prompts[next_i], params, adapter=adapter, callback=callback(next_i))
            next_i += 1
        engine.step()
        if progress:
            progress(done, len(prompts))
    if errors:
        raise RuntimeError("evaluation failed: " + "; ".join(errors[:3]))
    return ["".join(texts[i]).strip() for i in range(len(prompts))]


def classification_metrics(preds: Sequence[str], refs: Sequence[str], labels: Sequence[str]
                           ) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(refs, preds)),
            "macro_f1": float(f1_score(refs, preds, labels=list(labels), average="macro",
                                       zero_division=0))}


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over whitespace tokens (longest common subsequence)."""
    a, b = pred.split(), ref.split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def generation_metrics(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    n = max(1, len(refs))
    em = sum(p.strip() == r.strip() for p, r in zip(preds, refs, strict=True)) / n
    rl = sum(rouge_l(p, r) for p, r in zip(preds, refs, strict=True)) / n
    return {"exact_match": em, "rouge_l": rl}


def pick_shots(train: Sequence[Example], k: int, seed: int) -> list[Example]:
    """``k`` training rows, of different labels where there are labels."""
    rng = random.Random(seed)
    rows = list(train)
    rng.shuffle(rows)
    shots: list[Example] = []
    seen: set[str | None] = set()
    for ex in rows:
        if len(shots) == k:
            break
        if ex.label is not None and ex.label in seen:
            continue
        seen.add(ex.label)
        shots.append(ex)
    return shots


def eval_requests(tok: Any, rows: Sequence[Example], task: TaskConfig,
                  labels: Sequence[str] | None, *, list_labels: bool = False,
                  shots: Sequence[Example] = (), max_new_tokens: int = 64
                  ) -> tuple[list[list[int]], Any]:
    """The prompt ids of ``rows`` and the greedy sampling parameters evaluation asks with
    (classification: constrained to the label set)."""
    from fleetlm.engine.sampling_params import SamplingParams

    shown = labels if list_labels else None
    prompts = [prompt_ids(tok, task_messages(ex, task, labels=shown, shots=shots)) for ex in rows]
    if task.type == "classification":
        assert labels is not None, "classification needs its label set"
        # the grammar also accepts a label split into other tokens than the tokenizer's own
        # (a model may take that path); every token is at least one byte, so a label's bytes
        # bound its tokens and no answer is cut off mid-label
        longest = max(len(lb.encode()) for lb in labels)
        return prompts, SamplingParams(max_tokens=longest + 1, temperature=0.0,
                                       response_format={"type": "choice",
                                                        "choices": list(labels)})
    return prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0)


def evaluate(engine: Any, rows: Sequence[Example], task: TaskConfig, labels: Sequence[str] | None,
             *, adapter: str | None, name: str, list_labels: bool = False,
             shots: Sequence[Example] = (), max_new_tokens: int = 64,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Answer every row with ``adapter`` (None: the base) and score the answers."""
    prompts, params = eval_requests(engine.lm.tokenizer, rows, task, labels,
                                    list_labels=list_labels, shots=shots,
                                    max_new_tokens=max_new_tokens)
    preds = generate_all(engine, prompts, params, adapter, progress)
    refs = [ex.answer for ex in rows]
    metrics = (classification_metrics(preds, refs, labels) if labels is not None
               else generation_metrics(preds, refs))
    return EvalResult(name, len(rows), metrics, preds, refs)


def confusion_png(result: EvalResult, labels: Sequence[str], path: Path) -> None:
    """Confusion matrix of a classification result (rows: truth, columns: prediction)."""
    from sklearn.metrics import confusion_matrix

    from fleetlm.plots import png

    cm = confusion_matrix(result.references, result.predictions, labels=list(labels))
    n = len(labels)
    size = min(24.0, max(6.0, n * 0.22))
    with png(path, (size, size)) as (_, ax):
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(n), labels=list(labels), rotation=90, fontsize=max(4, 10 - n // 15))
        ax.set_yticks(range(n), labels=list(labels), fontsize=max(4, 10 - n // 15))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        acc = result.metrics.get("accuracy", 0.0)
        ax.set_title(f"{result.name}: accuracy {acc:.3f} on {result.rows} validation rows")


def loss_png(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Training loss per step, validation loss per evaluation and (right axis) the
    validation rows greedy decoding answers exactly."""
    from fleetlm.plots import png

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    with png(path, (7, 4)) as (_, ax):
        if train:
            ax.plot(*zip(*train, strict=True), label="train (answer tokens)", lw=1)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="validation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy")
        ax.legend(loc="upper left")
        acc = [(h["step"], h["val_accuracy"]) for h in history if "val_accuracy" in h]
        if acc:
            right = ax.twinx()
            right.plot(*zip(*acc, strict=True), "s--", color="tab:green",
                       label="validation greedy accuracy")
            right.set_ylabel("accuracy")
            right.set_ylim(0, 1)
            right.legend(loc="upper right")
