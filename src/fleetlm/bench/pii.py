"""``fleetlm bench pii``: how much personal data in labelled text the redactor hides,
on several data sets, and what detection costs per message and per escalated request.

Data sets (``--data``, repeatable): ``synthetic-val`` (default; the validation part of
presidio's synthetic ``synth_dataset_v2_train.json``, split by template, see
:mod:`fleetlm.privacy.eval.synthetic`), ``support-v1`` (default; the hand-labelled
support texts of :mod:`fleetlm.privacy.eval`), ``synthetic-train``, ``synthetic-all``, or
the path of any file in the synthetic set's format (scored whole).

Each set's texts go through :class:`fleetlm.privacy.PiiRedactor`'s detection (the spans
``redact`` would replace, batched) and are scored span by span (RULES below, stated in the
JSON too):

- **typed**: a gold span counts as found when placeholders of its compatible type
  (GOLD_TO_PRESIDIO) cover every letter and digit of it; a placeholder is correct when it
  overlaps a gold span of its type. Precision, recall, F2 (recall weighted 4x: a missed
  name leaks, a spurious placeholder only costs the remote model some context) per type
  and overall. ``overall`` counts the gold types the config can detect;
  ``overall_all_gold`` counts every gold span.
- **any type**: the same with labels ignored (is the gold span hidden at all).
- **in the clear**: gold spans that no placeholder overlaps at all.

Matching is not one-to-one: one LOCATION over ``450 Præstevænget 15, København V``
covers three gold pieces (the synthetic set splits addresses into house number, street
and city). Latency: detection of 100-word messages made by concatenating consecutive
examples of the set, one message per call; the round trip: a four-message chat request
redacted under one mapping and an answer quoting its placeholders restored, whole and
streamed. This module knows the datasets' format and the scoring, not how detection works.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from fleetlm.bench.common import environment, percentile, write_json
from fleetlm.config import StrictModel, format_errors, load_yaml, problems_error
from fleetlm.errors import ConfigError
from fleetlm.privacy.config import PiiConfig

# dataset type -> presidio type whose placeholder counts as finding it; None: presidio
# has no recognizer for it (a placeholder of another type still hides it: any-type rule)
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
    "US_PASSPORT": "US_PASSPORT",
    "US_BANK_NUMBER": "US_BANK_NUMBER",
    "IP_ADDRESS": "IP_ADDRESS",
    "DATE_TIME": "DATE_TIME",
    "ORGANIZATION": "ORGANIZATION",
    "NRP": "NRP",
    "URL": "URL",
    "DOMAIN_NAME": "URL",
    "AGE": "AGE",
    "TITLE": "TITLE",
    "ZIP_CODE": "ZIP_CODE",
}
RULES = {
    "typed": "a gold span counts as found when placeholders (predicted spans) of its compatible "
             "type (gold_to_presidio) cover every letter and digit of it; a placeholder counts "
             "as correct when it overlaps a gold span of its type by at least one character; "
             "not one-to-one",
    "typed_overlap": "recall_overlap: a gold span counts as found when a placeholder of its "
                     "compatible type overlaps it by at least one character (the rule of the "
                     "figures before issue 14)",
    "any_type": "the typed rule with types ignored: a gold span is found when placeholders of "
                "any type cover every letter and digit of it; a placeholder is correct when it "
                "overlaps any gold span",
    "in_clear": "a gold span is left entirely in the clear when no placeholder overlaps it at all",
    "overall": "overall counts the gold types the detector is configured for (pii.entities, via "
               "gold_to_presidio); overall_all_gold counts every gold span, the rest as misses",
    "f2": "F2 = 5PR / (4P + R)",
}
KEY_TYPES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE")
TARGETS = {"f2_min": 0.90, "key_recall_min": 0.97, "in_clear_share_max": 0.01,
           "latency_p50_ms_max": 10.0, "latency_p99_ms_max": 50.0}
DEFAULT_SETS = ("synthetic-val", "support-v1")
NAMED_SETS = ("synthetic-val", "synthetic-train", "synthetic-all", "support-v1")
MESSAGE_WORDS = 100
# the fixed system prompt of the round-trip request: no personal data, typical length
SYSTEM_PROMPT = ("You are the support assistant of an online shop. Answer the customer's last "
                 "message politely and briefly, and keep every name, number and reference "
                 "exactly as written.")
STREAM_CHUNK_CHARS = 4  # a streamed answer's delta size, about one token


class PiiBenchConfig(StrictModel):
    data: list[str] = Field(default_factory=lambda: list(DEFAULT_SETS))
    limit: int | None = None  # first N examples of each set
    latency_messages: int = 200  # 100-word messages timed per set (at most one per example)
    chat_requests: int = 200  # round trips timed per set (at most one per example)
    pii: PiiConfig = Field(default_factory=PiiConfig)

    def check(self) -> list[DataSet]:
        """The data sets, loaded; every problem at once, each naming its option."""
        problems = []
        if not self.data:
            problems.append("--data: name at least one data set: " + ", ".join(NAMED_SETS)
                            + " or the path of a file in the synthetic set's format")
        for flag, value in (("--limit", self.limit), ("--latency-messages", self.latency_messages),
                            ("--chat-requests", self.chat_requests)):
            if value is not None and value < (1 if flag == "--limit" else 0):
                problems.append(f"{flag}={value}: must be >= {1 if flag == '--limit' else 0}")
        sets = []
        for spec in self.data:
            try:
                sets.append(load_set(spec, self.limit))
            except ConfigError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError("invalid benchmark settings: " + "; ".join(problems))
        return sets


def load_pii_config(path: Path) -> PiiConfig:
    """A PiiConfig from YAML (``--pii-config``), errors naming the key."""
    raw = load_yaml(path, missing=f"--pii-config {path}: no such file; pass a YAML file of "
                                  "PiiConfig keys (see docs/privacy.md), or leave it out")
    try:
        return PiiConfig.model_validate(raw or {})
    except ValidationError as e:
        raise problems_error(str(path), "PII config", format_errors(e, "docs/privacy.md")) from None


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    type: str


@dataclass
class DataSet:
    name: str
    path: Path
    selection: str  # which rows of the file, in words
    rows: list[tuple[str, list[Span]]]  # (text, gold spans with the dataset's types)


def parse_rows(rows: list[Any], path: Path) -> list[tuple[str, list[Span]]]:
    try:
        return [(str(row["full_text"]),
                 [Span(int(s["start_position"]), int(s["end_position"]), str(s["entity_type"]))
                  for s in row["spans"]]) for row in rows]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--data {path}: not in presidio's synthetic-set format (a JSON list "
                          f"of rows with full_text and spans): {type(e).__name__}: {e}") from e


def load_set(spec: str, limit: int | None = None) -> DataSet:
    """A named set (NAMED_SETS) or a file, first ``limit`` examples."""
    from fleetlm.privacy.eval import support_v1_path
    from fleetlm.privacy.eval.synthetic import default_synthetic_path, synthetic_split

    if spec.startswith("synthetic-") and spec in NAMED_SETS:
        path = default_synthetic_path()
        if not path.is_file():
            raise ConfigError(f"--data {spec}: {path} not found; put presidio's "
                              "synth_dataset_v2_train.json in ../shared/data/pii/ beside the "
                              "repository, or pass its path with --data PATH (scored whole)")
        train, val = synthetic_split(path)
        raw, selection = {"synthetic-val": (val, "validation split by template "
                                                 "(fleetlm.privacy.eval.synthetic)"),
                          "synthetic-train": (train, "train split by template "
                                                     "(fleetlm.privacy.eval.synthetic)"),
                          "synthetic-all": (train + val, "every row")}[spec]
        return DataSet(spec, path, selection, parse_rows(raw, path)[:limit])
    path = support_v1_path() if spec == "support-v1" else Path(spec)
    if not path.is_file():
        raise ConfigError(f"--data {spec}: no such file; pass {', '.join(NAMED_SETS)} or the "
                          "path of a file in presidio's synthetic-set format")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--data {path}: not readable JSON: {type(e).__name__}: {e}") from e
    if not isinstance(raw, list):
        raise ConfigError(f"--data {path}: not in presidio's synthetic-set format "
                          "(a JSON list of rows with full_text and spans)")
    name = spec if spec == "support-v1" else path.stem
    return DataSet(name, path, "every row", parse_rows(raw, path)[:limit])


# --- scoring -------------------------------------------------------------------------------

def _overlap(a: Span, b: Span) -> bool:
    return a.start < b.end and b.start < a.end


def _covered(text: str, gold: Span, preds: list[Span]) -> bool:
    """Every letter and digit of ``gold`` (every character, if it has none) lies inside one
    of ``preds``: placeholders side by side hide a value as well as one over all of it."""
    chars = [i for i in range(gold.start, gold.end) if text[i].isalnum()]
    return all(any(p.start <= i < p.end for p in preds)
               for i in chars or range(gold.start, gold.end))


def _prf(tp_pred: int, n_pred: int, tp_gold: int, n_gold: int) -> dict[str, Any]:
    p = tp_pred / n_pred if n_pred else None
    r = tp_gold / n_gold if n_gold else None
    f2 = (None if p is None or r is None else
          5 * p * r / (4 * p + r) if 4 * p + r > 0 else 0.0)
    return {"gold": n_gold, "predicted": n_pred, "gold_found": tp_gold,
            "predicted_correct": tp_pred, "precision": p, "recall": r, "f2": f2}


def _why_not(gold_type: str, entities: tuple[str, ...]) -> str | None:
    mapped = GOLD_TO_PRESIDIO.get(gold_type)
    if gold_type not in GOLD_TO_PRESIDIO:
        return "type unknown to gold_to_presidio"
    if mapped is None:
        return "no presidio recognizer"
    return None if mapped in entities else "not in entities"


def score(rows: list[tuple[str, list[Span]]], predictions: list[list[Span]],
          entities: tuple[str, ...]) -> dict[str, Any]:
    """Span-level figures of ``predictions`` (presidio types) against the gold spans
    (dataset types); RULES says how they are counted."""
    c: dict[str, Counter[str]] = {k: Counter() for k in (
        "gold", "found", "overlapped", "pred", "pred_ok",  # typed, per presidio type
        "raw", "raw_found", "raw_covered", "raw_clear")}  # per dataset type
    any_pred = any_ok = 0
    for (text, gold), pred in zip(rows, predictions, strict=True):
        for g in gold:
            mapped = GOLD_TO_PRESIDIO.get(g.type)
            typed = [p for p in pred if p.type == mapped]
            found = _covered(text, g, typed)
            c["raw"][g.type] += 1
            c["raw_found"][g.type] += found
            c["raw_covered"][g.type] += _covered(text, g, pred)
            c["raw_clear"][g.type] += not any(_overlap(p, g) for p in pred)
            if _why_not(g.type, entities) is None:
                assert mapped is not None
                c["gold"][mapped] += 1
                c["found"][mapped] += found
                c["overlapped"][mapped] += any(_overlap(p, g) for p in typed)
        for p in pred:
            c["pred"][p.type] += 1
            c["pred_ok"][p.type] += any(GOLD_TO_PRESIDIO.get(g.type) == p.type and _overlap(p, g)
                                        for g in gold)
            any_pred += 1
            any_ok += any(_overlap(p, g) for g in gold)

    def typed_row(keys: list[str], n_gold: int | None = None) -> dict[str, Any]:
        n = sum(c["gold"][t] for t in keys) if n_gold is None else n_gold
        row = _prf(sum(c["pred_ok"][t] for t in keys), sum(c["pred"][t] for t in keys),
                   sum(c["found"][t] for t in keys), n)
        over = sum(c["overlapped"][t] for t in keys)
        return {**row, "gold_overlapped": over, "recall_overlap": over / n if n else None}

    types = sorted(set(c["gold"]) | set(c["pred"]))
    n_all = sum(c["raw"].values())
    n_clear = sum(c["raw_clear"].values())
    n_detectable = sum(c["gold"].values())
    clear_detectable = sum(c["raw_clear"][t] for t in c["raw"] if _why_not(t, entities) is None)
    per_type = {t: typed_row([t]) for t in types}
    key = {t: per_type[t]["recall"] if t in per_type else None for t in KEY_TYPES}
    measured = [r for r in key.values() if r is not None]
    return {
        "typed": {"per_type": per_type, "overall": typed_row(types),
                  "overall_all_gold": typed_row(types, n_all)},
        "any_type": _prf(any_ok, any_pred, sum(c["raw_covered"].values()), n_all),
        "in_clear": {"gold": n_all, "in_clear": n_clear,
                     "share": n_clear / n_all if n_all else None,
                     "detectable_gold": n_detectable, "detectable_in_clear": clear_detectable,
                     "detectable_share": clear_detectable / n_detectable if n_detectable else None},
        "key_recall": {"types": key, "min": min(measured) if measured else None,
                       "gold": {t: c["gold"][t] for t in KEY_TYPES}},
        "per_gold_type": {
            t: {"presidio_type": GOLD_TO_PRESIDIO.get(t), "gold": c["raw"][t],
                "found": c["raw_found"][t], "recall": c["raw_found"][t] / c["raw"][t],
                "covered_any_type": c["raw_covered"][t], "in_clear": c["raw_clear"][t],
                "detectable": _why_not(t, entities) is None, "why_not": _why_not(t, entities)}
            for t in sorted(c["raw"], key=lambda t: (-c["raw"][t], t))},
        "undetectable_gold": {t: n for t, n in c["raw"].items()
                              if _why_not(t, entities) is not None},
    }


def targets_met(result: dict[str, Any]) -> dict[str, bool | None]:
    """Each target of TARGETS against one set's result; None where it could not be measured."""
    f2 = result["typed"]["overall"]["f2"]
    key = result["key_recall"]["min"]
    clear = result["in_clear"]["share"]
    lat = result.get("latency_100_words_ms") or {}
    return {
        "f2": None if f2 is None else f2 >= TARGETS["f2_min"],
        "key_recall": None if key is None else key >= TARGETS["key_recall_min"],
        "in_clear": None if clear is None else clear < TARGETS["in_clear_share_max"],
        "latency_p50": (None if lat.get("p50") is None
                        else lat["p50"] <= TARGETS["latency_p50_ms_max"]),
        "latency_p99": (None if lat.get("p99") is None
                        else lat["p99"] <= TARGETS["latency_p99_ms_max"]),
    }


