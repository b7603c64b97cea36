"""fleetlm prune: exactly what the report says goes, and the pruned model still runs."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fleetlm.compress.prune import PruneSettings, prune
from fleetlm.errors import ConfigError
from fleetlm.models.loader import load_model, read_state_dict


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    words = "refund my card please order hello world the quick brown fox jumps".split()
    path = tmp_path_factory.mktemp("calib") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=10))}) + "\n"
                            for _ in range(24)))
    return path


def _run(base: Path, calib: Path, out: Path, **kw: object) -> dict:
    return prune(PruneSettings(model=str(base), data=calib, out=out, **kw), say=lambda m: None)


def _generates(folder: Path) -> None:
    """fleetlm loads the folder and decodes a few greedy tokens with finite logits."""
    lm = load_model(str(folder), dtype="float32", quantize="none")
    ids = torch.tensor([[5, 9, 33, 120]])
    with torch.inference_mode():
        cache = lm.model.allocate_cache(1, 32)
        logits = lm.model(ids, torch.arange(4)[None], cache, torch.tensor([0]), 4, None)
    assert torch.isfinite(logits).all()


def test_mlp_channels_removed_are_exactly_the_reported_ones(small_base: Path, calib: Path,
                                                            tmp_path: Path) -> None:
    rep = _run(small_base, calib, tmp_path / "p", mlp=0.5)
    before, after = read_state_dict(small_base), read_state_dict(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["intermediate_size"] == 48 == rep["config"]["intermediate_size"]
    for i, gone in enumerate(rep["mlp_channels_removed"]):
        assert len(gone) == 48
        keep = [c for c in range(96) if c not in set(gone)]
        p = f"model.layers.{i}.mlp."
        torch.testing.assert_close(after[p + "gate_proj.weight"], before[p + "gate_proj.weight"][keep])
        torch.testing.assert_close(after[p + "up_proj.weight"], before[p + "up_proj.weight"][keep])
        torch.testing.assert_close(after[p + "down_proj.weight"],
                                   before[p + "down_proj.weight"][:, keep])
    assert rep["parameters_before"] - rep["parameters_after"] == 2 * 3 * 64 * 48
    _generates(tmp_path / "p")


def test_kv_groups_and_layers_removed_are_the_reported_ones(small_base: Path, calib: Path,
                                                            tmp_path: Path) -> None:
    rep = _run(small_base, calib, tmp_path / "p", kv_groups=1, layers=1)
    before, after = read_state_dict(small_base), read_state_dict(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"],
            cfg["head_dim"]) == (2, 1, 1, 16)
    (dropped,) = rep["layers_removed"]
    kept = 1 - dropped  # two layers: the other one stays, renumbered 0
    (gone,) = rep["kv_groups_removed"][kept]
    g = 1 - gone  # the group kept of two
    q_rows = list(range(g * 32, g * 32 + 32))  # 2 query heads of 16 per group
    kv_rows = list(range(g * 16, g * 16 + 16))
    b, a = f"model.layers.{kept}.self_attn.", "model.layers.0.self_attn."
    torch.testing.assert_close(after[a + "q_proj.weight"], before[b + "q_proj.weight"][q_rows])
    torch.testing.assert_close(after[a + "k_proj.weight"], before[b + "k_proj.weight"][kv_rows])
    torch.testing.assert_close(after[a + "o_proj.weight"],
                               before[b + "o_proj.weight"][:, q_rows])
    torch.testing.assert_close(after["model.layers.0.mlp.up_proj.weight"],
                               before[f"model.layers.{kept}.mlp.up_proj.weight"])
    assert not any(k.startswith("model.layers.1.") for k in after)
    _generates(tmp_path / "p")


@pytest.mark.parametrize("kw", [{"two_four": True}, {"unstructured": 0.25}])
def test_wanda_zeros_keep_the_shapes_and_count_what_they_zero(small_base: Path, calib: Path,
                                                               tmp_path: Path, kw: dict) -> None:
    rep = _run(small_base, calib, tmp_path / "p", **kw)
    before, after = read_state_dict(small_base), read_state_dict(tmp_path / "p")
    zeros = 0
    for name, w in after.items():
        assert w.shape == before[name].shape
        if ".layers." in name and w.ndim == 2:
            z = w == 0
            zeros += int(z.sum())
            if kw.get("two_four"):
                assert bool((z.reshape(w.shape[0], -1, 4).sum(-1) >= 2).all()), name
            else:
                assert bool((z.sum(1) >= int(w.shape[1] * 0.25)).all()), name
            changed = w != before[name]
            assert bool((w[changed] == 0).all())  # only zeros were written
    assert zeros == rep["zeroed_weights"] and rep["parameters_after"] == rep["parameters_before"]
    _generates(tmp_path / "p")


def test_prune_refusals(small_base: Path, calib: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to prune"):
        _run(small_base, calib, tmp_path / "a")
    with pytest.raises(ConfigError, match="every KV head"):
        _run(small_base, calib, tmp_path / "b", kv_groups=2)
    with pytest.raises(ConfigError, match="every layer"):
        _run(small_base, calib, tmp_path / "c", layers=2)
    with pytest.raises(ConfigError, match="give one"):
        _run(small_base, calib, tmp_path / "d", unstructured=0.5, two_four=True)
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_cli_prune(small_base: Path, calib: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "fleetlm", "prune", "--model", str(small_base),
                        "--data", str(calib), "--out", str(tmp_path / "o"), "--mlp", "0.25"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["intermediate_size"] == 72 and "mlp_channels_removed" not in out
    assert "fewer" in r.stderr
