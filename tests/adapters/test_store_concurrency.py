"""The store's lock is never held across disk reads: a slow adapter load does not stall
the listing, the warm-tier queries or the validation of other adapters (which the server
calls on its event loop), and concurrent loads of one adapter load it once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleetlm.adapters import AdapterNotFound, AdapterStore, LoadedAdapter
from fleetlm.adapters.random import make_random_adapter
from fleetlm.models.config import LlamaConfig


def _slow_loader(monkeypatch: pytest.MonkeyPatch, seconds: float) -> tuple[threading.Event, list[str]]:
    """Make the store's tensor load sleep first; returns (set once inside, names loaded)."""
    import fleetlm.adapters.store as store_mod

    real = store_mod.load_folder
    inside = threading.Event()
    loaded: list[str] = []

    def slow(name: str, *args: Any, **kwargs: Any) -> LoadedAdapter:
        loaded.append(name)
        inside.set()
        time.sleep(seconds)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(store_mod, "load_folder", slow)
    return inside, loaded


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_readers_do_not_wait_for_a_slow_load(tmp_path: Path, base_cfg: LlamaConfig,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = AdapterStore(tmp_path / "s", base_cfg)
    make_random_adapter(store.root / "slow", base_cfg, rank=4)
    make_random_adapter(store.root / "other", base_cfg, rank=2, seed=1)
    store.get("other")
    store.list()  # imports and the validation cache, before anything is timed
    inside, _ = _slow_loader(monkeypatch, 2.0)
    t, out = _in_thread(lambda: store.get("slow"))
    assert inside.wait(10)
    waits = {}
    for what, call in {"list": store.list, "warm_names": store.warm_names,
                       "validate(other)": lambda: store.validate("other"),
                       "get(other)": lambda: store.get("other"),
                       "stats": store.stats, "warm_bytes": store.warm_bytes,
                       "exists": lambda: store.exists("slow")}.items():
        t0 = time.perf_counter()
        call()
        waits[what] = time.perf_counter() - t0
    assert all(w < 0.2 for w in waits.values()), waits
    assert t.is_alive()  # the load was still running throughout
    t.join(10)
    assert isinstance(out[0], LoadedAdapter) and store.warm_names() == ["other", "slow"]


def test_concurrent_loads_of_one_adapter_load_it_once(tmp_path: Path, base_cfg: LlamaConfig,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store = AdapterStore(tmp_path / "s", base_cfg)
    make_random_adapter(store.root / "a", base_cfg, rank=4)
    _, loaded = _slow_loader(monkeypatch, 0.5)
    runs = [_in_thread(lambda: store.get("a")) for _ in range(4)]
    for t, _ in runs:
        t.join(10)
    got = [out[0] for _, out in runs]
    assert all(g is got[0] for g in got) and isinstance(got[0], LoadedAdapter)
    assert loaded == ["a"]
    assert store.warm_names() == ["a"] and store.warm_bytes() == got[0].nbytes
    st = store.stats()
    assert (st["loads"], st["misses"], st["hits"], st["warm_count"]) == (1, 1, 3, 1)


def test_replace_during_a_load_leaves_no_stale_copy(tmp_path: Path, base_cfg: LlamaConfig,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store = AdapterStore(tmp_path / "s", base_cfg)
    store.add(make_random_adapter(tmp_path / "v1", base_cfg, rank=4, seed=1), name="a")
    v2 = make_random_adapter(tmp_path / "v2", base_cfg, rank=8, seed=2)
    inside, _ = _slow_loader(monkeypatch, 1.0)
    t, out = _in_thread(lambda: store.get("a"))
    assert inside.wait(10)
    t0 = time.perf_counter()
    store.add(v2, name="a", overwrite=True)  # validates v2 itself: slow too, but not blocked
    t.join(10)
    assert isinstance(out[0], LoadedAdapter) and out[0].rank in (4, 8)
    assert store.get("a").rank == 8  # the warm tier never keeps the replaced copy
    assert store.warm_bytes() == store.get("a").nbytes
    assert time.perf_counter() - t0 < 5

    inside.clear()
    store.evict("a")
    t, out = _in_thread(lambda: store.get("a"))
    assert inside.wait(10)
    store.remove("a")
    t.join(10)
    assert isinstance(out[0], AdapterNotFound | LoadedAdapter)
    assert store.warm_names() == [] and store.warm_bytes() == 0


def test_failed_load_is_reported_to_every_waiter(tmp_path: Path, base_cfg: LlamaConfig,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetlm.adapters import AdapterError

    store = AdapterStore(tmp_path / "s", base_cfg)
    folder = make_random_adapter(store.root / "bad", base_cfg, rank=4)
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    _slow_loader(monkeypatch, 0.3)
    runs = [_in_thread(lambda: store.get("bad")) for _ in range(3)]
    for t, _ in runs:
        t.join(10)
    assert all(isinstance(out[0], AdapterError) for _, out in runs)
    assert store.stats()["load_errors"] >= 1 and store.warm_names() == []
    # the store still works
    make_random_adapter(store.root / "good", base_cfg, rank=2)
    assert store.get("good").rank == 2


def test_a_replace_by_another_process_drops_the_warm_copy_and_tells_the_engine(
        tmp_path: Path, base_cfg: LlamaConfig) -> None:
    """Two stores on one folder stand for two processes (an ingress and an engine replica
    on a shared folder): what one replaces, the other notices on its next validate()."""
    mine = AdapterStore(tmp_path / "s", base_cfg)
    other = AdapterStore(tmp_path / "s", base_cfg)
    mine.add(make_random_adapter(tmp_path / "v1", base_cfg, rank=4, seed=1), name="a")
    changed: list[str] = []
    mine.subscribe(changed.append)
    mine.validate("a")
    assert mine.get("a").rank == 4 and mine.warm_names() == ["a"]
    mine.validate("a")
    assert changed == []  # unchanged: no signal, the warm copy stays
    other.add(make_random_adapter(tmp_path / "v2", base_cfg, rank=8, seed=2), name="a",
              overwrite=True)
    assert mine.validate("a").rank == 8
    assert changed == ["a"] and mine.warm_names() == []  # dropped, listeners told once
    assert mine.get("a").rank == 8
    mine.validate("a")
    assert changed == ["a"]
    other.remove("a")
    with pytest.raises(AdapterNotFound):
        mine.validate("a")
