"""Training checkpoints are read with torch's weights-only unpickler: a crafted state.pt
that would run code when unpickled is refused with a clear error and runs nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fleetlm.errors import ConfigError
from fleetlm.tune.config import TrainConfig
from fleetlm.tune.format import Encoded
from fleetlm.tune.train import BEST, CHECKPOINT, build_model, train


class _Payload:
    """Unpickling this opens (creates) ``path``: what a hostile checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _plant(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True)
    torch.save({"trainable": {}, "step": 0, "loop": _Payload(marker)}, folder / "state.pt")


@pytest.mark.parametrize("which", [CHECKPOINT, BEST])
def test_crafted_checkpoint_is_refused_not_executed(tmp_path: Path, tiny_base: Path, which: str) -> None:
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    _plant(out / which, marker)
    cfg = TrainConfig(rank=2, alpha=4, max_steps=2, batch_size=2, bf16=False, warmup_ratio=0.0)
    rows = [Encoded([1, 2, 3, 4, 5], 3) for _ in range(4)]
    with pytest.raises(ConfigError) as e:
        train(build_model(tiny_base, cfg), rows, rows[:2], cfg, out, pad_id=0, resume=True)
    msg = str(e.value)
    assert str(out / which / "state.pt") in msg and "not loaded" in msg and "--resume" in msg
    assert not marker.exists()  # nothing ran
