"""Prefix caching: requests that start with the same tokens reuse their keys and values.

A route's system prompt, few-shot examples or a task card precede every request of that
route; computing their keys and values once and copying them into each new request's KV
row replaces most of the prompt's prefill with a copy (tens of MB at memory speed instead
of a forward over hundreds of tokens).

Prefixes are cut at multiples of ``block`` tokens. An entry holds the keys and values of
one sequence's prompt up to its last whole block, ``[layers, 2, kv_heads, n, head_dim]`` in
the cache's dtype, and is found through the hash of each of its block boundaries, so a
prompt that shares only its first blocks with a cached one reuses those. Keys chain a
BLAKE2b hash over the adapter's name and the tokens, block by block: a prefix computed
with one adapter is never used for another (LoRA changes keys and values), and a lookup
costs one pass over the prompt. Entries are evicted least recently used under a byte
budget; :meth:`drop_adapter` forgets an adapter's entries when the adapter changes.

At least one prompt token is always left to compute: its logits give the first sampled
token. This module holds bookkeeping and tensors only; the engine decides when to look up
and store, the runner copies to and from its cache rows.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass
class PrefixHit:
    kv: Tensor  # [layers, 2, kv_heads, >= n, head_dim]
    n: int  # prompt tokens whose keys and values it holds (a multiple of the block)


@dataclass
class _Entry:
    kv: Tensor
    adapter: str | None
    boundaries: list[bytes]  # the hash at each block boundary, in order


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 32) -> None:
        if budget_bytes < 0 or block < 1:
            raise ValueError(f"prefix cache: budget_bytes={budget_bytes} must be >= 0 and "
                             f"block={block} >= 1")
        self.budget_bytes = budget_bytes
        self.block = block
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # LRU order, last = newest
        self._index: dict[bytes, bytes] = {}  # boundary hash -> key of an entry holding it
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _boundaries(self, adapter: str | None, tokens: Sequence[int], blocks: int) -> list[bytes]:
        h = hashlib.blake2b(("adapter:" + (adapter or "")).encode(), digest_size=16)
        out = []
        for b in range(blocks):
            h.update(array("q", tokens[b * self.block: (b + 1) * self.block]).tobytes())
            out.append(h.copy().digest())
        return out

    def lookup(self, adapter: str | None, prompt: Sequence[int]) -> PrefixHit | None:
        """The longest cached prefix of ``prompt`` shorter than the prompt (at least one
        token is left to compute), or None."""
        blocks = (len(prompt) - 1) // self.block
        for b, h in reversed(list(enumerate(self._boundaries(adapter, prompt, blocks)))):
            key = self._index.get(h)
            if key is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                n = (b + 1) * self.block
                self.hit_tokens += n
                return PrefixHit(self._entries[key].kv, n)
        self.misses += 1
        return None

    def wants(self, adapter: str | None, prompt: Sequence[int]) -> int:
        """How many tokens of ``prompt`` to store after its prefill: its whole blocks
        (leaving at least one token), 0 when there are none or they are cached already."""
        blocks = (len(prompt) - 1) // self.block
        if blocks == 0 or self.budget_bytes == 0:
            return 0
        last = self._boundaries(adapter, prompt, blocks)[-1]
        return 0 if last in self._index else blocks * self.block

    def put(self, adapter: str | None, prompt: Sequence[int], kv: Tensor) -> None:
        """Store the keys and values ``kv`` of ``prompt``'s first ``kv.shape[3]`` tokens (a
        multiple of the block)."""
        n = kv.shape[3]
        if n == 0 or n % self.block:
            raise ValueError(f"prefix cache: {n} tokens is not a positive multiple of the "
                             f"block ({self.block})")
        size = kv.numel() * kv.element_size()
        if size > self.budget_bytes:
            return
        bounds = self._boundaries(adapter, prompt, n // self.block)
        key = bounds[-1]
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        while self._entries and self.nbytes + size > self.budget_bytes:
            self._evict(next(iter(self._entries)))
        self._entries[key] = _Entry(kv, adapter, bounds)
        self.nbytes += size
        for h in bounds:
            self._index[h] = key  # the newest entry answers for a shared boundary

    def _evict(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.kv.numel() * entry.kv.element_size()
        for h in entry.boundaries:
            if self._index.get(h) == key:
                # another entry may hold this boundary too: point at it, or forget it
                other = next((k for k, e in reversed(self._entries.items()) if h in e.boundaries),
                             None)
                if other is None:
                    del self._index[h]
                else:
                    self._index[h] = other

    def drop_adapter(self, adapter: str | None) -> None:
        for key in [k for k, e in self._entries.items() if e.adapter == adapter]:
            self._evict(key)

    def clear(self) -> None:
        for key in list(self._entries):
            self._evict(key)
