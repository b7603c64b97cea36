"""Span-level precision, recall and F2 per entity type, with the overlap rule of
``fleetlm bench pii``: a predicted span is correct when it overlaps (by at least one
character) a gold span of the same type; a gold span is found when a predicted span of
its type overlaps it. Not one-to-one: one predicted place over a whole address finds
each of its gold pieces. F2 weighs recall four times (a missed name leaks).

Used by ``fleetlm privacy train`` to report the model alone on the validation split.
Plain Python; knows nothing about models.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from fleetlm.privacy.learned.labels import CharSpan


def _overlaps(a: CharSpan, b: CharSpan) -> bool:
    return a.start < b.end and b.start < a.end


def prf(correct: int, predicted: int, found: int, gold: int) -> dict[str, Any]:
    """The figures of one row; None where a denominator is 0."""
    p = correct / predicted if predicted else None
    r = found / gold if gold else None
    f2 = None
    if p is not None and r is not None:
        f2 = 5 * p * r / (4 * p + r) if 4 * p + r > 0 else 0.0
    return {"gold": gold, "predicted": predicted, "precision": p, "recall": r, "f2": f2}


def span_scores(gold: Sequence[Sequence[CharSpan]], pred: Sequence[Sequence[CharSpan]]
                ) -> dict[str, dict[str, Any]]:
    """Per entity type and ``overall``: gold and predicted counts, precision, recall, F2."""
    n_gold: Counter[str] = Counter()
    found: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    for g_spans, p_spans in zip(gold, pred, strict=True):
        for g in g_spans:
            n_gold[g.entity_type] += 1
            found[g.entity_type] += any(p.entity_type == g.entity_type and _overlaps(p, g)
                                        for p in p_spans)
        for p in p_spans:
            n_pred[p.entity_type] += 1
            correct[p.entity_type] += any(p.entity_type == g.entity_type and _overlaps(p, g)
                                          for g in g_spans)
    out = {t: prf(correct[t], n_pred[t], found[t], n_gold[t])
           for t in sorted(set(n_gold) | set(n_pred))}
    out["overall"] = prf(sum(correct.values()), sum(n_pred.values()),
                         sum(found.values()), sum(n_gold.values()))
    return out
