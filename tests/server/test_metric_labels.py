"""The ``model`` label of the server's metrics is bounded, whatever clients send (no model)."""

from __future__ import annotations

from fleetlm.server.metrics import MAX_UNKNOWN_MODEL_LABELS, OTHER_MODEL, ServerMetrics


def test_served_models_keep_their_name_and_unknown_ones_are_bounded():
    m = ServerMetrics()
    assert m.model_label("smollm2-135m", served=True) == "smollm2-135m"
    assert m.model_label("x" * 5000, served=True) == "x" * 5000  # served: the store checked it
    kept = [m.model_label(f"typo-{i}", served=False) for i in range(MAX_UNKNOWN_MODEL_LABELS)]
    assert kept == [f"typo-{i}" for i in range(MAX_UNKNOWN_MODEL_LABELS)]
    assert m.model_label("typo-0", served=False) == "typo-0"  # the same name, the same label
    assert m.model_label("one-more", served=False) == OTHER_MODEL
    for name in ("a" * 65, "bad\nname", "", "sp ace"):
        assert ServerMetrics().model_label(name, served=False) == OTHER_MODEL


def test_a_thousand_made_up_models_add_a_constant_number_of_series():
    m = ServerMetrics()
    for i in range(1000):
        m.refused.labels(model=m.model_label(f"m{i}", served=False), code="404").inc()
    series = [s for fam in m.registry.collect() if fam.name == "fleetlm_refused_requests"
              for s in fam.samples if s.name.endswith("_total")]
    assert len(series) == MAX_UNKNOWN_MODEL_LABELS + 1
    assert sum(s.value for s in series) == 1000
