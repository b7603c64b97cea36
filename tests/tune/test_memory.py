"""Tuning's resident memory levels off after warm-up: 160 LoRA steps on a tiny model with
batches whose lengths change every step, in a process that made the allocator choice
``fleetlm tune`` makes (fleetlm/allocator.py). Under glibc's malloc the same run grew by
~340 MB between steps 40-80 and 120-160 (1,564 -> 1,903 MB) on the development machine;
with jemalloc by 1 MB (1,096 -> 1,097)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fleetlm.allocator import ENV, choice, find_jemalloc, plan
from fleetlm.errors import ConfigError

TRAIN = textwrap.dedent("""
    import json, random, sys
    from pathlib import Path
    from fleetlm.allocator import loaded, reexec_with_jemalloc
    reexec_with_jemalloc([sys.executable, *sys.argv])  # what `fleetlm tune` does first
    import torch
    from fleetlm.tune.config import TrainConfig
    from fleetlm.tune.format import Encoded
    from fleetlm.tune.train import build_model, train

    base, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(2)
    cfg = TrainConfig(method="lora", max_steps=steps, batch_size=8, eval_every=10**6,
                      save_every=10**6)
    model = build_model(base, cfg)
    rng = random.Random(0)
    rows = []
    for _ in range(steps * 8):
        n = rng.randrange(16, 300)
        rows.append(Encoded([rng.randrange(100, 40000) for _ in range(n)],
                            n - rng.randrange(1, n // 2)))
    rss = []

    def on_step(e):
        if "loss" in e:
            with open("/proc/self/status") as f:
                rss.append(next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024)

    train(model, rows, [], cfg, out, pad_id=0, on_step=on_step)
    print(json.dumps({"rss_mb": rss, "allocator": loaded()}))
""")


def test_the_allocator_choice() -> None:
    lib = "libjemalloc.so.2"

    def found() -> str:
        return lib

    def missing() -> None:
        return None

    def never() -> str:
        raise AssertionError("looked for the library where no restart can happen")

    assert plan({}, "linux", found, None) == lib  # auto: restart with it
    assert plan({ENV: "system"}, "linux", never, None) is None
    assert plan({}, "linux", never, "/usr/lib/libjemalloc.so.2") is None  # already running
    assert plan({"_FLEETLM_ALLOCATOR_RESTARTED": "1"}, "linux", never, None) is None  # once
    assert plan({}, "linux", missing, None) is None  # not installed: glibc's
    assert plan({}, "darwin", never, None) is None
    with pytest.raises(ConfigError, match="apt-get install libjemalloc2"):
        plan({ENV: "jemalloc"}, "linux", missing, None)
    with pytest.raises(ConfigError, match=f"{ENV}='tcmalloc': choose auto"):
        choice({ENV: "tcmalloc"})


def test_the_cli_refuses_a_bad_allocator_by_name(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "fleetlm", "tune", "x.yaml"], cwd=tmp_path,
                       env={**os.environ, ENV: "tcmalloc"}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and f"{ENV}='tcmalloc'" in r.stderr


@pytest.mark.slow
def test_tuning_memory_stops_growing_after_warm_up(tiny_base: Path, tmp_path: Path) -> None:
    if find_jemalloc() is None:
        if os.environ.get("CI"):
            pytest.fail("no libjemalloc on a CI machine: `make install` installs libjemalloc2")
        pytest.skip("no libjemalloc here (apt-get install libjemalloc2, or make install)")
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    r = subprocess.run([sys.executable, str(script), str(tiny_base), str(tmp_path / "out"),
                        "110"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["allocator"] and "jemalloc" in got["allocator"]  # the choice was made
    rss = got["rss_mb"]
    assert len(rss) == 110
    # under glibc's malloc the same run grows 224 MB between these windows, jemalloc 2 MB
    warm, late = max(rss[30:55]), max(rss[85:110])
    assert late - warm < 60, f"resident memory grew {late - warm:.0f} MB after warm-up"
