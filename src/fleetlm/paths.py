"""Where fleetlm keeps its data on this machine. Read from the environment when called,
never at import time.

    $FLEETLM_HOME                      if set: everything lives under it
    $XDG_DATA_HOME/fleetlm             else, if set (an absolute path, per the XDG spec)
    ~/.local/share/fleetlm             else

Caches (converted models, embedding tables) are apart, in :func:`cache_home`:

    $FLEETLM_CACHE                     if set
    $XDG_CACHE_HOME/fleetlm            else, if set
    ~/.cache/fleetlm                   else
"""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    home = os.environ.get("FLEETLM_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "fleetlm"
    return Path.home() / ".local" / "share" / "fleetlm"


def default_adapters_dir() -> Path:
    """The adapter store used when --adapters-dir is not given."""
    return data_home() / "adapters"


def cache_home() -> Path:
    """Where rebuildable caches live (deleting it costs time, never data)."""
    env = os.environ.get("FLEETLM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fleetlm"
