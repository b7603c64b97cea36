"""``fleetlm bench prune`` on a tiny tuned run: merged -> pruned -> distilled, and the
pruned model tuned without distillation, each scored the same way; bad runs refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetlm.bench.prune import PruneBenchConfig, ratios, run
from fleetlm.errors import ConfigError
from fleetlm.tune.config import parse_config
from fleetlm.tune.pipeline import Pipeline
from tests.tune.test_pipeline import _config

pytestmark = pytest.mark.slow  # a tiny tune run, then five small stages (~20 s)


def test_bench_prune_measures_every_stage(tmp_path: Path, tiny_base: Path) -> None:
    raw = _config(tmp_path, tiny_base, train={"max_steps": 12, "eval_every": 6, "save_every": 6},
                  eval={"base_rows": 0, "few_shot": 0})
    res = Pipeline(parse_config(raw), quiet=True).run()
    out = tmp_path / "bench.json"
    cfg = PruneBenchConfig(run=res.run_dir, mlp=0.5, layers=1, calibration_rows=16,
                           distill_steps=3, distill_eval_rows=8, tune_steps=3, batch_size=4,
                           eval_rows=8,
                           decode_tokens=8, decode_repeats=1)
    r = run(cfg, out, say=lambda _: None)
    assert json.loads(out.read_text()) == json.loads(
        (res.run_dir / "bench-prune" / "bench-prune.json").read_text())
    models = r["models"]
    assert list(models) == ["merged", "pruned", "pruned+distilled",
                            "pruned+tuned (no distillation)"]
    merged = models["merged"]
    for name, m in models.items():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["eval_rows"] == 8, name
        assert m["eval_s"] > 0
        if name != "merged":  # half the MLP channels and one of two layers went (the
            # tiny model's parameters are mostly its embedding)
            assert m["parameters"] == models["pruned"]["parameters"] < merged["parameters"]
    assert models["pruned+tuned (no distillation)"]["adapter"] is not None
    assert models["pruned+tuned (no distillation)"]["decode_tok_s"] is None
    assert merged["decode_tok_s"] > 0 and models["pruned+distilled"]["decode_tok_s"] > 0
    assert r["prune"]["seconds"] > 0 and r["distill"]["seconds"] > 0
    rt = r["ratios"]
    assert rt["parameter_reduction"] == pytest.approx(
        1 - models["pruned+distilled"]["parameters"] / merged["parameters"])
    assert set(rt["targets_met"]) == {"parameters", "accuracy"}


def test_ratios_and_targets() -> None:
    models = {"merged": {"parameters": 100, "accuracy": 0.90, "decode_tok_s": 50.0},
              "pruned+distilled": {"parameters": 65, "accuracy": 0.895, "decode_tok_s": 70.0}}
    r = ratios(models)
    assert r["parameter_reduction"] == pytest.approx(0.35)
    assert r["accuracy_drop_distilled"] == pytest.approx(0.005)
    assert r["decode_speedup"] == pytest.approx(1.4)
    assert r["targets_met"] == {"parameters": True, "accuracy": True}
    models["pruned+distilled"]["accuracy"] = 0.88
    assert ratios(models)["targets_met"]["accuracy"] is False


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a finished fleetlm tune run"):
        run(PruneBenchConfig(run=tmp_path), None, say=lambda _: None)


def test_evaluation_rows_are_the_tune_runs_own_sample() -> None:
    """Not the first rows: a validation split of a file sorted by label holds few labels
    at its head. The sample is the one the tune run's evaluation draws for the same count."""
    import random
    from types import SimpleNamespace

    from fleetlm.bench.prune import eval_rows

    rows = list(range(100))
    tune = SimpleNamespace(seed=7)
    assert eval_rows(tune, rows, 30) == random.Random(7).sample(rows, 30)
    assert eval_rows(tune, rows, 30) != rows[:30]
    assert eval_rows(tune, rows, 500) == rows
