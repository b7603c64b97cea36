"""``fleetlm select`` on two tiny bases (a Llama and a Gemma 3, both with SmolLM2's
tokenizer): each tuned and served alike, the table, the plot and a recommendation with its
reasons; the recommendation rule on its own; bad configs named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fleetlm.cli import app
from fleetlm.errors import ConfigError
from fleetlm.tune.select import load_select_config, recommend
from tests.tune.test_pipeline import _config


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory) -> Path:
    """A random 2-layer Gemma 3 over SmolLM2's tokenizer and chat template."""
    import torch
    import transformers

    from fleetlm.models.loader import resolve_source

    tok = transformers.AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))
    cfg = transformers.Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
        initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gemma")
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_configs(tmp: Path, bases: list[str], **select) -> Path:
    tune = _config(tmp, Path(bases[0]), train={"max_steps": 12, "eval_every": 6,
                                               "save_every": 6},
                   eval={"base_rows": 0, "few_shot": 0})
    (tmp / "tune.yaml").write_text(yaml.safe_dump(tune))
    cfg = {"tune": "tune.yaml", "candidates": bases, "latency_requests": 4,
           "throughput_requests": 8, "concurrency": 4, "compile": False,
           "cost_per_hour": 0.5, "output_dir": "select", **select}
    (tmp / "select.yaml").write_text(yaml.safe_dump(cfg))
    return tmp / "select.yaml"


def test_select_tunes_serves_and_recommends(tmp_path, tiny_base, tiny_gemma):
    bases = [str(tiny_base), str(tiny_gemma)]
    path = write_configs(tmp_path, bases)
    out = tmp_path / "out.json"
    r = CliRunner().invoke(app, ["select", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["metric"] == "accuracy" and [c["base"] for c in report["candidates"]] == bases
    for c in report["candidates"]:
        assert 0.0 <= c["quality"] <= 1.0 and c["quality"] == c["metrics"]["accuracy"]
        assert c["latency_ms_p50"] > 0 and c["latency_ms_p90"] >= c["latency_ms_p50"]
        assert c["requests_per_s"] > 0 and c["memory_bytes"] > 0
        assert c["cost_per_1m_requests"] == pytest.approx(0.5 / (c["requests_per_s"] * 3600) * 1e6)
        assert c["train_tokens_per_s"] > 0 and c["compiled"] is False
        # the candidate's adapter went to the selection's folder, not the user's store
        assert Path(c["adapter"]).parent == tmp_path / "select" / Path(c["base"]).name / "adapters"
        assert (Path(c["adapter"]) / "adapter_model.safetensors").is_file()
    assert report["recommendation"] in bases and len(report["reasons"]) == 2
    assert report["reasons"][0].startswith(report["recommendation"])
    assert (tmp_path / "select" / "select.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "select" / "select.json").read_text()) == report
    assert "recommended:" in r.output and "cost per 1M requests" in r.output


def row(base: str, q: float, cost: float, lat: float = 10.0) -> dict:
    return {"base": base, "quality": q, "cost_per_1m_requests": cost, "latency_ms_p50": lat}


def test_recommend_takes_the_cheapest_within_the_tolerance():
    rows = [row("big", 0.90, 2.0), row("small", 0.895, 1.0), row("tiny", 0.70, 0.1)]
    pick, why = recommend(rows, "accuracy", 0.01)
    assert pick == "small"
    assert "within 0.01 of the best (big, 0.900)" in why[0]
    assert any(w.startswith("not big") and "2.0x the cost" in w for w in why)
    assert any(w.startswith("not tiny") and "0.195 accuracy behind" in w for w in why)
    pick, why = recommend(rows, "accuracy", 0.0)
    assert pick == "big" and "the best" in why[0]
    assert any(w.startswith("not small") and "0.005 accuracy behind" in w for w in why)


def test_bad_select_configs_name_the_field(tmp_path, tiny_base):
    path = write_configs(tmp_path, [str(tiny_base), str(tiny_base)])
    with pytest.raises(ConfigError, match="candidates.*listed twice"):
        load_select_config(path)
    path = write_configs(tmp_path, [str(tiny_base)], cost_per_hour=0, budget=3)
    with pytest.raises(ConfigError) as e:
        load_select_config(path)
    assert "cost_per_hour" in str(e.value) and "budget: unknown key" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_select_config(tmp_path / "nope.yaml")
    raw = yaml.safe_load(path.read_text())
    raw.update(tune="missing.yaml", cost_per_hour=1, budget=None)
    del raw["budget"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_select_config(path)
    raw.update(tune="tune.yaml")
    path.write_text(yaml.safe_dump(raw))
    tune = yaml.safe_load((tmp_path / "tune.yaml").read_text())
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump({**tune, "eval": {"enabled": False}}))
    with pytest.raises(ConfigError, match="eval.enabled is false"):
        load_select_config(path)
