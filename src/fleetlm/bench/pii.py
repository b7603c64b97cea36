"""``fleetlm bench pii``: how much of a labelled PII dataset the redactor finds.

Runs :class:`fleetlm.privacy.PiiRedactor`'s detection (the spans ``redact`` would
replace, with the default :class:`PiiConfig`) over presidio's synthetic evaluation
set (``synth_dataset_v2_train.json``: sentences with gold spans) and reports span-level
precision, recall and F2 (recall weighted 4x: a missed name leaks, a spurious
placeholder only costs the remote model some context) per entity type and overall.

Matching rule: a predicted span and a gold span match when they overlap by at least
one character and the gold type, mapped by GOLD_TO_PRESIDIO, equals the predicted
type. Precision = predicted spans matching some gold span / predicted spans; recall =
gold spans matched by some predicted span / gold spans. Matching is not one-to-one:
one predicted LOCATION covering "450 Præstevænget 15, København V" recalls all three
gold pieces (the dataset splits addresses into house number, street and city).

Gold types the redactor cannot detect -- no presidio recognizer (AGE, TITLE,
ZIP_CODE), or not in the config's entities (DATE_TIME, ORGANIZATION, NRP, URL by
default) -- are left out of the per-type and overall figures and reported separately;
``overall_with_undetectable`` counts them as recall misses. ``any_type`` ignores
labels: is a gold span covered by any placeholder, is a placeholder on any gold span.

This module knows the dataset's format, not how detection works.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetlm.bench.common import environment, percentile, write_json
from fleetlm.config import StrictModel
from fleetlm.errors import ConfigError

# dataset type -> presidio type; None: presidio has no recognizer for it
GOLD_TO_PRESIDIO: dict[str, str | None] = {
    "PERSON": "PERSON",
    "GPE": "LOCATION",
    "STREET_ADDRESS": "LOCATION",
    "EMAIL_ADDRESS": "EMAIL_ADDRESS",
    "PHONE_NUMBER": "PHONE_NUMBER",
    "CREDIT_CARD": "CREDIT_CARD",
    "IBAN_CODE": "IBAN_CODE",
    "US_SSN": "US_SSN",
    "US_DRIVER_LICENSE": "US_DRIVER_LICENSE",
    "IP_ADDRESS": "IP_ADDRESS",
    "DATE_TIME": "DATE_TIME",
    "ORGANIZATION": "ORGANIZATION",
    "NRP": "NRP",
    "DOMAIN_NAME": "URL",
    "AGE": None,
    "TITLE": None,
    "ZIP_CODE": None,
}
DATA_RELATIVE = Path("shared/data/pii/synth_dataset_v2_train.json")  # beside the repo


def default_data_path() -> Path:
    """../shared/data/pii/synth_dataset_v2_train.json next to the repository root
    (src/fleetlm/bench/pii.py -> parents[3]), else relative to the working folder."""
    beside_repo = Path(__file__).resolve().parents[3].parent / DATA_RELATIVE
    return beside_repo if beside_repo.exists() else Path("..") / DATA_RELATIVE


class PiiBenchConfig(StrictModel):
    data: Path | None = None  # None = default_data_path()
    limit: int | None = None  # first N sentences
    latency_samples: int = 200  # sentences redacted one at a time for the per-request cost

    def check(self) -> Path:
        problems = []
        path = self.data if self.data is not None else default_data_path()
        if not path.is_file():
            problems.append(f"--data {path}: no such file; pass the path of presidio's "
                            "synth_dataset_v2_train.json (default: ../shared/data/pii/ "
                            "beside the repository)")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit={self.limit}: must be >= 1")
        if problems:
            raise ConfigError("invalid benchmark settings: " + "; ".join(problems))
        return path


@dataclass
class _Span:
    start: int
    end: int
    type: str


def load_dataset(path: Path, limit: int | None = None) -> list[tuple[str, list[_Span]]]:
    """(text, gold spans with the dataset's types) per sentence."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        out = []
        for row in rows[:limit]:
            text = row["full_text"]
            gold = [_Span(int(s["start_position"]), int(s["end_position"]), str(s["entity_type"]))
                    for s in row["spans"]]
            out.append((text, gold))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--data {path}: not a presidio synthetic dataset "
                          f"(a JSON list of rows with full_text and spans): {type(e).__name__}: {e}"
                          ) from e
    return out


