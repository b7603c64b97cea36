"""Decide which synthetic rows are good enough to train on.

    synthetic rows --normalise--> --length [filter.min_chars, filter.max_chars]-->
    --dedup against the data rows and each other (exact, and word-set Jaccard >=
    filter.dedup_threshold)--> --classification with filter.confirm_labels: the teacher
    labels the text again, the row stays only if it gets its own label back-->
    --anonymise (when prepare.anonymize)--> FilterResult

Length and dedup judge the same *prompt text* as :mod:`fleetlm.tune.prepare` and reuse
its functions, so data rows and synthetic rows are held to one definition of
"duplicate". Every dropped row is counted under one reason. The label check asks the
same :class:`~fleetlm.tune.synthesize.Teacher` (at temperature 0) that wrote the rows:
it catches texts that drifted to another intent, not a teacher's systematic mistakes.

This module knows nothing about how the rows were generated.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from fleetlm.tune.config import TuneConfig
from fleetlm.tune.prepare import (
    Deduper,
    Progress,
    Redactor,
    anonymize_rows,
    default_redactor,
    length_verdict,
    normalize_row,
    prompt_text,
    word_frequencies,
)
from fleetlm.tune.records import Example
from fleetlm.tune.synthesize import Teacher, http_client, require_teacher

CONFIRM_MAX_TOKENS = 48  # a label name, with room for a model that adds a few words


@dataclass
class FilterResult:
    kept: list[Example]
    report: dict[str, Any]


_DECOR = " \t`\"'“”‘’*."  # quotes, markdown emphasis, a final period
_LABEL_PREFIX = re.compile(r"^(label|answer|intent|category|class)\s*[:=-]\s*", re.IGNORECASE)


def normalize_label(s: str) -> str:
    """What a label answer is compared by: its first line, without quotes, a 'Label:'
    prefix or a final period, casefolded, whitespace collapsed."""
    s = next((line for line in s.strip().splitlines() if line.strip()), "")
    s = _LABEL_PREFIX.sub("", s.strip(_DECOR)).strip(_DECOR)
    return " ".join(s.split()).casefold()


def confirm_messages(text: str, labels: Sequence[str], description: str) -> list[dict[str, str]]:
    shown = "\n".join(f"- {label}" for label in labels)
    user = ((f"Task: {description}\n" if description else "")
            + f"Classify the text into exactly one of these labels:\n{shown}\n\n"
            + f"Text: {text}\n\nAnswer with the label only, spelled exactly as in the list.")
    return [{"role": "system", "content": "You are a careful text classifier."},
            {"role": "user", "content": user}]


async def filter_synthetic(synthetic: list[Example], existing: list[Example], cfg: TuneConfig,
                           *, client: httpx.AsyncClient | None = None,
                           redactor: Redactor | None = None,
                           progress: Progress | None = None) -> FilterResult:
    """The synthetic rows worth keeping, and why the others were dropped.

    ``existing``: the prepared training *and* validation rows, so that a synthetic row
    repeating a validation row cannot leak it into training."""
    f = cfg.filter
    classification = cfg.task.type == "classification"
    confirm = classification and f.confirm_labels
    teacher_cfg = require_teacher(cfg, "filter.confirm_labels (or set filter.confirm_labels: "
                                  "false)") if confirm and synthetic else None
    if cfg.prepare.anonymize and redactor is None and synthetic:
        redactor = default_redactor()
    counts: Counter[str] = Counter()

    rows = [normalize_row(ex) for ex in synthetic] if cfg.prepare.normalize else list(synthetic)
    survivors = []
    for ex in rows:
        why = length_verdict(ex, f.min_chars, f.max_chars)
        if why is None:
            survivors.append(ex)
        else:
            counts[why] += 1

    texts = [prompt_text(ex) for ex in existing]
    freq = word_frequencies([*texts, *(prompt_text(ex) for ex in survivors)])
    dd = Deduper("near", f.dedup_threshold, freq)
    for i, t in enumerate(texts):
        dd.add(t, i)
    unique: list[Example] = []
    for ex in survivors:
        t = prompt_text(ex)
        m = dd.match(t)
        if m is not None:
            counts[f"duplicate_{m[0]}"] += 1
            continue
        dd.add(t, len(texts) + len(unique))
        unique.append(ex)

    stats: dict[str, Any] = {}
    if confirm and unique:
        assert teacher_cfg is not None
        labels = list(cfg.task.labels) if cfg.task.labels is not None else sorted(
            {ex.label for ex in [*existing, *unique] if ex.label is not None})
        by_norm = {normalize_label(label): label for label in labels}
        done = 0
        async with http_client(client, teacher_cfg) as http:
            teacher = Teacher(teacher_cfg, http, concurrency=cfg.synthesize.concurrency)

            async def check(ex: Example) -> str:
                nonlocal done
                reply = await teacher.chat(
                    confirm_messages(prompt_text(ex), labels, cfg.task.description.strip()),
                    temperature=0.0, max_tokens=min(CONFIRM_MAX_TOKENS, teacher_cfg.max_tokens))
                done += 1
                if progress is not None:
                    progress("confirm_labels", done, len(unique))
                if reply is None:
                    return "confirm_failed"
                got = by_norm.get(normalize_label(reply))
                if got is None:
                    return "label_unparsable"
                return "ok" if got == ex.label else "label_mismatch"

            verdicts = await asyncio.gather(*(check(ex) for ex in unique))
        stats = teacher.stats.report()
        for v in verdicts:
            if v != "ok":
                counts[v] += 1
        unique = [ex for ex, v in zip(unique, verdicts, strict=True) if v == "ok"]

    anonymized = 0
    if cfg.prepare.anonymize and unique:
        assert redactor is not None
        unique, anonymized = anonymize_rows(unique, redactor, classification, progress)

    report: dict[str, Any] = {"rows_in": len(synthetic)}
    for key in ("empty", "too_short", "too_long", "duplicate_exact", "duplicate_near",
                "label_mismatch", "label_unparsable", "confirm_failed"):
        report[key] = counts[key]
    report["anonymized_rows"] = anonymized
    report["kept"] = len(unique)
    if stats:
        report["teacher"] = stats
    return FilterResult(kept=unique, report=report)
