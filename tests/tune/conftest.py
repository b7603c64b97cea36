"""Fixtures of the tune tests: config builders and an OpenAI-compatible teacher stub
(:mod:`tests.openai_stub`); the end-to-end test uses a real fleetlm server as teacher."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetlm.tune.config import TuneConfig, parse_config
from tests.openai_stub import Stub, stub_starter


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., TuneConfig]:
    """make_cfg(task_type, data_path, task={...}, data={...}, prepare={...}, ...)."""

    def make(task_type: str = "classification", path: Path | str = "train.csv",
             **sections: Any) -> TuneConfig:
        raw: dict[str, Any] = {"name": "t",
                               "task": {"type": task_type, **sections.pop("task", {})},
                               "data": {"path": str(path), **sections.pop("data", {})},
                               **sections}
        return parse_config(raw, base_dir=tmp_path)

    return make


@pytest.fixture
def teacher_stub() -> Iterator[Callable[..., Stub]]:
    yield from stub_starter()
