"""The transformers baselines on a tiny random Llama: metric keys, and that the adapter
baselines decode the same greedy tokens as each other (and not the base model's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fleetlm.bench.hf_baselines import (
    METRIC_KEYS,
    hf_continuous_batching,
    peft_mixed_batches,
    peft_switching,
)
from fleetlm.bench.workload import make_adapter_set
from fleetlm.models.loader import read_config

PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12], [3, 3, 3, 7]]  # uneven: left padding
ASSIGN: list[int | None] = [0, None, 1, 0]
NEW = 3


@pytest.fixture(scope="module")
def folder(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def adapters(folder, tmp_path_factory) -> list[Path]:
    # std 0.5: large enough that the tiny model's greedy tokens change
    return make_adapter_set(tmp_path_factory.mktemp("adapters"), read_config(folder), 2, std=0.5)


def _check_metrics(r: dict, n: int) -> None:
    assert "error" not in r, r.get("error")
    assert set(METRIC_KEYS) <= set(r)
    assert r["requests_completed"] == n and r["generated_tokens"] == n * NEW
    assert [len(o) for o in r["outputs"]] == [NEW] * n
    assert r["wall_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / r["wall_s"], rel=0.01)
    assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] <= 1000 * r["wall_s"] + 1
    assert 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
    assert r["peak_rss_mb"] > 50 and r["notes"]


@pytest.fixture(scope="module")
def base_tokens(folder) -> list[list[int]]:
    return peft_switching(folder, [], PROMPTS, [None] * 4, max_new_tokens=NEW, dtype=torch.float32)["outputs"]


def test_switching_and_mixed_batches_decode_the_same_adapter_tokens(folder, adapters, base_tokens):
    switching = peft_switching(folder, adapters, PROMPTS, ASSIGN, NEW, dtype=torch.float32)
    # adapters may be given by folder name too, and only the folders used
    by_name = [None if a is None else adapters[a].name for a in ASSIGN]
    mixed = peft_mixed_batches(folder, adapters[::-1], PROMPTS, by_name, 3, NEW, dtype=torch.float32)
    for r in (switching, mixed):
        _check_metrics(r, 4)
        assert r["adapters_loaded"] == 2
    assert switching["outputs"] == mixed["outputs"]
    for i, a in enumerate(ASSIGN):  # adapters change the tokens; the adapter-free row does not
        assert (switching["outputs"][i] == base_tokens[i]) == (a is None)
    # the base model's own run has the same shape of results
    assert len(base_tokens) == 4


def test_continuous_batching_matches_plain_generate(folder, base_tokens):
    r = hf_continuous_batching(folder, PROMPTS, 2, NEW, dtype=torch.float32)
    _check_metrics(r, 4)
    assert r["outputs"] == base_tokens
    assert "max_requests_per_batch': 2" in r["notes"]


@pytest.mark.parametrize("which", ["switching", "mixed", "continuous"])
def test_bfloat16_works(folder, adapters, which):
    kw = {"max_new_tokens": NEW, "dtype": torch.bfloat16}
    r = {"switching": lambda: peft_switching(folder, adapters, PROMPTS, ASSIGN, **kw),
         "mixed": lambda: peft_mixed_batches(folder, adapters, PROMPTS, ASSIGN, 4, **kw),
         "continuous": lambda: hf_continuous_batching(folder, PROMPTS, 4, **kw)}[which]()
    _check_metrics(r, 4)
    assert r["dtype"] == "bfloat16"


def test_eos_neither_stops_nor_is_avoided(folder, base_tokens, tmp_path):
    # make the first greedy token of request 0 the end-of-sequence token
    eos = base_tokens[0][0]
    shutil.copytree(folder, tmp_path / "m")
    for name in ("config.json", "generation_config.json"):
        path = tmp_path / "m" / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg["eos_token_id"] = eos
            path.write_text(json.dumps(cfg))
    kw = {"max_new_tokens": NEW, "dtype": torch.float32}
    for r in (peft_switching(tmp_path / "m", [], PROMPTS, [None] * 4, **kw),
              peft_mixed_batches(tmp_path / "m", [], PROMPTS, [None] * 4, 4, **kw),
              hf_continuous_batching(tmp_path / "m", PROMPTS, 4, **kw)):
        assert r["outputs"] == base_tokens, r["name"]


def test_time_budget_skips_the_remaining_requests(folder, adapters):
    kw = {"max_new_tokens": NEW, "dtype": torch.float32, "time_budget_s": 0.0}
    one = peft_switching(folder, adapters, PROMPTS, ASSIGN, **kw)
    assert one["requests_completed"] == 1 and "3 requests skipped" in one["notes"]
    wave = peft_mixed_batches(folder, adapters, PROMPTS, ASSIGN, 2, **kw)
    assert wave["requests_completed"] == 2 and wave["generated_tokens"] == 2 * NEW


def test_bad_assignment_is_rejected(folder, adapters):
    with pytest.raises(ValueError, match="only 2 adapter folders"):
        peft_switching(folder, adapters, PROMPTS, [0, 1, 2, 0], max_new_tokens=NEW, dtype=torch.float32)
    with pytest.raises(ValueError, match="'a005', which is not among"):
        peft_switching(folder, adapters, PROMPTS, [0, "a005", None, 0], NEW, dtype=torch.float32)
    with pytest.raises(ValueError, match="3 adapter assignments for 4 prompts"):
        peft_mixed_batches(folder, adapters, PROMPTS, [0, 1, 0], 2, max_new_tokens=NEW, dtype=torch.float32)


def test_peak_rss_sees_memory_that_is_freed_again():
    import time

    from fleetlm.bench.rss import PeakRSS, rss_bytes

    with PeakRSS(interval_s=0.005) as m:
        x = torch.ones(64 * 2**20)  # 64 Mi float32 = 256 MiB, written so it is resident
        time.sleep(0.05)
        del x
    assert m.peak_bytes - m.start_bytes > 200 * 2**20
    assert rss_bytes() < m.peak_bytes
