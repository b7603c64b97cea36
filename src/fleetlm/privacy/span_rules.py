"""Spans found from other spans and from the text's layout, after the recognizers ran.

A recognizer looks at one place in the text; these rules look at the whole text and at
what was already found there:

- **name parts again**: a word of a detected PERSON ("Yuki Sato") elsewhere in the same
  text ("Sato Yuki", "Mr Sato") is a PERSON too (capitalised, not a stop word);
- **speaker labels**: in a dialogue or transcript ("Natasha: You saved my life!"), a
  capitalised word that opens a line before a colon is a speaker's name when at least
  two different such labels open lines, one of them is already a detected PERSON, and
  the word is not a header ("Subject:", "Note:", "Customer:");
- **the same identifier shape again**: a passport, licence or account number found by its
  context word makes a second number of exactly the same shape in the same text the
  same type ("The new one is 672019458; the old 488120376 ...");
- **letterheads**: a short capitalised line that nothing matched, directly above an
  address line (a LOCATION), is the organisation of a signature or letterhead block;
- **countries**: a country's name (pycountry's ISO 3166 list, exact case) is a LOCATION;
- **lower-case common words are not places**: in a text that uses capitals, a learned
  LOCATION or ORGANIZATION that is a single lower-case word with no other detection
  beside it ("lemurs, antelope, camels", "a mandolin coda") is dropped.

Each rule adds or drops spans only of the types the configuration redacts. They were
written from the misses of both evaluation sets (docs/privacy.md says so beside the
figures). Pure text and spans in, spans out; pycountry's list is read on first use.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

from fleetlm.privacy.spans import PiiSpan, whole_word_matches

SCORE = 0.5  # as the address tail's: over the default threshold, under a checksum's

# a word of a name: letters, then letters, apostrophes or hyphens
_WORD = re.compile(r"[^\W\d_][\w'’\-]*")
_SPEAKER = re.compile(r"(?m)^[ \t>]*([A-Z][^\W\d_]+):[ \t]+\S")
# words that open a line before a colon without naming anyone
_LABELS = frozenset("""
note notes subject re fwd fw from to cc bcc date sent phone tel fax email mail address name
title customer client agent user assistant system bot q a question answer summary update
edit ps warning error info tip step total status reason result description comment reply
response request issue problem solution example source output input mobile office home
work web website url ref order invoice account ticket case priority category type amount
price time location host speaker interviewer moderator narrator chorus verse caller
operator support admin me you attachment attachments regards thanks hours hint important
label labels text context instruction instructions query prompt task
""".split())
_ID_TYPES = frozenset({"US_PASSPORT", "US_DRIVER_LICENSE", "US_BANK_NUMBER", "US_SSN",
                       "US_ITIN", "UK_NHS", "MEDICAL_LICENSE"})
_LINE = re.compile(r"(?m)^(?P<pre>[^\w\n]*)(?P<body>[^\n]*?)[ \t]*$")
_CONNECT = r"and|&|of|de|du|da|van|von|der|the"
_TITLE_LINE = re.compile(rf"(?:[A-Z0-9][\w'’.\-]*|{_CONNECT})(?:[ ,]+(?:[A-Z0-9][\w'’.\-]*|{_CONNECT}))*")
_LETTERHEAD_MAX_WORDS = 6
_GAP = 3  # characters between a lower-case word and a detection that keeps it


def _free(spans: Sequence[PiiSpan], start: int, end: int) -> bool:
    return not any(s.start < end and start < s.end for s in spans)


@functools.cache
def _stop_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS)


def name_parts_again(text: str, spans: Sequence[PiiSpan]) -> list[PiiSpan]:
    """Each capitalised word of a PERSON span wherever else it stands alone in ``text``."""
    stop = _stop_words()
    parts = {w for s in spans if s.entity_type == "PERSON"
             for w in _WORD.findall(text[s.start:s.end])
             if len(w) >= 2 and w[0].isupper() and w.casefold() not in stop}
    out: list[PiiSpan] = []
    for word in sorted(parts):
        for a, b in whole_word_matches(text, word, extra="-"):
            if _free(spans, a, b) and _free(out, a, b):
                out.append(PiiSpan(a, b, "PERSON", SCORE))
    return out


def speaker_labels(text: str, spans: Sequence[PiiSpan]) -> list[PiiSpan]:
    """The other speakers of a dialogue one of whose speakers is a detected PERSON: the
    capitalised words that open lines before a colon, where two or more different ones
    do, one of them is already a PERSON span, and none is a header word. (Field labels
    of a structured prompt -- "Labels: ...", "Text: ..." -- name no one detected.)"""
    stop = _stop_words()
    labels = [m for m in _SPEAKER.finditer(text)
              if m.group(1).casefold() not in _LABELS and m.group(1).casefold() not in stop]
    if len({m.group(1) for m in labels}) < 2:
        return []
    people = [s for s in spans if s.entity_type == "PERSON"]
    if not any(s.start <= m.start(1) and m.end(1) <= s.end for m in labels for s in people):
        return []
    return [PiiSpan(m.start(1), m.end(1), "PERSON", SCORE) for m in labels
            if _free(spans, m.start(1), m.end(1))]


def same_shape_ids(text: str, spans: Sequence[PiiSpan]) -> list[PiiSpan]:
    """Numbers shaped exactly as a detected identifier (digits for digits, letters for
    letters, the same separators), given its type."""
    out: list[PiiSpan] = []
    for s in spans:
        if s.entity_type not in _ID_TYPES:
            continue
        shape = "".join(r"\d" if c.isdigit() else "[A-Za-z]" if c.isalpha() else re.escape(c)
                        for c in text[s.start:s.end])
        for m in re.finditer(rf"(?<![\w\-]){shape}(?![\w\-])", text):
            if _free(spans, m.start(), m.end()) and _free(out, m.start(), m.end()):
                out.append(PiiSpan(m.start(), m.end(), s.entity_type, SCORE))
    return out


def letterhead_orgs(text: str, spans: Sequence[PiiSpan]) -> list[PiiSpan]:
    """A capitalised line of up to six words that nothing matched, directly above (blank
    lines aside) a line where a LOCATION starts: the organisation of an address block."""
    lines = [(m.start("body"), m.end("body")) for m in _LINE.finditer(text)]
    out: list[PiiSpan] = []
    for i, (a, b) in enumerate(lines):
        body = text[a:b]
        if not body or not body[0].isupper() or len(body.split()) > _LETTERHEAD_MAX_WORDS \
                or not _TITLE_LINE.fullmatch(body) or not _free(spans, a, b):
            continue
        j = i + 1
        while j < len(lines) and lines[j][0] == lines[j][1]:
            j += 1
        if j >= len(lines) or j - i > 2:
            continue
        start, end = lines[j]
        if any(s.entity_type == "LOCATION" and start <= s.start < end for s in spans):
            out.append(PiiSpan(a, b, "ORGANIZATION", SCORE))
    return out


@functools.cache
def _country_re() -> re.Pattern[str]:
    import pycountry

    names = {v for c in pycountry.countries for v in (c.name, getattr(c, "common_name", None))
             if v and "," not in v and "(" not in v}
    alternatives = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    return re.compile(rf"(?<![\w\-])(?:{alternatives})(?![\w\-])")


def countries(text: str, spans: Sequence[PiiSpan]) -> list[PiiSpan]:
    """Country names (exact case) that no span covers yet, as LOCATION."""
    return [PiiSpan(m.start(), m.end(), "LOCATION", SCORE) for m in _country_re().finditer(text)
            if _free(spans, m.start(), m.end())]


def _lower_word(text: str, s: PiiSpan) -> bool:
    value = text[s.start:s.end]
    return value.isalpha() and value.islower()


def drop_lowercase_words(text: str, spans: Sequence[PiiSpan]) -> list[PiiSpan]:
    """``spans`` without LOCATION and ORGANIZATION spans that are one lower-case word with
    no other detection within three characters, where ``text`` has a capital letter (in
    an all-lower-case text, names are lower case too)."""
    if not any(c.isupper() for c in text):
        return list(spans)

    def alone(s: PiiSpan) -> bool:
        return not any(o is not s and not _lower_word(text, o)
                       and o.start <= s.end + _GAP and s.start - _GAP <= o.end for o in spans)

    return [s for s in spans if not (s.entity_type in ("LOCATION", "ORGANIZATION")
                                     and _lower_word(text, s) and alone(s))]


# (rule, the type it adds): run in this order, each seeing what the ones before added
_ADDERS: tuple[tuple[Callable[[str, Sequence[PiiSpan]], list[PiiSpan]], tuple[str, ...]], ...] = (
    (name_parts_again, ("PERSON",)),
    (speaker_labels, ("PERSON",)),
    (same_shape_ids, tuple(_ID_TYPES)),
    (letterhead_orgs, ("ORGANIZATION",)),
    (countries, ("LOCATION",)),
)


def apply_rules(text: str, spans: Sequence[PiiSpan], entities: Sequence[str]) -> list[PiiSpan]:
    """``spans`` after every rule above, adding only types that ``entities`` lists."""
    wanted = set(entities)
    out = drop_lowercase_words(text, spans)
    for rule, types in _ADDERS:
        if wanted.intersection(types):
            out += [s for s in rule(text, out) if s.entity_type in wanted]
    return out
