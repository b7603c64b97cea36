"""Replacing an adapter is crash-safe and leftovers are cleaned: a crash at any step of a
replace leaves the old or the new adapter complete under its name (after the store
re-opens), readers never see the name missing while it is replaced, and the store's
temporary folders are removed when it opens and never listed."""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fleetlm.adapters import AdapterError, AdapterStore
from fleetlm.adapters.peft_format import load_folder
from fleetlm.adapters.random import make_random_adapter
from fleetlm.models.config import LlamaConfig

WEIGHTS = "adapter_model.safetensors"
HOUR = 3600.0


class _Crash(BaseException):
    """The process dies here: not an Exception, so no handler in the store catches it."""


def _folders() -> Any:
    try:
        return importlib.import_module("fleetlm.adapters.folders")
    except ImportError:  # before the fix there is no such module (and no swap to crash in)
        return None


def _skip_without_exchange(tmp_path: Path) -> None:
    """The atomic swap needs renameat2(RENAME_EXCHANGE): Linux and a filesystem with it."""
    folders = _folders()
    if folders is None:
        return
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        folders.exchange(a, b)
    except OSError as e:
        pytest.skip(f"no atomic folder swap here ({e}); the fallback is tested instead")
    finally:
        a.rmdir()
        b.rmdir()


def _crash_at(monkeypatch: pytest.MonkeyPatch, k: int) -> list[str]:
    """Make the k-th change to the filesystem (1-based, counting renames, swaps, copies and
    deletions) raise _Crash, and every later one too: a dead process cleans nothing up."""
    calls: list[str] = []
    targets: list[tuple[Any, str]] = [(os, "rename"), (os, "replace"), (shutil, "rmtree"),
                                      (shutil, "copyfile")]
    if _folders() is not None:
        targets.append((_folders(), "exchange"))
    for mod, attr in targets:
        real = getattr(mod, attr)

        def step(*a: Any, _real: Any = real, _attr: str = attr, **kw: Any) -> Any:
            calls.append(_attr)
            if len(calls) >= k:
                raise _Crash(_attr)
            return _real(*a, **kw)

        monkeypatch.setattr(mod, attr, step)
    return calls


def _age(root: Path, seconds: float) -> None:
    """Pretend the store's temporary folders were left ``seconds`` ago."""
    past = time.time() - seconds
    for entry in root.iterdir():
        if entry.name.startswith("."):
            for f in [entry, *entry.rglob("*")]:
                os.utime(f, (past, past), follow_symlinks=False)


def _which(folder: Path, v1: Path, v2: Path) -> str:
    data = (folder / WEIGHTS).read_bytes()
    return "old" if data == (v1 / WEIGHTS).read_bytes() else "new" if data == (v2 / WEIGHTS).read_bytes() else "?"


@pytest.mark.parametrize("swap", ["exchange", "fallback"])
def test_crash_at_every_step_of_replace_keeps_old_or_new(
        tmp_path: Path, base_cfg: LlamaConfig, monkeypatch: pytest.MonkeyPatch, swap: str) -> None:
    if swap == "exchange":
        _skip_without_exchange(tmp_path)
    v1 = make_random_adapter(tmp_path / "v1", base_cfg, rank=4, seed=1)
    v2 = make_random_adapter(tmp_path / "v2", base_cfg, rank=8, seed=2)
    seen = []
    for k in range(1, 50):
        root = tmp_path / f"store{k}"
        AdapterStore(root, base_cfg).add(v1, name="a")
        store = AdapterStore(root, base_cfg)
        with monkeypatch.context() as m:
            if swap == "fallback" and _folders() is not None:  # a filesystem without the swap
                m.setattr(_folders(), "exchange", _unsupported)
            calls = _crash_at(m, k)
            try:
                store.add(v2, name="a", overwrite=True)
                crashed = None
            except _Crash as e:
                crashed = str(e)
        if crashed is None:
            assert len(calls) < k
            break
        if swap == "exchange":  # even before any recovery, the name holds a whole adapter
            assert _which(root / "a", v1, v2) in ("old", "new"), (k, calls)
            load_folder("a", root / "a", base_cfg, 64)
        _age(root, 2 * HOUR)
        reopened = AdapterStore(root, base_cfg)  # recovery and clean-up happen here
        assert sorted(p.name for p in root.iterdir()) == ["a"], (k, calls)
        which = _which(root / "a", v1, v2)
        assert which in ("old", "new"), (k, calls)
        assert reopened.get("a").rank == (4 if which == "old" else 8)
        seen.append((crashed, which))
    else:
        pytest.fail("the replace never completed")
    assert ("old" in {w for _, w in seen}) and ("new" in {w for _, w in seen}), seen


