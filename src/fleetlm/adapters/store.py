"""The adapter store: a folder of PEFT LoRA adapters (cold) and an LRU of loaded ones (warm).

    root/NAME/adapter_config.json + adapter_model.safetensors     cold: on disk
    AdapterStore.get(NAME) -> LoadedAdapter                       warm: tensors in RAM, LRU
                                                                  under a byte budget

The hot tier (adapters copied into the engine's stacked buffers) belongs to the engine,
which asks the store for adapters with :meth:`AdapterStore.get`. A corrupt adapter
never breaks the store: ``get`` raises :class:`AdapterError` for it and everything else
keeps working; ``add`` validates fully before anything appears under ``root`` and
renames a finished copy into place, so a failed add leaves nothing behind. Replacing an
adapter swaps the new copy in atomically (one ``renameat2`` exchange on Linux), so a crash
or a reader at any instant finds the old or the new adapter whole; opening the store
cleans what crashes left behind (:mod:`fleetlm.adapters.folders`).

Thread safety: one re-entrant lock guards the warm tier's bookkeeping and every rename
under ``root``, and is never held while a file is read or deleted: the server takes it on
its event loop (``list``, ``validate``, ``warm_names``, ``stats``) while the engine's
``get`` reads tensors from disk. Concurrent ``get`` calls for one adapter share one read
(a per-name in-flight load); a load overtaken by a replace or remove of its adapter is
not kept. Names starting with '.' are the store's temporary folders and are never listed.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fleetlm.adapters import folders
from fleetlm.adapters.errors import AdapterError, AdapterNotFound
from fleetlm.adapters.lru import WarmLRU
from fleetlm.adapters.peft_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    FolderSpec,
    LoadedAdapter,
    check_name,
    inspect_folder,
    load_folder,
)
from fleetlm.errors import ConfigError
from fleetlm.models.config import LlamaConfig

# copied by add besides the two required files, when present
_OPTIONAL_FILES = ("README.md", "fleetlm_task.json")  # model card; how the adapter was prompted in tuning


@dataclass(frozen=True)
class AdapterInfo:
    """A listing entry: what the config and the safetensors header say (no tensors)."""

    name: str
    path: Path
    rank: int  # the largest rank over modules
    alpha: float  # lora_alpha (alpha_pattern may override it per module)
    target_modules: tuple[str, ...]  # projections present, in LORA_TARGETS order
    base_model: str | None  # base_model_name_or_path, when the config names one
    size_bytes: int  # adapter_model.safetensors on disk
    tier: str  # "warm" | "cold" (the engine reports "hot" for what it holds)
    pinned: bool


@dataclass
class _Load:
    """One read of an adapter from disk, shared by every ``get`` that wants it meanwhile."""

    version: int  # the adapter's version (bumped by add/remove) when the read began
    done: threading.Event = field(default_factory=threading.Event)
    value: LoadedAdapter | None = None  # set once it is in the warm tier
    error: BaseException | None = None  # or why the read failed


# a folder that changes under a reader this many times in a row is reported, not retried
_READ_TRIES = 3


class AdapterStore:
    def __init__(self, root: Path, base_config: LlamaConfig | None, *,
                 dtype: torch.dtype = torch.float32, max_rank: int = 64,
                 warm_budget_bytes: int = 2 * 1024**3) -> None:
        """``base_config=None`` opens the store for name-level work only (list without
        base-model checks, exists, resolve, remove); ``get`` and ``add`` then refuse.
        Opening restores or deletes what crashes left under ``root``
        (:func:`folders.clean_leftovers`; ``self.cleaned`` says what it did)."""
        problems = []
        if max_rank <= 0:
            problems.append(f"--max-lora-rank must be positive, got {max_rank}")
        if warm_budget_bytes < 0:
            problems.append(f"the warm adapter budget must be >= 0 bytes, got {warm_budget_bytes}")
        if problems:
            raise ConfigError("; ".join(problems))
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--adapters-dir {self.root}: cannot create it ({e})") from e
        if not self.root.is_dir():
            raise ConfigError(f"--adapters-dir {self.root}: not a folder")
        self._real_root = self.root.resolve()
        try:
            self.cleaned = folders.clean_leftovers(self.root)
        except OSError:  # best effort: an unreadable root fails later, with its own error
            self.cleaned = []
        self.base_config = base_config
        self.dtype = dtype
        self.max_rank = max_rank
        self._lock = threading.RLock()
        self._warm: WarmLRU[LoadedAdapter] = WarmLRU(warm_budget_bytes)
        self._stats = {"hits": 0, "misses": 0, "loads": 0, "load_errors": 0, "evictions": 0}
        self._listeners: list[Callable[[str], None]] = []
        self._specs: dict[str, tuple[tuple[int, ...] | None, FolderSpec]] = {}
        self._loading: dict[str, _Load] = {}  # name -> the read in flight
        self._versions: dict[str, int] = {}  # name -> times it was added or removed

    # --- names and folders --------------------------------------------------------------

    def resolve(self, name: str) -> Path:
        """The folder of adapter ``name``: a valid name, inside root (symlinks that lead
        out are refused), existing. Raises AdapterNotFound for an unknown name."""
        check_name(name)
        path = self.root / name
        if not path.exists():
            if path.is_symlink():
                raise AdapterError(name, f"{path} is a broken symlink; remove it with `fleetlm adapters remove {name}`")
            raise AdapterNotFound(name, f"no such adapter in {self.root} "
                                        f"({self._known_hint()}add one with `fleetlm adapters add PATH`)")
        real = path.resolve()
        if not real.is_relative_to(self._real_root):
            raise AdapterError(name, f"{path} is a symlink to {real}, outside the adapter store "
                                     f"{self.root}; add the adapter with `fleetlm adapters add` instead")
        if not real.is_dir():
            raise AdapterError(name, f"{path} is not a folder; an adapter is a folder holding "
                                     f"{CONFIG_FILE} and {WEIGHTS_FILE}")
        return path

    def exists(self, name: str) -> bool:
        try:
            self.resolve(name)
        except AdapterError:
            return False
        return True

    def _known_hint(self) -> str:
        names = self._candidate_names()
        if not names:
            return "the store is empty; "
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        return f"known: {shown}; "

    def _candidate_names(self) -> list[str]:
        """Folder names under root that look like adapters (not validated)."""
        names = []
        for entry in sorted(self.root.iterdir()):
            try:
                check_name(entry.name)
            except AdapterError:
                continue
            if (entry / CONFIG_FILE).is_file():
                names.append(entry.name)
        return names

    # --- listing and validation ---------------------------------------------------------

    def validate(self, name: str) -> AdapterInfo:
        """Config and safetensors-header checks (no tensor data is read)."""
        path = self.resolve(name)
        return self._info(self._inspect(name, path), path)

    def _inspect(self, name: str, path: Path) -> FolderSpec:
        """inspect_folder, cached while both files keep their inode, size and mtime (the
        engine validates on every request: ~2 ms for a 30-layer adapter, ~0.1 ms cached).
        Read again if the files changed meanwhile (a replace by another process): the
        config and the header must come from one copy. A folder found changed since it was
        last inspected was replaced by another process (an ingress or another replica on a
        shared folder): its warm copy is dropped and the listeners told, as after add()."""
        for _ in range(_READ_TRIES):
            key = _stat_key(path)
            with self._lock:
                cached = self._specs.get(name)
            if key is not None and cached is not None and cached[0] == key:
                return cached[1]
            try:
                spec = inspect_folder(name, path, self.base_config, self.max_rank,
                                      inside=self._real_root)
            except AdapterError:
                if _stat_key(path) != key:
                    continue
                raise
            if _stat_key(path) == key:
                with self._lock:
                    replaced = cached is not None and self._specs.get(name) is cached
                    self._specs[name] = (key, spec)
                    if replaced:  # by another process (this one's add/remove drop the entry)
                        self._warm.drop(name)
                        self._versions[name] = self._versions.get(name, 0) + 1
                if replaced:
                    self._changed(name)  # the engine drops its hot copy: never served stale
                return spec
        raise AdapterError(name, f"{path} kept changing while it was read; retry")

    def scan(self) -> tuple[list[AdapterInfo], list[AdapterError]]:
        """Every adapter-looking folder under root: the valid ones and why the others fail."""
        good: list[AdapterInfo] = []
        bad: list[AdapterError] = []
        for name in self._candidate_names():
            try:
                good.append(self.validate(name))
            except AdapterError as e:
                bad.append(e)
        return good, bad

    def _info(self, spec: FolderSpec, path: Path) -> AdapterInfo:
        with self._lock:
            tier = "warm" if spec.name in self._warm else "cold"
            pinned = self._warm.is_pinned(spec.name)
        return AdapterInfo(spec.name, path, spec.rank, spec.alpha, spec.targets, spec.base_model,
                           spec.weights_bytes, tier, pinned)

    # --- the warm tier ------------------------------------------------------------------

    def get(self, name: str) -> LoadedAdapter:
        """The adapter's tensors: from the warm tier, or loaded from disk with full
        validation and inserted as most recently used (evicting the least recently used
        unpinned adapters beyond the byte budget). Treat the tensors as read-only.

        The disk read runs outside the lock; callers that want the same adapter meanwhile
        wait for that read instead of starting their own."""
        while True:
            with self._lock:
                hit = self._warm.get(name)
                if hit is not None:
                    self._stats["hits"] += 1
                    return hit
                load = self._loading.get(name)
                mine = load is None
                if load is None:
                    self._stats["misses"] += 1
                    load = self._loading[name] = _Load(self._versions.get(name, 0))
            if mine:
                loaded = self._load(name, load)
            else:
                load.done.wait()
                err = load.error
                if isinstance(err, AdapterError):  # a copy: one exception object per raise
                    raise type(err)(err.adapter, *err.problems) from err
                if isinstance(err, Exception):
                    raise err
                loaded = load.value  # None if replaced meanwhile or the loader was interrupted
                if loaded is not None:
                    with self._lock:
                        self._stats["hits"] += 1
            if loaded is not None:
                return loaded
            # replaced or removed while it was read, or its reader interrupted: look again

    def _load(self, name: str, load: _Load) -> LoadedAdapter | None:
        """Read ``name`` from disk for everyone waiting on ``load`` and put it in the warm
        tier; None (and nothing kept) if it was replaced or removed meanwhile."""
        try:
            loaded = self._read(name)
        except BaseException as e:
            load.error = e
            with self._lock:
                if self._loading.get(name) is load:
                    del self._loading[name]
            load.done.set()
            raise
        with self._lock:
            if self._loading.get(name) is load:
                del self._loading[name]
            self._stats["loads"] += 1
            current = self._versions.get(name, 0) == load.version
            if current:
                self._stats["evictions"] += len(self._warm.put(name, loaded, loaded.nbytes))
                load.value = loaded
        load.done.set()
        return loaded if current else None

    def _read(self, name: str) -> LoadedAdapter:
        """load_folder on the adapter's folder (no lock held), read again if its files
        changed meanwhile (another process replaced it)."""
        base = self._need_base(name)
        for _ in range(_READ_TRIES):
            path = self.resolve(name)
            key = _stat_key(path)
            try:
                loaded = load_folder(name, path, base, self.max_rank, self.dtype,
                                     inside=self._real_root)
            except AdapterError:
                if _stat_key(path) != key:
                    continue
                with self._lock:
                    self._stats["load_errors"] += 1
                raise
            if _stat_key(path) == key:
                return loaded
        raise AdapterError(name, f"{self.root / name} kept changing while it was read; retry")

    def pin(self, name: str) -> None:
        """Load ``name`` if needed and keep it warm until :meth:`unpin`."""
        with self._lock:
            was_pinned = self._warm.is_pinned(name)
            self._warm.pin(name)  # first: once it arrives, nothing can evict it
        try:
            self.get(name)
        except BaseException:
            if not was_pinned:
                self.unpin(name)
            raise

    def unpin(self, name: str) -> None:
        with self._lock:
            self._stats["evictions"] += len(self._warm.unpin(name))

    def evict(self, name: str) -> bool:
        """Drop the warm copy (cold again). False if it was not warm, or is pinned."""
        with self._lock:
            if self._warm.is_pinned(name) or not self._warm.drop(name):
                return False
            self._stats["evictions"] += 1
            return True

    def warm_names(self) -> list[str]:
        """Least recently used first."""
        with self._lock:
            return self._warm.names()

    def warm_bytes(self) -> int:
        with self._lock:
            return self._warm.nbytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._stats, "warm_bytes": self._warm.nbytes, "warm_count": len(self._warm)}

    # --- changing the folder ------------------------------------------------------------

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(name)`` after an adapter is removed or replaced (outside the
        store's lock), so a holder of its tensors (the engine's hot tier) can drop them."""
        with self._lock:
            self._listeners.append(callback)

    def _changed(self, name: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for cb in listeners:
            cb(name)

    def add(self, src: Path, name: str | None = None, *, overwrite: bool = False) -> AdapterInfo:
        """Validate the PEFT folder ``src`` fully (tensors included), then copy it into
        ``root/name`` atomically. ``name`` defaults to the folder's name."""
        src = Path(src).expanduser()
        name = name if name is not None else (src.name or src.resolve().name)
        check_name(name)
        if not overwrite and self.exists(name):
            raise AdapterError(name, f"already in {self.root}; pass --overwrite to replace it or "
                                     "--name to store it under another name")
        if not src.is_dir():
            hint = " (pass the folder that holds it)" if src.is_file() else ""
            raise AdapterError(name, f"{src} is not a folder{hint}; an adapter is a folder holding "
                                     f"{CONFIG_FILE} and {WEIGHTS_FILE}")
        base = self._need_base(name)
        load_folder(name, src, base, self.max_rank, self.dtype)  # everything, before any copy
        tmp = folders.new_temp(self.root, name)
        old: Path | None = None  # where the replaced copy ends up, to delete
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the adapter folder should not be
            for f in (CONFIG_FILE, WEIGHTS_FILE, *_OPTIONAL_FILES):
                if (src / f).is_file():
                    shutil.copyfile(src / f, tmp / f)  # follows symlinks: the copy is real
            # the copy is what will be served: check it too (a full disk truncates silently)
            spec = inspect_folder(name, tmp, base, self.max_rank)
            with self._lock:
                target = self.root / name
                if target.exists() or target.is_symlink():
                    if not overwrite:
                        raise AdapterError(name, f"already in {self.root}; pass --overwrite to "
                                                 "replace it or --name to store it under another name")
                    if self._warm.is_pinned(name):
                        raise AdapterError(name, "is pinned (in use by the server); unpin it "
                                                 "before replacing it")
                    old = folders.replace(tmp, target)  # atomic: see folders.py
                else:
                    tmp.rename(target)
                self._warm.drop(name)
                self._specs.pop(name, None)
                self._versions[name] = self._versions.get(name, 0) + 1
        except OSError as e:
            raise AdapterError(name, f"could not copy {src} into {self.root} ({e})") from e
        finally:
            for leftover in (tmp, old):  # outside the lock: deleting takes a while
                if leftover is not None and (leftover.exists() or leftover.is_symlink()):
                    folders.discard(leftover)
        if old is not None:
            self._changed(name)
        return self._info(spec, self.root / name)

    def remove(self, name: str) -> None:
        """Delete the adapter's folder and warm copy. Refuses a pinned adapter."""
        with self._lock:
            check_name(name)
            path = self.root / name
            if not path.is_symlink():  # a link (even one leading out) is just unlinked
                path = self.resolve(name)
            if self._warm.is_pinned(name):
                raise AdapterError(name, "is pinned (in use by the server); unpin it before removing it")
            self._warm.drop(name)
            self._specs.pop(name, None)
            self._versions[name] = self._versions.get(name, 0) + 1
            try:  # vanish at once; a symlink is unlinked, what it points to left alone
                trash = None if path.is_symlink() else folders.set_aside(path)
                if trash is None:
                    path.unlink()
            except OSError as e:
                raise AdapterError(name, f"could not delete {path} ({e})") from e
        if trash is not None:
            folders.discard(trash)  # outside the lock
        self._changed(name)

    def _need_base(self, name: str) -> LlamaConfig:
        if self.base_config is None:
            raise AdapterError(name, "this store was opened without the base model's config, so "
                                     "adapters cannot be checked against it (pass --model)")
        return self.base_config

    # defined last: inside the class body the name shadows the builtin in annotations
    def list(self) -> list[AdapterInfo]:
        """The valid adapters, by name; folders that fail validation are skipped
        (:meth:`scan` or :meth:`validate` says why)."""
        return self.scan()[0]


def _stat_key(folder: Path) -> tuple[int, ...] | None:
    try:
        stats = [(folder / f).stat() for f in (CONFIG_FILE, WEIGHTS_FILE)]
    except OSError:
        return None
    return tuple(v for st in stats for v in (st.st_ino, st.st_size, st.st_mtime_ns))
