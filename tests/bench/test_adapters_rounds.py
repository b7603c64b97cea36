"""bench adapters' interleaved rounds: per setting the median run, and ratios taken within
each round (the machine's speed drifts between rounds)."""

from __future__ import annotations

from fleetlm.bench.adapters import _median_runs


def _run(tps: float, tag: str) -> dict:
    return {"tokens_per_s": tps, "tag": tag}


def test_median_runs_pick_the_median_and_ratio_within_rounds():
    settings = [(64, "uniform")]
    rounds = [
        {None: _run(200.0, "b1"), (64, "uniform"): _run(150.0, "a1")},  # 0.75
        {None: _run(100.0, "b2"), (64, "uniform"): _run(90.0, "a2")},   # 0.90: a slow round
        {None: _run(180.0, "b3"), (64, "uniform"): _run(144.0, "a3")},  # 0.80
    ]
    base, adapters = _median_runs(rounds, settings)
    assert base["tag"] == "b3" and base["num_adapters"] == 0 and base["popularity"] is None
    assert base["tokens_per_s_runs"] == [200.0, 100.0, 180.0]
    assert adapters["tag"] == "a3" and adapters["tokens_per_s"] == 144.0
    assert adapters["vs_no_adapters_runs"] == [0.75, 0.9, 0.8]
    assert adapters["vs_no_adapters"] == 0.8  # not 144 / 180 by chance: the median ratio
    assert (adapters["num_adapters"], adapters["popularity"]) == (64, "uniform")


def test_one_round_is_the_plain_ratio():
    rounds = [{None: _run(200.0, "b"), (8, "zipf"): _run(150.0, "a")}]
    base, adapters = _median_runs(rounds, [(8, "zipf")])
    assert adapters["vs_no_adapters"] == 0.75 and adapters["tokens_per_s_runs"] == [150.0]
