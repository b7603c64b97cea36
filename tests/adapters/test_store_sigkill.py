"""A real kill -9 while the adapter store replaces an adapter (test_store_crash.py stops a
replace at each step in-process; this kills a whole process at a random moment): a
process replacing adapter "a" with two versions in turn is SIGKILLed; the name then holds
one version, complete, the store reopens and loads it, and the leftovers are never listed
and are deleted once stale. Run with the atomic swap and with the rename fallback."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fleetlm.adapters import AdapterStore
from fleetlm.adapters.random import make_random_adapter
from fleetlm.models.config import LlamaConfig

WEIGHTS = "adapter_model.safetensors"

REPLACER = textwrap.dedent("""
    import errno, sys
    from pathlib import Path
    from fleetlm.adapters import AdapterStore, folders
    from fleetlm.models.loader import read_config
    if sys.argv[5] == "fallback":   # a filesystem without renameat2(RENAME_EXCHANGE)
        def unsupported(a, b):
            raise OSError(errno.EINVAL, "RENAME_EXCHANGE not supported")
        folders.exchange = unsupported
    store = AdapterStore(Path(sys.argv[1]), read_config(Path(sys.argv[2])))
    versions = [Path(sys.argv[3]), Path(sys.argv[4])]
    i = 0
    while True:
        store.add(versions[i % 2], name="a", overwrite=True)
        print(i, flush=True)   # replace number i is complete
        i += 1
""")


def _which(folder: Path, v1: Path, v2: Path) -> str:
    data = (folder / WEIGHTS).read_bytes()
    return {(v1 / WEIGHTS).read_bytes(): "v1", (v2 / WEIGHTS).read_bytes(): "v2"}.get(data, "?")


@pytest.mark.parametrize("swap", ["exchange", "fallback"])
def test_sigkill_during_replace_leaves_one_whole_version(
        tmp_path: Path, tiny_base: Path, base_cfg: LlamaConfig, swap: str) -> None:
    v1 = make_random_adapter(tmp_path / "v1", base_cfg, rank=4, seed=1)
    v2 = make_random_adapter(tmp_path / "v2", base_cfg, rank=8, seed=2)
    root = tmp_path / "store"
    AdapterStore(root, base_cfg).add(v1, name="a")
    for round_ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", REPLACER, str(root), str(tiny_base),
                                 str(v1), str(v2), swap], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        replaced = -1
        try:
            deadline = time.monotonic() + 60
            while replaced < 5 and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                replaced = int(line)
            time.sleep(random.uniform(0, 0.02))  # somewhere inside a later replace
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(10)
        assert replaced >= 5, proc.stderr.read()[-2000:]  # type: ignore[union-attr]
        if swap == "exchange":  # the name always holds a whole adapter, even before reopening
            assert _which(root / "a", v1, v2) in ("v1", "v2")
        store = AdapterStore(root, base_cfg)  # reopening restores a set-aside copy at once
        which = _which(root / "a", v1, v2)
        assert which in ("v1", "v2"), (round_, sorted(p.name for p in root.iterdir()))
        assert store.get("a").rank == (4 if which == "v1" else 8)
        assert [a.name for a in store.list()] == ["a"]  # leftovers are never listed
    # what the kills left is deleted once stale (another process might still be writing it)
    past = time.time() - 2 * 3600
    for entry in root.iterdir():
        if entry.name.startswith("."):
            for f in [entry, *entry.rglob("*")]:
                os.utime(f, (past, past), follow_symlinks=False)
    store = AdapterStore(root, base_cfg)
    assert sorted(p.name for p in root.iterdir()) == ["a"], store.cleaned
    assert store.get("a").rank in (4, 8)