# --- what is timed ---------------------------------------------------------------------------

def hundred_word_messages(texts: list[str], n: int, words: int = MESSAGE_WORDS) -> list[str]:
    """Up to ``n`` messages of exactly ``words`` whitespace-separated words: message i is
    examples i, i+1, ... (wrapping around) joined by spaces, cut after the last word."""
    total = sum(len(t.split()) for t in texts)
    if total == 0:
        return []
    out = []
    for i in range(min(n, len(texts))):
        parts: list[str] = []
        have, j = 0, i
        while have < words:
            parts.append(texts[j % len(texts)])
            have += len(parts[-1].split())
            j += 1
        joined = " ".join(parts)
        ends = [m.end() for m in re.finditer(r"\S+", joined)]
        out.append(joined[:ends[words - 1]])
    return out


def chat_requests(texts: list[str], n: int) -> list[list[str]]:
    """Up to ``n`` chat requests' message texts: the system prompt, then examples i, i+1
    and i+2 as user, assistant and user turns."""
    if not texts:
        return []
    return [[SYSTEM_PROMPT, *(texts[(i + k) % len(texts)] for k in range(3))]
            for i in range(min(n, len(texts)))]


def _ms_summary(xs: list[float]) -> dict[str, Any]:
    return {"n": len(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99),
            "mean": sum(xs) / len(xs) if xs else None, "max": max(xs) if xs else None}


