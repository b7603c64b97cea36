"""Adapters kept in an object store (S3, GCS, Azure, any fsspec URL), served from a local copy.

    store = MirroredStore("s3://bucket/adapters", cache_root, base_config)   # an AdapterStore
    store.validate("b77")     # fetched (or refreshed) into cache_root/b77 first, then checked

Several machines (Ray replicas, an ingress) share one adapter set without a shared folder:
each keeps a local copy under ``cache_root`` and serves it exactly as a plain store serves
its folder. The copy of an adapter is fetched on first use and checked against the remote
at most every ``refresh_s`` seconds: the remote files' identity (their ETag, MD5 or size +
modification time, whatever the filesystem reports) is recorded beside the copy in
``.fleetlm-source.json``; when it differs the new files are fetched into a temporary
folder and swapped in atomically (:mod:`fleetlm.adapters.folders`). The swap gives the copy
new inodes, so the store's own change check drops its warm copy and tells the engine (see
``AdapterStore._inspect``): a replaced adapter is never served stale for longer than
``refresh_s``. An adapter deleted remotely is deleted locally at its next check. ``add``
uploads the new folder, then records its identity; ``remove`` deletes it remotely first.

fsspec comes with fleetlm's dependencies; a protocol's own package (``s3fs``, ``gcsfs``,
``adlfs``) is the user's to install. ``file://`` URLs need nothing (the tests use them).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from fleetlm.adapters import folders
from fleetlm.adapters.errors import AdapterError
from fleetlm.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, check_name
from fleetlm.adapters.store import _OPTIONAL_FILES, AdapterInfo, AdapterStore

SOURCE_FILE = ".fleetlm-source.json"
REFRESH_S = 5.0


def default_cache(url: str) -> Path:
    """Where this machine keeps its copies of the adapters at ``url`` by default: a folder
    per URL under the cache (deleting it costs a download, never data)."""
    import hashlib

    from fleetlm.paths import cache_home

    return cache_home() / "adapter-mirror" / hashlib.sha256(url.encode()).hexdigest()[:12]


def store_root(adapters_dir: Path | None, url: str | None) -> Path:
    """The folder a store keeps its adapters in: ``adapters_dir``; else, with ``url``, the
    copies' folder for that URL (:func:`default_cache`); else the user data folder's."""
    from fleetlm.paths import default_adapters_dir

    if adapters_dir is not None:
        return adapters_dir
    return default_cache(url) if url else default_adapters_dir()


def open_adapter_store(adapters_dir: Path | None, url: str | None, base_config: Any, *,
                       refresh_s: float = REFRESH_S, **kwargs: Any) -> AdapterStore:
    """The store of ``--adapters-dir`` / ``--adapters-url``: the folder itself, or a mirror
    of ``url`` kept in :func:`store_root`. ``kwargs`` go to :class:`AdapterStore`."""
    root = store_root(adapters_dir, url)
    if url:
        return MirroredStore(url, root, base_config, refresh_s=refresh_s, **kwargs)
    return AdapterStore(root, base_config, **kwargs)


def is_url(location: str | Path) -> bool:
    """Whether ``--adapters-url``-style ``location`` names a remote (``scheme://...``)."""
    return "://" in str(location)


class AdapterMirror:
    """The remote side: listing, identity, fetch into the cache, upload, delete."""

    def __init__(self, url: str, cache_root: Path, refresh_s: float = REFRESH_S) -> None:
        import fsspec

        if not is_url(url):
            raise AdapterError("(store)", f"adapters URL {url!r} has no scheme; use e.g. "
                                          "s3://bucket/prefix or file:///path")
        try:
            self.fs, self.base = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise AdapterError("(store)", f"adapters URL {url!r}: {e} (install the fsspec "
                                          "package of that protocol, e.g. s3fs for s3://)") from e
        self.url, self.cache_root, self.refresh_s = url, Path(cache_root), refresh_s
        self.cache_root.mkdir(parents=True, exist_ok=True)
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    def _remote(self, name: str, file: str = "") -> str:
        return f"{self.base.rstrip('/')}/{name}" + (f"/{file}" if file else "")

    def names(self) -> list[str]:
        """Adapter folders in the remote (those holding an adapter_config.json)."""
        self.fs.invalidate_cache(self.base)  # s3fs and others cache listings
        try:
            entries = self.fs.ls(self.base, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "directory" and not name.startswith(".") \
                    and self.fs.exists(self._remote(name, CONFIG_FILE)):
                out.append(name)
        return sorted(out)

    def identity(self, name: str) -> str | None:
        """What the remote files are now (None: no such adapter there)."""
        parts = []
        self.fs.invalidate_cache(self._remote(name))  # what is there now, not a cached listing
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            try:
                info = self.fs.info(self._remote(name, f))
            except FileNotFoundError:
                return None
            tag = info.get("ETag") or info.get("md5") or info.get("etag")
            when = info.get("LastModified") or info.get("mtime") or info.get("created")
            parts.append([f, str(tag) if tag else None, int(info.get("size") or 0), str(when)])
        return json.dumps(parts)

    def sync(self, name: str, force: bool = False) -> None:
        """Make ``cache_root/name`` the remote's current copy (or remove it if the remote has
        none); checks the remote at most every ``refresh_s`` unless ``force``."""
        check_name(name)
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked.get(name, -1e18) < self.refresh_s:
                return
            self._checked[name] = now
        local = self.cache_root / name
        ident = self.identity(name)
        if ident is None:
            if local.exists():
                folders.discard(folders.set_aside(local))
            return
        if _recorded(local) == ident:
            return
        tmp = folders.new_temp(self.cache_root, name)
        try:
            for f in (CONFIG_FILE, WEIGHTS_FILE, *_OPTIONAL_FILES):
                if f in (CONFIG_FILE, WEIGHTS_FILE) or self.fs.exists(self._remote(name, f)):
                    self.fs.get_file(self._remote(name, f), str(tmp / f))
            (tmp / SOURCE_FILE).write_text(ident)
            tmp.chmod(0o755)
            if local.exists():
                folders.discard(folders.replace(tmp, local))
            else:
                tmp.rename(local)
        except FileNotFoundError:  # deleted or replaced remotely meanwhile: next check
            with self._lock:
                self._checked.pop(name, None)
        finally:
            if tmp.exists():
                folders.discard(tmp)

    def push(self, name: str) -> None:
        """Upload ``cache_root/name`` (just added) and record what the remote now holds."""
        local = self.cache_root / name
        self.fs.makedirs(self._remote(name), exist_ok=True)
        # the weights first, the config last: a reader listing by config sees whole adapters
        for f in (WEIGHTS_FILE, *_OPTIONAL_FILES, CONFIG_FILE):
            if (local / f).is_file():
                self.fs.put_file(str(local / f), self._remote(name, f))
        ident = self.identity(name)
        if ident is not None:
            (local / SOURCE_FILE).write_text(ident)
        with self._lock:
            self._checked[name] = time.monotonic()

    def delete(self, name: str) -> None:
        if self.fs.exists(self._remote(name)):
            self.fs.rm(self._remote(name), recursive=True)
        with self._lock:
            self._checked.pop(name, None)


def _recorded(local: Path) -> str | None:
    try:
        return (local / SOURCE_FILE).read_text()
    except OSError:
        return None


class MirroredStore(AdapterStore):
    """An :class:`AdapterStore` on ``cache_root`` that mirrors the adapters at ``url``."""

    def __init__(self, url: str, cache_root: Path, base_config: Any, *,
                 refresh_s: float = REFRESH_S, **kwargs: Any) -> None:
        self.mirror = AdapterMirror(url, cache_root, refresh_s)
        super().__init__(cache_root, base_config, **kwargs)

    def validate(self, name: str) -> AdapterInfo:
        self.mirror.sync(name)
        return super().validate(name)

    def get(self, name: str) -> Any:
        self.mirror.sync(name)
        return super().get(name)

    def scan(self) -> tuple[list[AdapterInfo], list[AdapterError]]:
        remote = set(self.mirror.names())
        for name in remote:
            self.mirror.sync(name)
        for stale in self.root.iterdir():  # copies of adapters deleted remotely
            if stale.is_dir() and not stale.name.startswith(".") and stale.name not in remote:
                self.mirror.sync(stale.name, force=True)
        return super().scan()

    def add(self, src: Path, name: str | None = None, *, overwrite: bool = False) -> AdapterInfo:
        target = name or Path(src).name
        self.mirror.sync(target, force=True)  # the remote decides whether it exists
        info = super().add(src, name, overwrite=overwrite)
        self.mirror.push(info.name)
        return info

    def remove(self, name: str) -> None:
        self.mirror.sync(name, force=True)
        super().remove(name)  # AdapterNotFound / pinned: nothing deleted remotely
        self.mirror.delete(name)