def _overlap(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start < b_end and b_start < a_end


def _prf(tp_pred: int, n_pred: int, tp_gold: int, n_gold: int) -> dict[str, Any]:
    p = tp_pred / n_pred if n_pred else None
    r = tp_gold / n_gold if n_gold else None
    f2 = (5 * p * r / (4 * p + r) if p is not None and r is not None and (4 * p + r) > 0
          else (0.0 if p is not None and r is not None else None))
    return {"gold": n_gold, "predicted": n_pred, "gold_found": tp_gold, "predicted_correct": tp_pred,
            "precision": p, "recall": r, "f2": f2}


def score(rows: list[tuple[str, list[_Span]]], predictions: list[list[_Span]],
          entities: tuple[str, ...]) -> dict[str, Any]:
    """Span-level figures; see the module docstring for the matching rule."""
    n_gold: Counter[str] = Counter()
    found_gold: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    ok_pred: Counter[str] = Counter()
    raw_gold: Counter[str] = Counter()  # per dataset type
    raw_found: Counter[str] = Counter()
    raw_covered: Counter[str] = Counter()  # overlapped by a placeholder of any type
    any_gold = any_found = any_pred = any_ok = 0
    undetectable: Counter[str] = Counter()
    for (_, gold), pred in zip(rows, predictions, strict=True):
        for g in gold:
            mapped = GOLD_TO_PRESIDIO.get(g.type)
            hit = any(p.type == mapped and _overlap(p.start, p.end, g.start, g.end) for p in pred)
            raw_gold[g.type] += 1
            raw_found[g.type] += hit
            covered = any(_overlap(p.start, p.end, g.start, g.end) for p in pred)
            raw_covered[g.type] += covered
            any_gold += 1
            any_found += covered
            if mapped is None or mapped not in entities:
                undetectable[g.type] += 1
                continue
            n_gold[mapped] += 1
            found_gold[mapped] += hit
        for p in pred:
            n_pred[p.type] += 1
            ok_pred[p.type] += any(GOLD_TO_PRESIDIO.get(g.type) == p.type
                                   and _overlap(p.start, p.end, g.start, g.end) for g in gold)
            any_pred += 1
            any_ok += any(_overlap(p.start, p.end, g.start, g.end) for g in gold)
    types = sorted(set(n_gold) | set(n_pred))
    per_type = {t: _prf(ok_pred[t], n_pred[t], found_gold[t], n_gold[t]) for t in types}
    overall = _prf(sum(ok_pred.values()), sum(n_pred.values()),
                   sum(found_gold.values()), sum(n_gold.values()))
    with_undetectable = _prf(sum(ok_pred.values()), sum(n_pred.values()),
                             sum(found_gold.values()), sum(n_gold.values()) + sum(undetectable.values()))
    per_gold_type = {
        t: {"presidio_type": GOLD_TO_PRESIDIO.get(t), "gold": raw_gold[t], "found": raw_found[t],
            "recall": raw_found[t] / raw_gold[t], "covered_any_type": raw_covered[t],
            "detectable": t not in undetectable,
            "why_not": (None if t not in undetectable else
                        "no presidio recognizer" if GOLD_TO_PRESIDIO.get(t) is None else
                        "not in entities")}
        for t in sorted(raw_gold, key=lambda t: -raw_gold[t])}
    return {"per_type": per_type, "overall": overall,
            "overall_with_undetectable": with_undetectable,
            "any_type": _prf(any_ok, any_pred, any_found, any_gold),
            "per_gold_type": per_gold_type,
            "undetectable_gold": dict(undetectable)}


def run(cfg: PiiBenchConfig, out: Path | None) -> dict[str, Any]:
    from rich.console import Console

    from fleetlm.privacy import PiiConfig, PiiRedactor
    from fleetlm.progress import Progress

    path = cfg.check()
    rows = load_dataset(path, cfg.limit)
    # piped output is not cut to 80 columns
    console = Console(width=None if sys.stdout.isatty() else 120)
    redactor = PiiRedactor(PiiConfig())
    t0 = time.perf_counter()
    with console.status("Loading presidio and the spaCy model..."):
        redactor.load()
    load_s = time.perf_counter() - t0

    predictions: list[list[_Span]] = []
    t0 = time.perf_counter()
    with Progress("bench pii") as progress:
        update = progress.task("detecting PII", len(rows))
        for spans in redactor.iter_spans(text for text, _ in rows):
            predictions.append([_Span(s.start, s.end, s.entity_type) for s in spans])
            update(len(predictions))
    detect_s = time.perf_counter() - t0

    # the router's cost: one request's text redacted alone (no batching across requests),
    # then its answer restored, as an escalation with pii: redact does
    from fleetlm.privacy.restore import restore

    per_request: list[float] = []
    for text, _ in rows[:cfg.latency_samples]:
        t = time.perf_counter()
        redacted, mapping = redactor.redact(text)
        restore(redacted, mapping)
        per_request.append(1000 * (time.perf_counter() - t))

    results = score(rows, predictions, redactor.config.entities)
    data: dict[str, Any] = {
        "benchmark": "pii",
        "data": str(path),
        "sentences": len(rows),
        "config": {**{k: v for k, v in cfg.model_dump().items() if k != "data"},
                   "pii": redactor.config.model_dump(mode="json")},
        "matching": "a predicted span matches a gold span of the same mapped type if they "
                    "overlap by at least one character (not one-to-one)",
        "gold_to_presidio": GOLD_TO_PRESIDIO,
        "load_s": load_s,
        "detect_s": detect_s,
        "sentences_per_s": len(rows) / detect_s if detect_s > 0 else None,
        "per_request_ms": {"n": len(per_request), "p50": percentile(per_request, 50),
                           "p99": percentile(per_request, 99),
                           "what": "redact one text alone + restore it (an escalation's "
                                   "router overhead with pii: redact)"},
        **results,
        "environment": environment(),
    }
    _print(console, data)
    write_json(data, out)
    return data


def _print(console: Any, data: dict[str, Any]) -> None:
    from rich.table import Table

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    table = Table(title=f"PII detection, {data['sentences']} sentences "
                        f"(span overlap, same type)")
    for col in ("type", "gold", "predicted", "precision", "recall", "F2"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for t, r in data["per_type"].items():
        table.add_row(t, str(r["gold"]), str(r["predicted"]), f(r["precision"]), f(r["recall"]),
                      f(r["f2"]))
    table.add_section()
    for name, key in (("overall", "overall"), ("overall, undetectable as misses",
                                               "overall_with_undetectable"),
                      ("any type (redaction coverage)", "any_type")):
        r = data[key]
        table.add_row(f"[bold]{name}[/bold]", str(r["gold"]), str(r["predicted"]),
                      f(r["precision"]), f(r["recall"]), f(r["f2"]))
    console.print(table)

    gold = Table(title="recall per dataset type (covered: inside a placeholder of any type)")
    for col in ("dataset type", "presidio type", "gold", "found", "recall", "covered", "note"):
        gold.add_column(col, justify="left" if col in ("dataset type", "presidio type", "note")
                        else "right")
    for t, r in data["per_gold_type"].items():
        gold.add_row(t, r["presidio_type"] or "-", str(r["gold"]), str(r["found"]), f(r["recall"]),
                     str(r["covered_any_type"]), r["why_not"] or "")
    console.print(gold)
    console.print(f"detection {data['detect_s']:.1f} s ({data['sentences_per_s']:.0f} sentences/s), "
                  f"load {data['load_s']:.1f} s")
    lat = data["per_request_ms"]
    if lat["n"]:
        console.print(f"per request (one text redacted alone, then restored; {lat['n']} texts): "
                      f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms")
