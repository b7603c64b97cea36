"""How the adapter store changes its folder on disk: temporary names, the atomic swap
that replaces an adapter, and the clean-up of what a crash leaves behind.

Every folder the store writes besides adapters is named ``.NAME.KIND-XXXXXXXX`` (adapter
names cannot start with '.', so these are never listed):

    .NAME.tmp-XXXXXXXX    a copy being written by ``add``, or after a swap the old copy
                          being deleted
    .NAME.old-XXXXXXXX    a removed adapter being deleted
    .NAME.prev-XXXXXXXX   the old copy set aside by the fallback replace (below)

Replace. On Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the finished new copy and the old
folder in one step of the filesystem: at every instant ``NAME`` is one complete adapter,
old or new, for this process, for other processes and after a crash; the old copy, now
under the temporary name, is deleted afterwards. Plain ``rename`` cannot do this: it
refuses to move a folder over a non-empty one, so any replace built from renames has a
moment with no folder under the name. Where there is no such call or the filesystem
refuses it (not Linux, NFS, ...), the fallback is exactly that: rename the old folder to
``.NAME.prev-X``, then the new one in. A reader may then find no ``NAME`` for the
microseconds between the two renames, and a crash between them leaves the old copy as
``.NAME.prev-X``, which the next :func:`clean_leftovers` renames back.

Clean-up when the store opens: other processes may share a store (the server, and
``fleetlm adapters add`` beside it), so a temporary folder is deleted only when it has not
changed for an hour (the newest mtime of the folder and its files); a ``.prev-`` folder
whose ``NAME`` is missing is renamed back at once (whichever rename wins, ``NAME`` holds a
complete adapter).

This module knows paths and names only; what an adapter folder holds is peft_format's.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STALE_AFTER_S = 3600.0
_LEFTOVER = re.compile(r"\.(?P<name>[A-Za-z0-9_-][A-Za-z0-9._-]{0,63})\.(?P<kind>tmp|old|prev)-[a-z0-9_]{8}")
# renameat2 flags and "relative to the working directory" (linux/fcntl.h, linux/fs.h)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# what a missing call or a filesystem without the flag answers; anything else is a real error
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def new_temp(root: Path, name: str) -> Path:
    """An empty, private folder ``root/.NAME.tmp-XXXXXXXX`` to write a copy into."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))


def _spare(root: Path, name: str, kind: str) -> Path:
    return root / f".{name}.{kind}-{secrets.token_hex(4)}"


def exchange(a: Path, b: Path) -> None:
    """Swap what the paths ``a`` and ``b`` name, in one step (Linux renameat2 with
    RENAME_EXCHANGE). OSError with errno ENOSYS where there is no such call."""
    fn = _renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(a))
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.?
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def replace(new: Path, target: Path) -> Path:
    """Put the complete folder ``new`` (a temporary name next to ``target``) under
    ``target``'s name, replacing what is there; returns the path that now holds the old
    copy, for :func:`discard`. Atomic where :func:`exchange` works (module docstring)."""
    try:
        exchange(new, target)
        return new
    except OSError as e:
        if e.errno not in _NO_EXCHANGE:
            raise
    aside = _spare(target.parent, target.name, "prev")
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(aside, target)  # the old copy goes back; the caller reports the error
        raise
    return aside


def set_aside(path: Path) -> Path:
    """Rename the adapter folder ``path`` to ``.NAME.old-X`` (it vanishes at once) and
    return the new path, for :func:`discard`."""
    trash = _spare(path.parent, path.name, "old")
    os.rename(path, trash)
    return trash


def discard(path: Path) -> None:
    """Delete a folder the store set aside (a symlink: unlinked, its target left alone)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_leftovers(root: Path, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Restore set-aside copies whose name is missing and delete stale temporary folders
    under ``root`` (module docstring); returns what it did, one line each. Best effort:
    an entry that cannot be handled now is left for the next open."""
    done: list[str] = []
    now = time.time()
    for entry in sorted(root.iterdir()):
        m = _LEFTOVER.fullmatch(entry.name)
        if m is None or entry.is_symlink() or not entry.is_dir():
            continue
        target = root / m.group("name")
        try:
            if m.group("kind") == "prev" and not (target.exists() or target.is_symlink()):
                os.rename(entry, target)
                done.append(f"restored {target.name} from {entry.name}")
                continue
            if now - _last_change(entry) >= stale_after_s:
                shutil.rmtree(entry)
                done.append(f"deleted {entry.name}")
        except OSError:
            continue
    return done


def _last_change(folder: Path) -> float:
    """The newest mtime of ``folder`` and of what it holds (a copy being written touches
    its file, not the folder), nested folders included (the legacy trash layout)."""
    newest = folder.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(folder):
        for f in (*dirnames, *filenames):
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, f)).st_mtime)
            except OSError:
                continue
    return newest