def time_detection(detect: Callable[[str], Any], messages: list[str]) -> dict[str, Any]:
    """Milliseconds per message, wall clock and CPU time of this process, one message per
    call (as one request is), after 3 untimed."""
    for m in messages[:3]:
        detect(m)
    times: list[float] = []
    cpu: list[float] = []
    for m in messages:
        t, c = time.perf_counter(), time.process_time()
        detect(m)
        times.append(1000 * (time.perf_counter() - t))
        cpu.append(1000 * (time.process_time() - c))
    # wall clock is what a request waits; CPU time is what it would wait on an idle core
    # (the two part when other work shares the cores)
    return {**_ms_summary(times), "cpu": _ms_summary(cpu), "words": MESSAGE_WORDS,
            "how": f"{MESSAGE_WORDS}-word messages built by concatenating consecutive examples of "
                   "the set (one message starting at each example, wrapping around) and cutting "
                   f"after the {MESSAGE_WORDS}th word; each detected alone, no batching"}


def time_round_trip(redactor: Any, requests: list[list[str]]) -> dict[str, Any]:
    """An escalation's privacy cost: every message redacted under one mapping (as the router
    does), then an answer quoting all the placeholders sent restored whole and streamed."""
    from fleetlm.privacy.mapping import PiiMapping
    from fleetlm.privacy.restore import StreamRestorer, restore

    redact_ms: list[float] = []
    restore_ms: list[float] = []
    total_ms: list[float] = []
    cpu_ms: list[float] = []
    words: list[float] = []
    exact = 0
    for messages in requests:
        c0 = time.process_time()
        t0 = time.perf_counter()
        mapping = PiiMapping()
        safe = redactor.redact_many(messages, mapping)  # one batch, as the router does
        t1 = time.perf_counter()
        answer = " ".join(safe[1:])  # the remote model quotes every placeholder it got
        whole = restore(answer, mapping)
        stream = StreamRestorer(mapping)
        streamed = "".join(stream.feed(answer[k:k + STREAM_CHUNK_CHARS])
                           for k in range(0, len(answer), STREAM_CHUNK_CHARS)) + stream.flush()
        t2 = time.perf_counter()
        cpu_ms.append(1000 * (time.process_time() - c0))
        exact += whole == streamed == " ".join(messages[1:])
        redact_ms.append(1000 * (t1 - t0))
        restore_ms.append(1000 * (t2 - t1))
        total_ms.append(1000 * (t2 - t0))
        words.append(float(sum(len(m.split()) for m in messages)))
    return {"total": _ms_summary(total_ms), "redact": _ms_summary(redact_ms),
            "restore": _ms_summary(restore_ms), "total_cpu": _ms_summary(cpu_ms),
            "words_p50": percentile(words, 50),
            "restored_exactly": exact,
            "how": "4 messages (a fixed system prompt, then examples i, i+1, i+2 as user, "
                   "assistant, user) redacted one by one under one mapping; then an answer "
                   "quoting every redacted non-system message restored whole and streamed in "
                   f"{STREAM_CHUNK_CHARS}-character chunks"}


