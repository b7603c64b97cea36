"""The learned recognizer's tag set, and the two pure conversions around the model:
gold character spans -> one BIO tag per word piece (training), and per-piece tag
probabilities -> character spans (inference).

Word pieces are given as character offsets ``(start, end)`` into the text, as a fast
tokenizer reports them; ``(0, 0)`` marks a special or padding piece (no tag). Nothing
here imports torch or a tokenizer: lists in, lists out, so it is tested on hand-made
offsets.

This module knows the synthetic set's type names and presidio's; nothing about models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The types pattern recognizers cannot find (free text: names, places, organisations,
# dates, nationalities, titles), dataset type -> the type of the placeholder. The
# structured types (e-mail, phone, card, IBAN, SSN, IP, URL, AGE, ZIP_CODE) stay with the
# pattern recognizers (presidio's and fleetlm.privacy.patterns), whose checksums and
# formats are exact; the model is trained to tag them O (not a name, not a place).
# TITLE (honorifics and job titles, as presidio's synthetic set labels them) is not a
# presidio type: it is fleetlm's, and redacted only when listed in PiiConfig.entities.
GOLD_TO_LEARNED: Mapping[str, str] = {
    "PERSON": "PERSON",
    "GPE": "LOCATION",
    "STREET_ADDRESS": "LOCATION",
    "ORGANIZATION": "ORGANIZATION",
    "DATE_TIME": "DATE_TIME",
    "NRP": "NRP",
    "TITLE": "TITLE",
}
LEARNED_TYPES: tuple[str, ...] = ("PERSON", "LOCATION", "ORGANIZATION", "DATE_TIME", "NRP",
                                  "TITLE")
IGNORE = -100  # the tag of special and padding pieces: no loss, no prediction


def bio_labels(types: Sequence[str] = LEARNED_TYPES) -> list[str]:
    """``["O", "B-PERSON", "I-PERSON", ...]``: id -> tag name."""
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


@dataclass(frozen=True, slots=True)
class CharSpan:
    """text[start:end] is an entity of ``entity_type``; ``score`` is the model's mean
    probability of the tags it was decoded from (1.0 for gold)."""

    start: int
    end: int
    entity_type: str
    score: float = 1.0


def gold_spans(row: Mapping[str, Any]) -> list[CharSpan]:
    """The learned types' spans of one synthetic-set row (other types dropped)."""
    out = []
    for s in row["spans"]:
        t = GOLD_TO_LEARNED.get(str(s["entity_type"]))
        if t is not None:
            out.append(CharSpan(int(s["start_position"]), int(s["end_position"]), t))
    return sorted(out, key=lambda s: (s.start, s.end))


def tag_pieces(offsets: Sequence[tuple[int, int]], spans: Sequence[CharSpan],
               labels: Sequence[str]) -> list[int]:
    """One tag id per piece: B-T on the first piece overlapping a span of type T, I-T on
    the following ones, O outside, IGNORE on special pieces. A piece overlapping two
    spans takes the first."""
    index = {name: i for i, name in enumerate(labels)}
    tags: list[int] = []
    seen: set[int] = set()  # spans whose first piece was met
    for start, end in offsets:
        if end <= start:
            tags.append(IGNORE)
            continue
        tag = index["O"]
        for k, s in enumerate(spans):
            if start < s.end and s.start < end:
                tag = index[("I-" if k in seen else "B-") + s.entity_type]
                seen.add(k)
                break
        tags.append(tag)
    return tags


def case_flags(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """1 where a piece starts with an upper-case letter, else 0. The encoder is uncased,
    so this is the only trace of capitals it gets (fed as BERT's token type)."""
    return [1 if end > start and text[start].isupper() else 0 for start, end in offsets]


def decode(text: str, offsets: Sequence[tuple[int, int]], probs: Sequence[Sequence[float]],
           labels: Sequence[str], best: Sequence[int] | None = None) -> list[CharSpan]:
    """Character spans from per-piece tag probabilities (rows aligned with ``offsets``;
    special pieces are skipped). Lenient BIO: a piece whose most probable tag is not O is
    part of an entity; a B- tag starts one, an I- tag continues the open one whatever its
    type (or starts one). Each span is then typed by vote: the type with the most B- plus
    I- probability summed over its pieces, so "John" (B-PERSON) "Smith" (I-ORGANIZATION
    0.52, I-PERSON 0.33) is one PERSON, never a name cut in two with half of it typed as
    something not redacted. Then each span grows to whole words (a placeholder never
    leaves half a name in the clear) and spans of one type separated only by blanks are
    joined ("450 Præstevænget 15" is one place).

    ``best``: each row's most probable tag index where the caller has it already (a tensor's
    argmax: the first of equal maxima, as here); else it is found row by row."""
    types = sorted({name[2:] for name in labels if name != "O"})
    columns = {t: [i for i, name in enumerate(labels) if name[2:] == t] for t in types}
    spans: list[list[tuple[int, int, Sequence[float]]]] = []
    open_span: list[tuple[int, int, Sequence[float]]] | None = None
    if best is None:
        best = [max(range(len(row)), key=row.__getitem__) for row in probs]
    opening: list[str] = []  # each span's first tag
    for (start, end), row, k in zip(offsets, probs, best, strict=True):
        if end <= start:
            continue
        name = labels[k]
        if name == "O":
            open_span = None
            continue
        if not (name.startswith("I-") and open_span is not None):
            open_span = []
            spans.append(open_span)
            opening.append(name[2:])
        open_span.append((start, end, row))
    out = []
    for pieces, first in zip(spans, opening, strict=True):
        mass = {t: sum(row[i] for _, _, row in pieces for i in columns[t]) for t in types}
        kind = max(types, key=lambda t: (mass[t], t == first))  # a tie: the opening tag's
        out.append(_whole_words(text, pieces[0][0], pieces[-1][1], kind,
                                min(1.0, mass[kind] / len(pieces))))
    return _join_blank_separated(text, out)


def _whole_words(text: str, start: int, end: int, entity_type: str, score: float) -> CharSpan:
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum():
        end += 1
    return CharSpan(start, end, entity_type, score)


def _join_blank_separated(text: str, spans: list[CharSpan]) -> list[CharSpan]:
    out: list[CharSpan] = []
    for s in sorted(spans, key=lambda s: (s.start, s.end)):
        last = out[-1] if out else None
        if (last is not None and last.entity_type == s.entity_type
                and (s.start <= last.end or text[last.end:s.start].isspace())):
            out[-1] = CharSpan(last.start, max(last.end, s.end), s.entity_type,
                               min(last.score, s.score))
            continue
        out.append(s)
    return out
