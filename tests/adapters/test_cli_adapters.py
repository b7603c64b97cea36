"""`fleetlm adapters list|add|remove`, in process (typer's CliRunner) on a tiny base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleetlm.adapters.random import make_random_adapter
from fleetlm.cli import app
from fleetlm.models.config import LlamaConfig

runner = CliRunner()


@pytest.fixture
def adapter(tmp_path: Path, base_cfg: LlamaConfig) -> Path:
    return make_random_adapter(tmp_path / "src" / "support", base_cfg, rank=8, alpha=16,
                               targets=("q_proj", "v_proj"), base_model="tiny-llama")


def test_add_list_remove(tmp_path: Path, tiny_base: Path, adapter: Path) -> None:
    store = tmp_path / "store"
    common = ["--adapters-dir", str(store), "--model", str(tiny_base)]
    r = runner.invoke(app, ["adapters", "add", str(adapter), *common])
    assert r.exit_code == 0, r.output
    assert "added adapter 'support' (rank 8, alpha 16, q_proj,v_proj" in r.stdout
    r = runner.invoke(app, ["adapters", "add", str(adapter), "--name", "sql", *common])
    assert r.exit_code == 0, r.output

    r = runner.invoke(app, ["adapters", "list", *common])
    assert r.exit_code == 0, r.output
    for text in ("support", "sql", "q_proj,v_proj", "tiny-llama", "KiB"):
        assert text in r.stdout

    r = runner.invoke(app, ["adapters", "list", "--json", *common])
    data = json.loads(r.stdout)
    assert [a["name"] for a in data["adapters"]] == ["sql", "support"]
    assert data["adapters"][0] | {"path": None, "size_bytes": None} == {
        "name": "sql", "path": None, "rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"],
        "base_model": "tiny-llama", "size_bytes": None}
    assert data["invalid"] == []

    r = runner.invoke(app, ["adapters", "remove", "sql", "--adapters-dir", str(store)])
    assert r.exit_code == 0, r.output
    assert "removed adapter 'sql'" in r.stdout
    assert sorted(p.name for p in store.iterdir()) == ["support"]


def test_errors_exit_2(tmp_path: Path, tiny_base: Path, adapter: Path) -> None:
    store = tmp_path / "store"
    common = ["--adapters-dir", str(store), "--model", str(tiny_base)]
    r = runner.invoke(app, ["adapters", "add", str(adapter), "--max-lora-rank", "4", *common])
    assert r.exit_code == 2
    assert "error: adapter 'support': rank 8" in r.stderr and "--max-lora-rank" in r.stderr
    assert not store.exists() or list(store.iterdir()) == []

    r = runner.invoke(app, ["adapters", "remove", "nope", "--adapters-dir", str(store)])
    assert r.exit_code == 2 and "error: adapter 'nope': no such adapter" in r.stderr

    r = runner.invoke(app, ["adapters", "add", str(adapter), "--name", "../evil", *common])
    assert r.exit_code == 2 and "invalid adapter name" in r.stderr

    r = runner.invoke(app, ["adapters", "list", "--adapters-dir", str(store), "--model",
                            str(tmp_path / "no-model")])
    assert r.exit_code == 2 and "no such file or folder" in r.stderr


def test_list_reports_invalid_and_uses_default_dir(tmp_path: Path, tiny_base: Path, adapter: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLM_HOME", str(tmp_path / "home"))
    r = runner.invoke(app, ["adapters", "list", "--model", str(tiny_base)])
    assert r.exit_code == 0 and "no adapters in" in r.stdout and str(tmp_path / "home") in r.stdout
    assert runner.invoke(app, ["adapters", "add", str(adapter), "--model", str(tiny_base)]).exit_code == 0
    broken = tmp_path / "home" / "adapters" / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{")
    r = runner.invoke(app, ["adapters", "list", "--model", str(tiny_base)])
    assert r.exit_code == 0
    assert "support" in r.stdout and "warning: skipped invalid adapter 'broken'" in r.stderr
    data = json.loads(runner.invoke(app, ["adapters", "list", "--json", "--model", str(tiny_base)]).stdout)
    assert [a["name"] for a in data["adapters"]] == ["support"]
    assert data["invalid"][0]["name"] == "broken" and "has no adapter_model.safetensors" in data["invalid"][0]["error"]