# --- the command -------------------------------------------------------------------------------

def run(cfg: PiiBenchConfig, out: Path | None) -> dict[str, Any]:
    from rich.console import Console

    from fleetlm.privacy import PiiRedactor

    data_sets = cfg.check()
    # piped output is not cut to 80 columns
    console = Console(width=None if sys.stdout.isatty() else 120)
    redactor = PiiRedactor(cfg.pii)
    t0 = time.perf_counter()
    with console.status("Loading presidio and the spaCy model..."):
        redactor.load()
    load_s = time.perf_counter() - t0
    sets: dict[str, dict[str, Any]] = {}
    for ds in data_sets:
        key = ds.name if ds.name not in sets else f"{ds.name}#{len(sets)}"
        sets[key] = run_set(redactor, ds, cfg)
    data: dict[str, Any] = {
        "benchmark": "pii",
        "rules": RULES,
        "targets": TARGETS,
        "key_types": list(KEY_TYPES),
        "config": cfg.model_dump(mode="json"),
        "gold_to_presidio": GOLD_TO_PRESIDIO,
        "load_s": load_s,
        "learned_model": _learned_model(cfg.pii),
        "sets": sets,
        "environment": environment(),
    }
    for name, r in sets.items():
        print_set(console, name, r)
    print_summary(console, data)
    write_json(data, out)
    return data


