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
