"""The hub-id code path, exercised offline against a local Hugging Face cache folder."""

from __future__ import annotations

import shutil

import pytest
import torch

from fleetlm.errors import ModelLoadError
from fleetlm.models.loader import load_model


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_hub_id_loads_from_the_local_hub_cache(offline_hub, tiny_checkpoints):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--acme--tiny-llama"
    snap = repo / "snapshots" / commit
    shutil.copytree(tiny_checkpoints["qwen2-bias"], snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)

    lm = load_model("acme/tiny-llama", dtype="float32", with_tokenizer=False)
    assert lm.folder == snap
    assert lm.config.model_type == "qwen2"
    local = load_model(str(tiny_checkpoints["qwen2-bias"]), dtype="float32", with_tokenizer=False)
    for (name, a), (_, b) in zip(lm.model.state_dict().items(), local.model.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_unreachable_hub_id_names_the_repo(offline_hub):
    with pytest.raises(ModelLoadError) as e:
        load_model("acme/not-cached", with_tokenizer=False)
    msg = str(e.value)
    assert "acme/not-cached" in msg and "hub" in msg and "local folder" in msg
