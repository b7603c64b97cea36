"""The synthetic set's train/validation split (fleetlm.privacy.eval.synthetic): deterministic,
disjoint by template, every kind of template held out, a group of one kept in train."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fleetlm.privacy.eval.synthetic import (
    default_synthetic_path,
    synthetic_split,
    validation_templates,
)


def _row(tid: int, *types: str) -> dict:
    return {"full_text": "x" * 10, "spans": [{"entity_type": t, "start_position": 0,
                                              "end_position": 1} for t in types],
            "template_id": tid}


def _file(tmp_path: Path) -> Path:
    rows = [_row(i, "PERSON") for i in range(20)]  # 20 name templates
    rows += [_row(100 + i, "PERSON", "EMAIL_ADDRESS") for i in range(3)]  # e-mail: rarer
    rows += [_row(200, "US_SSN"), _row(200, "US_SSN")]  # one template, twice
    rows += [_row(300), _row(301)]  # no spans
    rows += [_row(i, "PERSON") for i in range(5)]  # a template's second row
    path = tmp_path / "synth.json"
    path.write_text(json.dumps(rows))
    return path


def test_split_is_deterministic_and_disjoint_by_template(tmp_path: Path):
    path = _file(tmp_path)
    train, val = synthetic_split(path)
    assert (train, val) == synthetic_split(path)
    t_train = {r["template_id"] for r in train}
    t_val = {r["template_id"] for r in val}
    assert not t_train & t_val
    assert len(train) + len(val) == len(json.loads(path.read_text()))
    # every group keeps round(n/5) (at least one) of its templates out, in file order
    assert len(t_val & set(range(20))) == 4
    assert len(t_val & {100, 101, 102}) == 1
    assert len(t_val & {300, 301}) == 1
    assert 200 in t_train  # a group of one stays in train
    rows = json.loads(path.read_text())
    assert val == [r for r in rows if r["template_id"] in t_val]


def test_order_of_rows_does_not_change_the_split(tmp_path: Path):
    path = _file(tmp_path)
    rows = json.loads(path.read_text())
    assert validation_templates(rows) == validation_templates(rows[::-1])


@pytest.mark.skipif(not default_synthetic_path().is_file(),
                    reason="the shared synthetic set is not beside the repository")
def test_split_of_the_shared_file_is_pinned():
    """A learned recognizer trains on `train`: if these numbers move, its training data
    moved, and it must be retrained before its validation figures mean anything."""
    train, val = synthetic_split()
    assert (len(train), len(val)) == (774, 226)
    assert not {r["template_id"] for r in train} & {r["template_id"] for r in val}
    held = Counter(s["entity_type"] for r in val for s in r["spans"])
    for t in ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN",
              "IP_ADDRESS", "PERSON", "GPE", "STREET_ADDRESS"):
        assert held[t] > 0, t
    assert sorted({r["template_id"] for r in val})[:5] == [8, 9, 37, 39, 41]
