"""A detected span of personal data (what detection hands to redaction).

This module knows nothing about presidio, models or placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PiiSpan:
    """One detected entity: text[start:end] is the value (never stored here). score is
    presidio's; 0.0 marks a repeat of a value detected elsewhere in the request."""

    start: int
    end: int
    entity_type: str
    score: float


def _wordlike(c: str, extra: str) -> bool:
    return c.isalnum() or c == "_" or c in extra


def whole_word_matches(text: str, value: str, extra: str = "") -> list[tuple[int, int]]:
    """Where ``value`` stands in ``text`` as a whole word: not preceded (where ``value``
    starts with a word character) nor followed (where it ends with one) by a word
    character -- a letter, digit or ``_`` (re's ``\\w``), or one of ``extra``. A find
    loop, not a regex: a pattern compiled per value would cost more than the search."""
    if not value:
        return []
    guard_left = _wordlike(value[0], "")
    guard_right = _wordlike(value[-1], "")
    out: list[tuple[int, int]] = []
    i = text.find(value)
    while i >= 0:
        end = i + len(value)
        if not (guard_left and i > 0 and _wordlike(text[i - 1], extra)) \
                and not (guard_right and end < len(text) and _wordlike(text[end], extra)):
            out.append((i, end))
        i = text.find(value, i + 1)
    return out
