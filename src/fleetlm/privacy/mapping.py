"""The placeholder syntax and the per-request mapping between placeholders and values.

A redacted text carries ``<TYPE_N>`` placeholders (``<PERSON_1>``, ``<EMAIL_ADDRESS_2>``);
:class:`PiiMapping` remembers which value each one stands for, hands out the next free
number per entity type, and gives the same placeholder to a value seen again. The router
keeps one mapping per request (all of its messages), the tuning pipeline one per row.

This module is plain bookkeeping: it knows nothing about how values are detected
(presidio, spaCy) and never logs or prints a value -- ``repr`` shows counts only, so a
mapping that ends up in a log line or a ledger leaks nothing.
"""

from __future__ import annotations

import re
from collections import Counter

# <TYPE_N>: TYPE is an upper-case presidio entity name (may contain '_' and digits),
# N a positive integer without leading zeros. No '<' or '>' inside, which is what lets
# the stream restorer cut a stream safely at any '<' (see restore.py).
PLACEHOLDER_RE = re.compile(r"<([A-Z][A-Z0-9_]*)_([1-9][0-9]*)>")
ENTITY_TYPE_RE = re.compile(r"[A-Z][A-Z0-9_]*")


def format_placeholder(entity_type: str, index: int) -> str:
    """The one place that spells a placeholder: serving and training data must agree."""
    assert ENTITY_TYPE_RE.fullmatch(entity_type) and index >= 1, (entity_type, index)
    return f"<{entity_type}_{index}>"


class PiiMapping:
    """placeholder <-> value for one request (or one training row), plus per-type counts.

    Not thread-safe: one mapping belongs to one request. Values are matched exactly
    (case and whitespace included): restoring must give back the original bytes.
    """

    __slots__ = ("_to_value", "_to_placeholder", "_types", "_next", "_reserved", "_occurrences")

    def __init__(self) -> None:
        self._to_value: dict[str, str] = {}  # "<PERSON_1>" -> "Ada Lovelace"
        self._to_placeholder: dict[str, str] = {}  # "Ada Lovelace" -> "<PERSON_1>"
        self._types: dict[str, str] = {}  # "<PERSON_1>" -> "PERSON"
        self._next: Counter[str] = Counter()  # entity type -> last number handed out
        # placeholder-shaped strings already present in the input: never handed out, so
        # a literal "<PERSON_1>" typed by a user cannot be mistaken for one of ours
        self._reserved: set[str] = set()
        self._occurrences: Counter[str] = Counter()  # entity type -> spans replaced

    # --- allocation (used by the redactor) ---------------------------------------------

    def reserve_literals(self, text: str) -> None:
        """Mark placeholder-shaped strings that occur in ``text`` as taken."""
        for m in PLACEHOLDER_RE.finditer(text):
            if m.group(0) not in self._to_value:
                self._reserved.add(m.group(0))

    def placeholder_for(self, value: str, entity_type: str) -> str:
        """The placeholder of ``value``: the one it already has, else the next free
        ``<entity_type_N>``. A value keeps its first placeholder even if a later
        detection labels it with another type (restoring depends on one-to-one)."""
        self._occurrences[entity_type] += 1
        known = self._to_placeholder.get(value)
        if known is not None:
            return known
        if not ENTITY_TYPE_RE.fullmatch(entity_type):
            raise ValueError(f"entity type {entity_type!r}: expected an upper-case name like PERSON")
        while True:
            self._next[entity_type] += 1
            ph = format_placeholder(entity_type, self._next[entity_type])
            if ph not in self._reserved:
                break
        self._to_value[ph] = value
        self._to_placeholder[value] = ph
        self._types[ph] = entity_type
        return ph

    # --- lookups ------------------------------------------------------------------------

    def value_of(self, placeholder: str) -> str | None:
        return self._to_value.get(placeholder)

    def placeholder_of(self, value: str) -> str | None:
        return self._to_placeholder.get(value)

    @property
    def placeholders(self) -> dict[str, str]:
        """A copy of placeholder -> value."""
        return dict(self._to_value)

    def known_values(self) -> list[tuple[str, str]]:
        """(value, entity type) of every mapped value, in allocation order."""
        return [(v, self._types[ph]) for ph, v in self._to_value.items()]

    def is_placeholder_prefix(self, text: str) -> bool:
        """Whether ``text`` is a proper prefix of one of this mapping's placeholders."""
        return any(len(ph) > len(text) and ph.startswith(text) for ph in self._to_value)

    # --- the ledger: types and counts, never values -------------------------------------

    def counts(self) -> dict[str, int]:
        """Distinct values per entity type (how many placeholders were handed out)."""
        return dict(Counter(self._types.values()))

    def occurrences(self) -> dict[str, int]:
        """Spans replaced per entity type (a value seen twice counts twice)."""
        return dict(self._occurrences)

    def __repr__(self) -> str:  # never the values
        return f"PiiMapping(counts={self.counts()})"