def _unsupported(a: Any, b: Any) -> None:
    raise OSError(errno.EINVAL, "RENAME_EXCHANGE not supported by this filesystem")


def test_readers_never_see_the_name_missing_during_replace(tmp_path: Path, base_cfg: LlamaConfig) -> None:
    _skip_without_exchange(tmp_path)
    store = AdapterStore(tmp_path / "s", base_cfg)
    versions = [make_random_adapter(tmp_path / f"v{i}", base_cfg, rank=4, seed=i) for i in range(2)]
    store.add(versions[0], name="a")
    stop = threading.Event()
    problems: list[str] = []
    checks = [0]

    def reader() -> None:
        while not stop.is_set():
            if not store.exists("a"):
                problems.append("missing")
            try:
                store.validate("a")
            except AdapterError as e:
                problems.append(str(e))
            checks[0] += 1

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for i in range(20):
        store.add(versions[i % 2], name="a", overwrite=True)
    stop.set()
    t.join(10)
    assert problems == [] and checks[0] > 20, problems[:3]


def test_leftovers_are_cleaned_at_open_and_never_listed(tmp_path: Path, base_cfg: LlamaConfig) -> None:
    root = tmp_path / "s"
    store = AdapterStore(root, base_cfg)
    store.add(make_random_adapter(tmp_path / "src", base_cfg, rank=4), name="a")
    # what crashes leave behind: a half-written copy, a half-deleted old copy (both
    # layouts), a previous copy set aside while "a" still exists
    for left in (".a.tmp-abcd1234", ".a.old-zz_9zz12", ".b.old-00000000/b", ".a.prev-12345678",
                 ".a.b.tmp-qwertyui"):
        shutil.copytree(root / "a", root / left)
    (root / ".a.tmp-abcd1234" / WEIGHTS).write_bytes(b"half")
    # not ours: must stay
    (root / ".hidden").mkdir()
    (root / "notes.txt").write_text("mine")
    assert [a.name for a in store.list()] == ["a"] and store.scan()[1] == []

    fresh = AdapterStore(root, base_cfg)  # less than an hour old: maybe another process's
    assert len([p for p in root.iterdir() if p.name.startswith(".a.")]) == 4
    assert [a.name for a in fresh.list()] == ["a"]

    _age(root, 2 * HOUR)
    AdapterStore(root, base_cfg)
    assert sorted(p.name for p in root.iterdir()) == [".hidden", "a", "notes.txt"]
    assert AdapterStore(root, base_cfg).get("a").rank == 4


def test_previous_copy_is_restored_when_the_name_is_missing(tmp_path: Path, base_cfg: LlamaConfig) -> None:
    """A crash between the fallback's two renames: the old copy is set aside and the
    name is empty; opening the store puts it back at once, whatever its age."""
    root = tmp_path / "s"
    AdapterStore(root, base_cfg).add(make_random_adapter(tmp_path / "src", base_cfg, rank=4), name="a")
    os.rename(root / "a", root / ".a.prev-0a1b2c3d")
    shutil.copytree(root / ".a.prev-0a1b2c3d", root / ".a.tmp-0a1b2c3d")  # the new copy, unfinished
    store = AdapterStore(root, base_cfg)
    assert store.get("a").rank == 4
    assert sorted(p.name for p in root.iterdir()) == [".a.tmp-0a1b2c3d", "a"]
