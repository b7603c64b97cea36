"""Fixtures for the adapter store: one tiny Llama checkpoint and its config."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetlm.models.config import LlamaConfig
from tests.conftest import make_hf_model


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama folder (config.json + model.safetensors): 2 layers, hidden 64,
    4 heads over 2 KV heads, intermediate 96."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_hf_model("llama").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def base_cfg(tiny_base: Path) -> LlamaConfig:
    from fleetlm.models.loader import read_config

    return read_config(tiny_base)
