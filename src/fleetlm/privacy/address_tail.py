"""The tail of an address after a detected place: "Pune 411001", "Waipahu, HI 96797",
"São Paulo - SP, 05508-090", "Tokyo 150-0001", "Ciudad de México, 06600".

Postcodes and region codes alone are numbers and capital pairs that no pattern can tell
from any other; right after a place the learned recognizer found, they are the rest of
the address. So after detection, each LOCATION span is followed over separators
(blanks, commas, a dash) through at most one region code (two or three capitals,
typed LOCATION) and one postcode (4-6 digits, optionally with a dash part, or a Canadian,
British or Dutch code; typed ZIP_CODE), whichever the configuration redacts. A four-digit
number from 1800 to 2099 is taken for a year ("Paris 2024"), never for a postcode.

Pure text in, spans out; this module knows nothing about presidio or models.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fleetlm.privacy.spans import PiiSpan

_SEP = r"[ \t]*(?:[,\-–][ \t]*)?"
_REGION = r"(?P<region>[A-Z]{2,3})(?![\w\-])"
_CODE = (r"(?P<code>\d{5}-\d{3,4}|\d{3}-\d{4}|\d{2}-\d{3}|\d{4,6}"
         r"|[A-Z]\d[A-Z][ ]?\d[A-Z]\d|[A-Z]{1,2}\d[A-Z\d]?[ ]\d[A-Z]{2}|\d{4}[ ]?[A-Z]{2})(?![\w\-])")
TAIL = re.compile(_SEP + r"(?:" + _REGION + _SEP + r")?(?:" + _CODE + r")?")
YEAR = re.compile(r"\A(?:18|19|20)\d\d\Z")
SCORE = 0.5  # between a bare pattern's and a checksum's; over the default threshold


def extend_places(text: str, spans: Sequence[PiiSpan], entities: Sequence[str]
                  ) -> list[PiiSpan]:
    """``spans`` plus the region codes (LOCATION) and postcodes (ZIP_CODE) that follow a
    LOCATION span, where ``entities`` lists those types."""
    want_region = "LOCATION" in entities
    want_code = "ZIP_CODE" in entities
    out = list(spans)
    if not (want_region or want_code):
        return out
    for s in spans:
        if s.entity_type != "LOCATION":
            continue
        m = TAIL.match(text, s.end)
        if m is None:
            continue
        code = m.group("code")
        if code is not None and YEAR.match(code):
            code = None
        region = m.group("region")
        alone = code is None and region is not None and _ends_clause(text, m.end("region"))
        if region is not None and want_region and (code is not None or alone):
            out.append(PiiSpan(m.start("region"), m.end("region"), "LOCATION", SCORE))
        if code is not None and want_code:
            out.append(PiiSpan(m.start("code"), m.end("code"), "ZIP_CODE", SCORE))
    return out


def _ends_clause(text: str, end: int) -> bool:
    """A region code stands alone at the end of an address: before a stop, a comma, a
    line break or the end of the text ("Toronto, ON." but not "Paris, OK then")."""
    rest = text[end:end + 2]
    return rest == "" or rest[0] in ".,;\n)" or (rest[0] == " " and rest[1:2] in ("", "\n"))
