"""The default detector (PiiConfig(): fleetlm's and presidio's pattern recognizers and the
learned recognizer, int8) on a fixed sample of both evaluation sets, asserted with a
margin. A regression test, not a timing test: when detection changes, these numbers move,
and the figures in docs/privacy.md must be measured again (`fleetlm bench pii`)."""

from __future__ import annotations

import pytest

from fleetlm.bench.pii import Span, load_set, score
from fleetlm.privacy.eval.synthetic import default_synthetic_path

pytestmark = pytest.mark.slow

SAMPLE = 100  # first examples of each set
MARGIN = 0.03
# the default PiiConfig on the first 100 examples of each set, 2026-12-06, with the shipped
# weights (typed overall precision/recall/F2, any-type recall, share of gold spans in the
# clear). Before issue 14 (spaCy's NER, presidio's recognizers): support-v1 0.839 / 0.701 /
# 0.725 / 0.593 / 0.361, synthetic-val 0.717 / 0.485 / 0.519 / 0.384 / 0.526.
EXPECTED = {
    "support-v1": {"precision": 0.964, "recall": 0.928, "f2": 0.935, "any_recall": 0.814,
                   "in_clear": 0.160},
    "synthetic-val": {"precision": 0.795, "recall": 0.860, "f2": 0.846, "any_recall": 0.732,
                      "in_clear": 0.226},
}


def _figures(name: str) -> dict[str, float]:
    from fleetlm.privacy import PiiRedactor

    ds = load_set(name, SAMPLE)
    redactor = PiiRedactor()
    preds = [[Span(s.start, s.end, s.entity_type) for s in spans]
             for spans in redactor.iter_spans([t for t, _ in ds.rows])]
    res = score(ds.rows, preds, redactor.config.entities)
    overall = res["typed"]["overall"]
    return {"precision": overall["precision"], "recall": overall["recall"], "f2": overall["f2"],
            "any_recall": res["any_type"]["recall"], "in_clear": res["in_clear"]["share"]}


@pytest.mark.parametrize("name", ["support-v1", "synthetic-val"])
def test_detector_figures_on_a_fixed_sample(name: str):
    if name.startswith("synthetic") and not default_synthetic_path().is_file():
        pytest.skip("the shared synthetic set is not beside the repository")
    got = _figures(name)
    for key, want in EXPECTED[name].items():
        assert got[key] == pytest.approx(want, abs=MARGIN), (name, key, got)
