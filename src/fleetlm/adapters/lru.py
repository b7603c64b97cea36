"""Bookkeeping of the warm tier: an LRU of named entries under a byte budget, with pins.

Plain Python, no tensors and no locking (the store holds its lock around every call), so
the eviction rules are unit-tested on their own. It only knows names, sizes and order;
what an entry holds and where it came from is the store's business.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class WarmLRU(Generic[V]):
    """Entries in least- to most-recently-used order.

    Pinned names are never evicted; a pin may be set before its entry arrives. After a
    ``put`` the total is at most ``budget_bytes`` unless what remains is pinned entries
    and the entry just put (which is kept: its caller is about to use it).
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._pinned: set[str] = set()
        self.nbytes = 0

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> V | None:
        """The entry (now the most recently used), or None."""
        if name not in self._entries:
            return None
        self._entries.move_to_end(name)
        return self._entries[name][0]

    def peek(self, name: str) -> V | None:
        """The entry without touching the order, or None."""
        entry = self._entries.get(name)
        return None if entry is None else entry[0]

    def put(self, name: str, value: V, nbytes: int) -> list[str]:
        """Insert or replace ``name`` as most recent; returns the names evicted to fit."""
        self.drop(name)
        self._entries[name] = (value, nbytes)
        self.nbytes += nbytes
        return self._shrink(keep=name)

    def drop(self, name: str) -> bool:
        """Remove ``name`` (pinned or not); True if it was there. The pin, if any, stays."""
        entry = self._entries.pop(name, None)
        if entry is None:
            return False
        self.nbytes -= entry[1]
        return True

    def pin(self, name: str) -> None:
        self._pinned.add(name)

    def unpin(self, name: str) -> list[str]:
        """Unpin ``name``; returns the names evicted now that it may go."""
        self._pinned.discard(name)
        return self._shrink()

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    def names(self) -> list[str]:
        """Least recently used first."""
        return list(self._entries)

    def _shrink(self, keep: str | None = None) -> list[str]:
        evicted = []
        for name in list(self._entries):
            if self.nbytes <= self.budget_bytes:
                break
            if name == keep or name in self._pinned:
                continue
            self.drop(name)
            evicted.append(name)
        return evicted