def _learned_model(pii: PiiConfig) -> dict[str, Any] | None:
    """Which learned-recognizer file ran, and its shape (None with ``ner: spacy``)."""
    if pii.ner == "spacy":
        return None
    from fleetlm.privacy.learned.model import load_learned

    ner = load_learned(pii.learned_model, pii.learned_precision)  # loaded already: cached
    return {"path": str(ner.path), "bytes": ner.path.stat().st_size, "layers": ner.meta.layers,
            "rank": ner.meta.rank, "precision": ner.precision}


def run_set(redactor: Any, ds: DataSet, cfg: PiiBenchConfig) -> dict[str, Any]:
    """Detection over one set (batched), its scores, and the two timings."""
    from fleetlm.progress import Progress

    texts = [text for text, _ in ds.rows]
    predictions: list[list[Span]] = []
    t0 = time.perf_counter()
    with Progress("bench pii") as progress:
        update = progress.task(f"detecting PII in {ds.name}", len(texts))
        for spans in redactor.iter_spans(texts):
            predictions.append([Span(s.start, s.end, s.entity_type) for s in spans])
            update(len(predictions))
    detect_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "data": str(ds.path), "selection": ds.selection, "examples": len(ds.rows),
        "words": sum(len(t.split()) for t in texts),
        "detect_s": detect_s, "examples_per_s": len(texts) / detect_s if detect_s > 0 else None,
        **score(ds.rows, predictions, redactor.config.entities),
    }
    messages = hundred_word_messages(texts, cfg.latency_messages)
    result["latency_100_words_ms"] = time_detection(
        lambda m: list(redactor.iter_spans([m])), messages)
    result["chat_round_trip_ms"] = time_round_trip(redactor,
                                                   chat_requests(texts, cfg.chat_requests))
    result["targets_met"] = targets_met(result)
    return result


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def print_set(console: Any, name: str, r: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"PII detection, {name}: {r['examples']} examples, {r['words']} words "
                        "(found: covered by placeholders of its type)")
    for col in ("type", "gold", "predicted", "precision", "recall", "F2", "recall (overlap)"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for t, row in r["typed"]["per_type"].items():
        table.add_row(t, str(row["gold"]), str(row["predicted"]), _f(row["precision"]),
                      _f(row["recall"]), _f(row["f2"]), _f(row["recall_overlap"]))
    table.add_section()
    for label, row in (("overall", r["typed"]["overall"]),
                       ("overall, every gold span", r["typed"]["overall_all_gold"]),
                       ("any type (hidden at all)", r["any_type"])):
        table.add_row(f"[bold]{label}[/bold]", str(row["gold"]), str(row["predicted"]),
                      _f(row["precision"]), _f(row["recall"]), _f(row["f2"]),
                      _f(row.get("recall_overlap")))
    console.print(table)
    gold = Table(title=f"{name}: per dataset type (covered: by a placeholder of any type; "
                       "in clear: no placeholder overlaps it)")
    for col in ("dataset type", "presidio type", "gold", "found", "recall", "covered",
                "in clear", "note"):
        gold.add_column(col, justify="left" if col in ("dataset type", "presidio type", "note")
                        else "right")
    for t, row in r["per_gold_type"].items():
        gold.add_row(t, row["presidio_type"] or "-", str(row["gold"]), str(row["found"]),
                     _f(row["recall"]), str(row["covered_any_type"]), str(row["in_clear"]),
                     row["why_not"] or "")
    console.print(gold)
    clear, lat, rt = r["in_clear"], r["latency_100_words_ms"], r["chat_round_trip_ms"]
    console.print(f"in the clear: {clear['in_clear']}/{clear['gold']} gold spans "
                  f"({_f(clear['share'])}; target < {TARGETS['in_clear_share_max']})")
    console.print("key recall: " + ", ".join(f"{t} {_f(v)}" for t, v in
                                             r["key_recall"]["types"].items())
                  + f" (target >= {TARGETS['key_recall_min']})")
    console.print(f"detection {r['detect_s']:.1f} s ({r['examples_per_s'] or 0:.0f} examples/s, "
                  f"batched); per {MESSAGE_WORDS}-word message ({lat['n']}): p50 {_ms(lat['p50'])} "
                  f"ms, p99 {_ms(lat['p99'])} ms (CPU time p50 {_ms(lat['cpu']['p50'])}, "
                  f"p99 {_ms(lat['cpu']['p99'])})")
    console.print(f"escalated chat request round trip ({rt['total']['n']}, "
                  f"~{rt['words_p50'] or 0:.0f} words): p50 {_ms(rt['total']['p50'])} ms, "
                  f"p99 {_ms(rt['total']['p99'])} ms (redact p50 {_ms(rt['redact']['p50'])}, "
                  f"restore p50 {_ms(rt['restore']['p50'])}; CPU time p50 "
                  f"{_ms(rt['total_cpu']['p50'])})")


def print_summary(console: Any, data: dict[str, Any]) -> None:
    from rich.table import Table

    t = TARGETS
    table = Table(title="PII targets per data set (typed overall; ✓ met, ✗ missed)")
    for col in ("set", f"F2 (>= {t['f2_min']})", f"min key recall (>= {t['key_recall_min']})",
                f"in clear (< {t['in_clear_share_max']})", "in clear, redacted types",
                f"p50 ms (<= {t['latency_p50_ms_max']:g})",
                f"p99 ms (<= {t['latency_p99_ms_max']:g})", "round trip p50 ms"):
        table.add_column(col, justify="left" if col == "set" else "right")

    def mark(ok: bool | None) -> str:
        return "" if ok is None else " ✓" if ok else " ✗"

    for name, r in data["sets"].items():
        met, lat = r["targets_met"], r["latency_100_words_ms"]
        table.add_row(name, _f(r["typed"]["overall"]["f2"]) + mark(met["f2"]),
                      _f(r["key_recall"]["min"]) + mark(met["key_recall"]),
                      _f(r["in_clear"]["share"]) + mark(met["in_clear"]),
                      _f(r["in_clear"]["detectable_share"]),
                      _ms(lat["p50"]) + mark(met["latency_p50"]),
                      _ms(lat["p99"]) + mark(met["latency_p99"]),
                      _ms(r["chat_round_trip_ms"]["total"]["p50"]))
    console.print(table)
    env = data["environment"]
    console.print(f"{env.get('cpu', '?')}, {env.get('cpu_count')} CPUs; load {data['load_s']:.1f} s")
    console.print("in clear: the share of all gold spans that no placeholder touches; "
                  "redacted types: of the gold spans whose type the config redacts")
