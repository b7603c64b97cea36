"""presidio's synthetic PII set (``synth_dataset_v2_train.json``) split into a train part
and a validation part, the same way for every caller.

A learned recognizer trains on ``train``; ``fleetlm bench pii`` measures on ``val``. The
two never share a template (``template_id``): the generator fills each template many
times with different values, so a row from a validation template seen in training would
measure memorised sentence frames, not detection.

The rule (deterministic, no randomness, stdlib only):

1. Each template is put in a group named after its *rarest* entity type, rarest meaning
   held by the fewest templates of the whole file (ties by name); templates without any
   span form the group ``""``.
2. Within a group, templates are ordered by the SHA-256 of their decimal id (a fixed
   shuffle, so neighbouring ids -- often variants of one sentence -- do not all land on
   the same side).
3. The first ``round(n / 5)`` templates of a group of ``n`` go to validation, at least
   one when ``n >= 2`` and none when ``n == 1``.

So about a fifth of the templates of every kind is held out, including the rare
structured types: a plain ``template_id % 5 == 0`` leaves no e-mail address, SSN or IP
address in validation, and their recall could not be measured there. A group of one
template (on the shared file: the only US driver's licence template) stays in train.
On the shared 1,000-row file this gives 44 validation templates out of 207: 226 rows
(23%) and 452 gold spans (774 rows in train).

This module reads JSON and nothing else; it knows nothing about detection or scoring.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["DATA_RELATIVE", "default_synthetic_path", "load_rows", "synthetic_split",
           "validation_templates"]

DATA_RELATIVE = Path("shared/data/pii/synth_dataset_v2_train.json")  # beside the repo
VALIDATION_SHARE = 5  # one template in five


def default_synthetic_path() -> Path:
    """``../shared/data/pii/synth_dataset_v2_train.json`` beside the repository root
    (src/fleetlm/privacy/eval/synthetic.py -> parents[4]), else relative to the working
    folder."""
    beside_repo = Path(__file__).resolve().parents[4].parent / DATA_RELATIVE
    return beside_repo if beside_repo.exists() else Path("..") / DATA_RELATIVE


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The file's rows, as stored (a JSON list of objects)."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def _digest(template_id: int) -> str:
    return hashlib.sha256(str(template_id).encode()).hexdigest()


def validation_templates(rows: list[dict[str, Any]]) -> frozenset[int]:
    """The template ids held out for validation; see the module docstring for the rule."""
    types_of: dict[int, set[str]] = {}
    for row in rows:
        types = types_of.setdefault(int(row["template_id"]), set())
        types.update(str(s["entity_type"]) for s in row["spans"])
    templates_with: Counter[str] = Counter(t for types in types_of.values() for t in types)
    groups: dict[str, list[int]] = {}
    for tid, types in types_of.items():
        rarest = min(types, key=lambda t: (templates_with[t], t)) if types else ""
        groups.setdefault(rarest, []).append(tid)
    held: set[int] = set()
    for tids in groups.values():
        n = len(tids)
        k = 0 if n < 2 else max(1, round(n / VALIDATION_SHARE))
        held.update(sorted(tids, key=_digest)[:k])
    return frozenset(held)


def synthetic_split(path: Path | None = None
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, val)`` rows of the synthetic set at ``path`` (default: the shared file),
    disjoint by ``template_id``, each in file order."""
    rows = load_rows(path if path is not None else default_synthetic_path())
    held = validation_templates(rows)
    train = [r for r in rows if int(r["template_id"]) not in held]
    val = [r for r in rows if int(r["template_id"]) in held]
    return train, val
