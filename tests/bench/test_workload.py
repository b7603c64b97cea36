"""The adapter benchmark's workload: prompts, adapter popularity, random adapter folders."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from fleetlm.adapters.peft_format import projection_dims
from fleetlm.bench.workload import (
    ALL_PROJECTIONS,
    AdapterWorkload,
    assign_adapters,
    make_adapter_set,
    make_prompts,
)
from fleetlm.errors import ConfigError
from fleetlm.models.loader import read_config


class WordTokenizer:
    """One id per whitespace-separated word: enough to test windows over REFERENCE_TEXT."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}


def test_default_workload_is_valid_and_every_bad_field_is_named():
    AdapterWorkload().validate()
    bad = AdapterWorkload(num_requests=0, concurrency=0, num_adapters=-1, popularity="pareto",
                          zipf_s=0.0, rank=0)
    with pytest.raises(ConfigError) as e:
        bad.validate()
    for name in ("num_requests", "concurrency", "num_adapters", "popularity", "zipf_s", "rank"):
        assert name in str(e.value)


def test_prompts_are_exact_distinct_windows_and_deterministic():
    tok = WordTokenizer()
    prompts = make_prompts(tok, 256, 64, seed=0)
    assert len(prompts) == 256 and all(len(p) == 64 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 256
    assert make_prompts(tok, 256, 64, seed=0) == prompts
    assert make_prompts(tok, 256, 64, seed=1) != prompts
    # longer than the text: it repeats, every prompt still full length
    long = make_prompts(tok, 3, 2000, seed=0)
    assert [len(p) for p in long] == [2000] * 3


def test_no_adapters_means_none_for_every_request():
    assert assign_adapters(5, 0, "zipf", seed=0) == [None] * 5


def test_uniform_uses_every_adapter_evenly_in_shuffled_order():
    picks = assign_adapters(256, 64, "uniform", seed=0)
    counts = Counter(picks)
    assert set(counts) == set(range(64)) and set(counts.values()) == {4}
    assert picks != sorted(picks) and picks == assign_adapters(256, 64, "uniform", seed=0)
    odd = Counter(assign_adapters(10, 4, "uniform", seed=3))
    assert set(odd) == set(range(4)) and max(odd.values()) - min(odd.values()) <= 1


def test_zipf_makes_the_first_adapter_the_most_popular():
    picks = assign_adapters(256, 64, "zipf", seed=0, zipf_s=1.0)
    counts = Counter(picks)
    assert counts.most_common(1)[0][0] == 0
    assert counts[0] > 5 * max(counts.get(i, 0) for i in range(32, 64))
    assert len(counts) < 64  # skewed: the tail is not all used by 256 requests
    assert picks == assign_adapters(256, 64, "zipf", seed=0, zipf_s=1.0)
    with pytest.raises(ConfigError, match="popularity"):
        assign_adapters(4, 2, "pareto", seed=0)


def test_adapter_set_is_peft_format_on_all_projections_and_cached(tiny_checkpoints, tmp_path):
    from peft import LoraConfig

    cfg = read_config(tiny_checkpoints["llama"])
    dirs = make_adapter_set(tmp_path, cfg, 3, rank=4, seed=0)
    assert [d.name for d in dirs] == ["a000", "a001", "a002"]
    lc = LoraConfig.from_pretrained(str(dirs[0]))
    assert lc.r == 4 and lc.lora_alpha == 8 and set(lc.target_modules) == set(ALL_PROJECTIONS)
    w = load_file(str(dirs[0] / "adapter_model.safetensors"))
    dims = projection_dims(cfg)
    assert len(w) == 2 * 7 * cfg.num_layers
    for name in ALL_PROJECTIONS:
        part = "self_attn" if name[0] in "qkvo" else "mlp"
        key = f"base_model.model.model.layers.1.{part}.{name}"
        in_f, out_f = dims[name]
        assert w[f"{key}.lora_A.weight"].shape == (4, in_f)
        assert w[f"{key}.lora_B.weight"].shape == (out_f, 4)
        assert w[f"{key}.lora_B.weight"].abs().sum() > 0  # not PEFT's zero init
    other = load_file(str(dirs[1] / "adapter_model.safetensors"))
    assert not torch.equal(next(iter(w.values())), next(iter(other.values())))

    # same spec: reused untouched, and a smaller set is a prefix of the larger one
    stamp = (dirs[2] / "adapter_model.safetensors").stat().st_mtime_ns
    again = make_adapter_set(tmp_path, cfg, 2, rank=4, seed=0)
    assert again == dirs[:2]
    assert (dirs[2] / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    # another spec: regenerated
    make_adapter_set(tmp_path, cfg, 1, rank=4, seed=1)
    assert json.loads((tmp_path / "adapter_set.json").read_text())["seed"] == 1
    assert not (tmp_path / "a002").exists()
    changed = load_file(str(dirs[0] / "adapter_model.safetensors"))
    assert not torch.equal(changed[next(iter(w))], next(iter(w.values())))


def test_adapter_set_loads_into_peft_and_changes_the_output(tiny_checkpoints, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoints["llama"]
    dirs = make_adapter_set(tmp_path, read_config(folder), 1, rank=16, std=0.5)
    x = torch.tensor([[1, 2, 3, 4]])
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        base = model(x).logits
        peft = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a000").eval()
        adapted = peft(x).logits
    assert not torch.allclose(base, adapted, atol=1e-3)
