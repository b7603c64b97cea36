"""fleetlm's own pattern recognizers (presidio ``PatternRecognizer`` subclasses) for
structured personal data, added to presidio's predefined registry by detect.py; the
presidio recognizers they supersede are named in ``REPLACED``.

What each finds, and why it exists:

- ``FastPhoneRecognizer`` (PHONE_NUMBER; replaces presidio's ``PhoneRecognizer``, which
  runs ``phonenumbers.PhoneNumberMatcher`` over the whole text once per region, ~4 ms per
  100 words, and only keeps numbers valid in one of 8 regions). One compiled regex finds
  digit groups joined by single separators (space, dot, dash, slash, parentheses), with an
  optional ``+CC``/``00CC`` prefix, a ``(0)`` trunk and an extension (``x123``,
  ``ext. 12``); each candidate is checked with ``phonenumbers`` against a list of regions.
  Scores: 1.0 valid with a ``+CC`` (as sure as a checksum), 0.4 valid national with
  separators or possible international or ``+CC`` then digit groups (presidio's score), 0.3 valid but a bare digit
  run or two plain groups ("17151 2450": house numbers), or only *possible*, 0.15
  phone-shaped only; the lower ones need a context word ("phone", "call", "mobile", ...)
  to reach the 0.4 threshold. Candidates that are dates, IP addresses, ZIP+4, Luhn-valid
  card numbers, the tail of an IBAN, follow "order", "invoice", "ref", ..., or are bare
  digit runs in a sentence about a passport, account, card, ... are dropped. A separated
  candidate followed by a phone label that ends its line or list item ("781 1704
  office", "555-0199 (fax),") scores at least 0.4: presidio's context words only look
  before a detection, and signature blocks put the label after the number.
- ``CardRecognizer`` (CREDIT_CARD; replaces ``CreditCardRecognizer``): 12-19 digits,
  unseparated or grouped by one kind of separator (4-4-4-4, 4-6-5, 4-4-4-4-3, ...),
  issuer prefix of a current or legacy scheme (Visa, Mastercard incl. 2221-2720, Amex,
  Diners, Discover, JCB incl. 1800/2131, UnionPay, Maestro, Mir, RuPay, Troy, UATP),
  Luhn-checked. A 12-digit (Maestro) number scores 0.3: it needs "card" nearby.
- ``FleetIbanRecognizer`` (IBAN_CODE; replaces presidio's ``IbanRecognizer``): country code,
  check digits and BBAN, upper or lower case, unspaced or in groups of four separated by
  spaces or dashes; the span is cut at the country's registered length and must pass the
  ISO 7064 mod-97 check.
- ``AgeRecognizer`` (AGE, presidio has none): the number in "34 years old", "a
  29-year-old", "aged 71", "age: 45", "at the age of 61", "58 y/o", "I just turned 47",
  "I'm 40", "she is only 15 and", "Jane Doe, 34, ...", "my son Tom (11)" (the span is
  the number, as the labelled sets mark it; "the price is 9." is not an age).
- ``ZipCodeRecognizer`` (ZIP_CODE, presidio has none): a code after "zip", "postal
  code", "postcode"; US 5-digit / ZIP+4 after a state abbreviation (0.5) or any
  two-letter region after a town (0.4); a European-style code between ", " and a town
  ("Hauptstraße 12, 69117 Heidelberg", "00-514 Warszawa", "1016 EZ Amsterdam"; 0.4);
  UK ("SW1A 1AA") and Canadian ("K1A 0B1") postcodes on their own (distinctive formats).
- ``ContextIdRecognizer`` subclasses for US_DRIVER_LICENSE, US_PASSPORT, US_BANK_NUMBER
  and US_SSN: the identifier right after its name ("driver's license number is ...",
  "passport no. ...", "account number: ...", "SSN ..."); the name is part of the regex,
  so they add recall where presidio's bare-format versions (kept) score too low, with
  few false positives.
- ``BirthDateRecognizer`` (DATE_TIME): a date only after "born on", "DOB", "date of
  birth", "birthday": a date of birth identifies a person, other dates do not.
- ``ChunkedUrlRecognizer`` (URL; replaces presidio's ``UrlRecognizer``): presidio's own
  patterns, run only on the whitespace-free chunks that can hold a URL (the same spans,
  ~0.7 ms less per 100 words).

Regexes are compiled when a recognizer is built (not at import) and are written so that
no input backtracks super-linearly (separators are mandatory between digit groups).
This module imports presidio: only detect.py imports it, when the analyzer is built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from presidio_analyzer import (
    AnalysisExplanation,
    EntityRecognizer,
    Pattern,
    PatternRecognizer,
    RecognizerResult,
)
from presidio_analyzer.predefined_recognizers import UrlRecognizer

# names of presidio's predefined recognizers that recognizers() supersedes
REPLACED: tuple[str, ...] = ("PhoneRecognizer", "CreditCardRecognizer", "IbanRecognizer",
                             "UrlRecognizer")

# (start, end, score) of one accepted detection
Hit = tuple[int, int, float]


class _Recognizer(PatternRecognizer):
    """A PatternRecognizer whose matches go through ``check`` (span and score per match),
    with its patterns compiled once, here. presidio's context enhancement, thresholds
    and allow-lists apply to its results as to any PatternRecognizer's."""

    FLAGS: int = re.IGNORECASE

    def __init__(self, entity: str, patterns: list[Pattern], context: list[str],
                 language: str) -> None:
        super().__init__(supported_entity=entity, patterns=patterns, context=context,
                         supported_language=language, name=type(self).__name__)
        self._compiled = [(p, re.compile(p.regex, self.FLAGS)) for p in patterns]

    def check(self, text: str, m: re.Match[str], pattern: Pattern) -> Iterable[Hit]:
        """Accepted spans of one match: by default the group "v" (or the whole match)
        at the pattern's score, if validate_result does not reject it."""
        start, end = m.span("v") if "v" in m.re.groupindex and m.group("v") else m.span()
        ok = self.validate_result(text[start:end])
        if ok is False or self.invalidate_result(text[start:end]):
            return ()
        return ((start, end, EntityRecognizer.MAX_SCORE if ok else pattern.score),)

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None,
                regex_flags: int | None = None) -> list[RecognizerResult]:
        results: list[RecognizerResult] = []
        name: str = type(self).__name__
        for pattern, rx in self._compiled:
            for m in rx.finditer(text):
                for start, end, score in self.check(text, m, pattern):
                    if score <= EntityRecognizer.MIN_SCORE:
                        continue
                    explanation = AnalysisExplanation(
                        recognizer=name, original_score=score, pattern_name=pattern.name,
                        pattern=pattern.regex)
                    results.append(RecognizerResult(
                        entity_type=self.supported_entities[0], start=start, end=end,
                        score=score, analysis_explanation=explanation,
                        recognition_metadata={
                            RecognizerResult.RECOGNIZER_NAME_KEY: name,
                            RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id}))
        return EntityRecognizer.remove_duplicates(results)


# ---------------------------------------------------------------- shared checks

def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_iin(digits: str) -> str | None:
    """'strong' for an issuer prefix and length of a current or legacy scheme, 'weak' for
    a 12-digit Maestro-range number, None otherwise."""
    n = len(digits)
    p2, p4, p6 = int(digits[:2]), int(digits[:4]), int(digits[:6])
    if n == 12:
        return "weak" if digits[0] in "56" else None
    if not 13 <= n <= 19:
        return None
    d = digits[0]
    if d == "4":  # Visa 13/16/19 (Visa Electron etc. within)
        return "strong" if n in (13, 16, 19) else None
    if d == "5":  # Mastercard 51-55 (16); Maestro 50, 56-59 (12-19)
        return "strong" if (51 <= p2 <= 55 and n == 16) or p2 == 50 or p2 >= 56 else None
    if d == "2":  # Mastercard 2221-2720; Mir 2200-2204; JCB legacy 2131 (15)
        if 2221 <= p4 <= 2720 and n == 16:
            return "strong"
        if 2200 <= p4 <= 2204 and n >= 16:
            return "strong"
        return "strong" if p4 == 2131 and n == 15 else None
    if d == "3":  # Amex 34/37 (15); Diners 30, 36, 38, 39 (14-19); JCB 3528-3589 (16-19)
        if p2 in (34, 37):
            return "strong" if n == 15 else None
        if p2 in (30, 36, 38, 39):
            return "strong" if n >= 14 else None
        return "strong" if n >= 16 else None  # JCB 3528-3589 (and issuers' 35xx test ranges)
    if d == "6":  # Discover 6011/644-649/65, UnionPay 62, Maestro 6x, RuPay 60, Troy...
        return "strong" if n >= 16 or (p4 in (6304, 6759, 6761, 6762, 6763) and n >= 13) \
            or (622126 <= p6 <= 622925) else "strong" if n >= 13 and p2 in (63, 67) else None
    if d == "1":  # UATP (15), JCB legacy 1800 (15)
        return "strong" if n == 15 else None
    if d == "8":  # UnionPay 81, RuPay 82
        return "strong" if p2 in (81, 82) and n >= 16 else None
    if d == "9":  # Troy 9792
        return "strong" if p4 == 9792 and n == 16 else None
    return None


def card_like(digits: str) -> bool:
    return _card_iin(digits) is not None and luhn_ok(digits)


# ISO 13616 registry: country -> IBAN length
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}


def iban_ok(compact: str) -> bool:
    """compact: upper case, no separators."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact[2:4].isdigit():
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


# text just before a digit run that makes it the tail of an IBAN ("GB37 LTXZ 8421 ...")
_IBAN_HEAD = re.compile(r"\b[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]{4})*[ -]?$", re.IGNORECASE)


def _in_iban(text: str, start: int) -> bool:
    return _IBAN_HEAD.search(text, max(0, start - 40), start) is not None


# ---------------------------------------------------------------- phone

PHONE_CONTEXT = ["phone", "number", "telephone", "cell", "cellphone", "mobile", "call",
                 "tel", "fax", "reach", "contact", "text", "whatsapp", "sms", "landline",
                 "dial", "ring", "desk", "office", "home", "work"]
# regions tried, in order, for numbers without a country code
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "AU", "CA", "BR", "NL", "BE", "IT", "ES",
                 "CH", "AT", "SE", "DK", "NO", "FI", "IE", "PL", "ZA", "NZ", "JP", "MX",
                 "IL")
_NOT_PHONE_BEFORE = re.compile(
    r"(?:order|invoice|ref|reference|tracking|ticket|case|account|acct|iban|ssn|passport"
    r"|licen[cs]e|routing|zip|postal|postcode|serial|sku|model|version|isbn|id|no\.|#|"
    r"\$|€|£|usd|eur|gbp|total|price|amount)\W{0,3}(?:number|no\.?|num|#|id|is|:)?\W{0,3}$",
    re.IGNORECASE)
_PHONE_WORD_BEFORE = re.compile(
    r"(?:phone|tel|call|mobile|cell|fax|reach|contact|text|whatsapp|sms|dial|ring)",
    re.IGNORECASE)
# a line label after the number, as signature blocks write them ("781 1704 office",
# "555-0199 (fax)"): presidio's context words look only at the words before a detection
_PHONE_LABEL_AFTER = re.compile(
    r"[ ]?(?:[:\-\u2013][ ]?|\()?(?:office|fax|mobile|cell|tel|phone|home|work|direct"
    r"|landline|whatsapp)\b\)?[ ]*(?:$|\n|[,;|/])", re.IGNORECASE)
_ID_WORD = re.compile(
    r"\b(?:passport|licen[cs]e|account|acct|ssn|social security|card|iban|routing|order"
    r"|invoice|tracking|customer|member|policy|reference|serial)\b", re.IGNORECASE)
_DATE_SHAPE = re.compile(
    r"(?:\d{4}(?P<s1>[-/.])\d{1,2}(?P=s1)\d{1,2}|\d{1,2}(?P<s2>[-/.])\d{1,2}(?P=s2)(?:\d{4}|\d{2}))"
    r"(?:[ T]\d{1,2})?")  # a date, perhaps with the hour of "2024-05-01 10:30"
_IP_SHAPE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_ZIP4 = re.compile(r"\d{5}-\d{4}")  # US ZIP+4; no phone plan groups 5-4


@lru_cache(maxsize=4096)
def _phone_grade(number: str, international: bool) -> int:
    """2 valid, 1 possible, 0 neither (number: digits, with a leading '+' if international)."""
    import phonenumbers

    best = 0
    for region in (None,) if international else PHONE_REGIONS:
        try:
            parsed = phonenumbers.parse(number, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(parsed):
            return 2
        if best == 0 and phonenumbers.is_possible_number(parsed):
            best = 1
    return best


class FastPhoneRecognizer(_Recognizer):
    GROUP = r"(?:\(\s?\+?\d{1,5}\s?\)|\d{1,15})"
    REGEX = (
        r"(?<![\w+#$€£/.\-])(?<![\w][.,])"
        r"(?P<v>(?:\+[ ]?|\b00[ ]?)?" + GROUP
        + r"(?:(?:[ ]?[.\-/][ ]?|[ ]|(?<=\)))" + GROUP + r"){0,7}"
        r"(?:[ ]?,?[ ]?(?:x|ext\.?|extension|\#)[ ]?\d{1,6})?)"
        r"(?![\w/]|[.\-:]\d)"
    )

    def __init__(self, language: str = "en") -> None:
        super().__init__("PHONE_NUMBER", [Pattern("phone candidate", self.REGEX, 0.4)],
                         PHONE_CONTEXT, language)

    def check(self, text: str, m: re.Match[str], pattern: Pattern) -> Iterable[Hit]:
        start, end = m.span("v")
        value = m.group("v")
        core = re.split(r"[ ]?,?[ ]?(?:x|ext\.?|extension|#)[ ]?(?=\d+$)", value,
                        flags=re.IGNORECASE)[0]
        digits = "".join(c for c in core if c.isdigit())
        international = core.startswith("+") or core.startswith("00")
        if international:
            digits = digits[2:] if core.startswith("00") else digits
        if not 7 <= len(digits) <= 15:
            return ()
        separated = len(digits) != len(core)
        if _DATE_SHAPE.fullmatch(core) or _IP_SHAPE.fullmatch(core) or _ZIP4.fullmatch(core):
            return ()
        if not international and 12 <= len(digits) and card_like(digits):
            return ()
        if _in_iban(text, start):
            return ()
        before = text[max(0, start - 30):start]
        if _NOT_PHONE_BEFORE.search(before) and not _PHONE_WORD_BEFORE.search(before):
            return ()
        if not separated and not international:
            # a bare digit run in a sentence about another identifier is that identifier
            wide = text[max(0, start - 80):start]
            if _ID_WORD.search(wide) and not _PHONE_WORD_BEFORE.search(wide):
                return ()
        if core.count("(0)"):  # "+41 (0)85 ...": the trunk 0 is not dialled from abroad
            digits = "".join(c for c in core.replace("(0)", "", 1) if c.isdigit())
            if international and core.startswith("00"):
                digits = digits[2:]
        grade = _phone_grade(("+" if international else "") + digits, international)
        # two plain groups ("17151 2450 Crown St" is a house number and a street
        # number): a phone only with a context word
        weak = not international and "(" not in core and len(re.findall(r"\d+", core)) <= 2 \
            and len(digits) <= 10
        if international:
            # "+CC" and valid is as sure as a checksum: MAX_SCORE, as presidio gives a
            # validated pattern (it then also wins a merge against a 10-digit UK_NHS
            # that happens to pass mod 11); possible only, or written in groups after
            # the "+CC" (E.164 as people write it; the number plan may be newer than the
            # phonenumbers release): 0.4; an unbroken run of plausible length: 0.3
            score = 1.0 if grade == 2 else 0.4 if grade == 1 or separated else 0.3
        elif grade == 2:
            score = 0.4 if separated and not weak else 0.3
        elif grade == 1 or "(" in core:
            score = 0.3 if separated else 0.0
        else:
            score = 0.15 if separated and len(digits) >= 7 else 0.0
        if score and separated and _PHONE_LABEL_AFTER.match(text, end):
            score = max(score, 0.4)  # labelled as a phone line: as good as a context word
        return ((start, end, score),) if score else ()


# ---------------------------------------------------------------- cards, IBAN

class CardRecognizer(_Recognizer):
    REGEX = r"(?<![\w+\-.])(?P<v>\d{4,6}(?:(?P<sep>[ \-])\d{2,6}(?:(?P=sep)\d{1,6}){0,3}|\d{6,13}))(?![\w\-]|\.\d)"
    CONTEXT = ["credit", "card", "visa", "mastercard", "cc", "amex", "discover", "jcb",
               "diners", "maestro", "debit", "unionpay", "payment"]

    def __init__(self, language: str = "en") -> None:
        super().__init__("CREDIT_CARD", [Pattern("card", self.REGEX, 0.3)], self.CONTEXT,
                         language)

    def check(self, text: str, m: re.Match[str], pattern: Pattern) -> Iterable[Hit]:
        value = m.group("v")
        digits = value.replace(" ", "").replace("-", "")
        if m.group("sep"):
            groups = [len(g) for g in re.split(r"[ \-]", value)]
            # 4-4-4-4(-3), 4-6-5, 4-6-4, ...: every group but the last of 4 to 6 digits
            if any(g < 4 for g in groups[:-1]) or not 12 <= len(digits) <= 19:
                return ()
        kind = _card_iin(digits)
        if kind is None or not luhn_ok(digits) or _in_iban(text, m.start()):
            return ()
        return ((m.start("v"), m.end("v"), 1.0 if kind == "strong" else 0.3),)


class FleetIbanRecognizer(_Recognizer):
    # country + check digits, then alphanumerics in optional groups of four
    REGEX = r"(?<![\w])(?P<v>[A-Z]{2}\d{2}(?:[ \-]?[A-Z0-9]{1,4}){3,8})"
    CONTEXT = ["iban", "bank", "transfer", "account", "wire", "sepa", "bic", "swift"]

    def __init__(self, language: str = "en") -> None:
        super().__init__("IBAN_CODE", [Pattern("iban", self.REGEX, 0.5)], self.CONTEXT,
                         language)

    def check(self, text: str, m: re.Match[str], pattern: Pattern) -> Iterable[Hit]:
        start = m.start("v")
        country = text[start:start + 2].upper()
        length = IBAN_LENGTHS.get(country)
        if length is None:
            return ()
        # walk the match until the country's length of alphanumerics is reached
        count, end = 0, start
        value = m.group("v")
        for i, ch in enumerate(value):
            if ch.isalnum():
                count += 1
                if count == length:
                    end = start + i + 1
                    break
        if count != length or (end < len(text) and text[end].isalnum()):
            return ()
        compact = re.sub(r"[ \-]", "", text[start:end]).upper()
        return ((start, end, 1.0),) if iban_ok(compact) else ()


# ---------------------------------------------------------------- age, zip, ids, DOB

_AGE_NUM = r"(?P<v>1[01]\d|12[0-5]|\d{1,2})"


class AgeRecognizer(_Recognizer):
    CONTEXT = ["age", "aged", "old", "years", "turned", "birthday"]
    PATTERNS = (
        ("years old", _AGE_NUM + r"(?:[ \-](?:years?|yrs?)[ \-](?:old|of[ ]age)"
         r"|[ ]?y/?o\b|[ \-]years?[ \-]and[ \-]\d+[ \-]months?[ \-]old)", 0.6),
        ("year-old", r"\b" + _AGE_NUM + r"[ \-](?:year|yr)[ \-]old\b", 0.6),
        ("aged", r"\b(?:aged|age[ ]?(?::|is|=|-|of)|ages?)[ ]?" + _AGE_NUM + r"\b(?!\s*%|[.,]\d)",
         0.55),
        ("turned", r"\b(?:just[ ]turned|turn(?:ed|s|ing)?)[ ]" + _AGE_NUM
         + r"(?=\s*(?:[.!?,;)]|$|years?\b|(?:this|next|last|on|in|today|tomorrow)\b))", 0.5),
        ("i am", r"\b(?:i'?m|i[ ]am|i[ ]was|(?P<subject>\w+)[ ](?:is|was))"
         r"(?:[ ](?:only|now|just|almost|nearly))?[ ]" + _AGE_NUM
         + r"(?=\s*(?:[.!?,;]|$|,?[ ]?(?:years?|yrs?)\b|(?:and|today|now|but|so|she|he)\b))",
         0.4),
        # "Isabella Rossi, 34, wants", "my son Arjun (11)": a name, then the age
        ("name, age", r"(?<=[a-z,][ ])[A-Z][a-z]+(?:,[ ]|[ ]\()" + _AGE_NUM + r"[,)]", 0.4),
    )

    # "the price is 9.", "it was 45,": subjects of "is N" that are not people
    NOT_PEOPLE = frozenset((
        "it", "that", "this", "there", "which", "what", "price", "total", "cost", "fee",
        "code", "size", "rate", "room", "page", "step", "count", "score", "amount", "number",
        "answer", "result", "limit", "balance", "version", "ticket", "order", "temperature",
        "time", "value", "level", "id", "pin", "rating", "speed", "weight", "height"))

    def check(self, text: str, m: re.Match[str], pattern: Pattern) -> Iterable[Hit]:
        if "subject" in m.re.groupindex and (m.group("subject") or "").lower() in self.NOT_PEOPLE:
            return ()
        return super().check(text, m, pattern)

    def __init__(self, language: str = "en") -> None:
        super().__init__("AGE", [Pattern(n, r, s) for n, r, s in self.PATTERNS],
                         self.CONTEXT, language)


_US_STATES = ("AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|"
              "MO|MT|NE|NV|NH|NJ|NM|NY|NC|ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|"
              "WY|PR|GU|VI|AS|MP|AA|AE|AP")
_UK_POSTCODE = r"[A-Z]{1,2}\d[A-Z\d]?[ ]?\d[ABD-HJLNP-UW-Z]{2}"
_CA_POSTCODE = r"[ABCEGHJ-NPRSTVXY]\d[ABCEGHJ-NPRSTV-Z][ ]?\d[ABCEGHJ-NPRSTV-Z]\d"
_ANY_POSTCODE = (r"(?:\d{5}-\d{4}|\d{5}-\d{3}|\d{3}[ ]\d{2}|\d{4}[ ]?[A-Z]{2}\b|\d{2}-\d{3}"
                 r"|\d{3,6}|" + _UK_POSTCODE + "|" + _CA_POSTCODE + r")")


class ZipCodeRecognizer(_Recognizer):
    FLAGS = 0  # case matters: state abbreviations, postcodes
    CONTEXT = ["zip", "postal", "postcode", "post", "code", "address", "zipcode"]
    PATTERNS = (
        ("after zip", r"(?i:\b(?:zip|postal|post)[ ]?(?:code)?|\bpostcode|\bplz|\bcep)"
         r"(?i:[ ]?(?:is|:|#|no\.?|number)){0,2}[ ]?(?P<v>" + _ANY_POSTCODE + r")(?![\w\-])",
         0.6),
        ("after state", r"\b(?:" + _US_STATES + r")[ ,]*\n?[ \t]*(?P<v>\d{5}(?:-\d{4})?)(?![\w\-])",
         0.5),
        ("after region", r"\b[A-Z][\w\-]+[ \t]*,?[ \t]*\n?[ \t]*,?[ \t]*[A-Z]{2}[ \t]*,?"
         r"[ \t]*\n?[ \t]*(?P<v>\d{4,5}(?:-\d{3,4})?)(?![\w\-])", 0.4),
        # "Hauptstraße 12, 69117 Heidelberg", "ul. Marszałkowska 84, 00-514 Warszawa":
        # a European-style code between a comma and a capitalised town
        ("before town", r"(?<=,[ ])(?P<v>\d{4,5}|\d{2}-\d{3}|\d{3}[ ]\d{2}|\d{4}-\d{3}"
         r"|\d{4}[ ]?[A-Z]{2})(?=[ ][A-Z\u00c0-\u017d][a-z\u00df-\u017e]+)", 0.4),
        ("uk postcode", r"\b(?P<v>" + _UK_POSTCODE + r")\b", 0.5),
        ("ca postcode", r"\b(?P<v>" + _CA_POSTCODE + r")\b", 0.5),
    )

    def __init__(self, language: str = "en") -> None:
        super().__init__("ZIP_CODE", [Pattern(n, r, s) for n, r, s in self.PATTERNS],
                         self.CONTEXT, language)

    def invalidate_result(self, pattern_text: str) -> bool | None:
        # "A1 1AA"-shaped words that are not postcodes: all letters of one short word
        return pattern_text.isdigit() and len(pattern_text) < 3


class ContextIdRecognizer(_Recognizer):
    """An identifier right after its name: the name is part of the regex."""

    ENTITY = ""
    NAME = ""
    VALUE = ""
    CONTEXT: list[str] = []
    SCORE = 0.6

    def __init__(self, language: str = "en") -> None:
        regex = (r"\b(?:" + self.NAME + r")(?:[ ]?(?:number|num|no\.?|\#|id))?"
                 r"(?:[ ]?(?:is|was|:|-|=))?[ ]?(?:\#[ ]?)?(?P<v>" + self.VALUE + r")(?![\w\-])")
        super().__init__(self.ENTITY, [Pattern(self.ENTITY.lower(), regex, self.SCORE)],
                         self.CONTEXT, language)


class DriverLicenseRecognizer(ContextIdRecognizer):
    ENTITY = "US_DRIVER_LICENSE"
    NAME = r"driver'?s?[ ]licen[cs]e|driving[ ]licen[cs]e|DL|licen[cs]e"
    VALUE = (r"[A-Z]{0,2}\d[\d\- ]{3,16}\d|[A-Z]{1,2}\d{4,14}|[A-Z]\d{3}-\d{3}-\d{2}-\d{3}-\d"
             r"|(?=[A-Z0-9]*\d[A-Z0-9]*\d[A-Z0-9]*\d)[A-Z]{1,4}[A-Z0-9]{5,14}")
    CONTEXT = ["driver", "license", "licence", "dl"]


class PassportRecognizer(ContextIdRecognizer):
    ENTITY = "US_PASSPORT"
    NAME = r"passport"
    VALUE = r"[A-Z]{0,2}\d{6,9}"
    CONTEXT = ["passport"]


class BankNumberRecognizer(ContextIdRecognizer):
    ENTITY = "US_BANK_NUMBER"
    NAME = (r"(?:bank|checking|savings|chequing)[ ]account|bank[ ]acc(?:oun)?t|account"
            r"|acct\.?|a/c")
    VALUE = r"\d{6,17}|\d{3,4}(?:[ ]\d{3,4}){2,4}"
    CONTEXT = ["bank", "account", "acct", "checking", "savings"]
    SCORE = 0.5


class SsnRecognizer(ContextIdRecognizer):
    ENTITY = "US_SSN"
    NAME = r"ssn|social[ ]security|social[ ]security[ ]number"
    VALUE = r"\d{3}[- ]?\d{2}[- ]?\d{4}"
    CONTEXT = ["ssn", "social", "security"]

    def validate_result(self, pattern_text: str) -> bool | None:
        d = re.sub(r"\D", "", pattern_text)
        if d[:3] in ("000", "666") or d[0] == "9" or d[3:5] == "00" or d[5:] == "0000":
            return False
        return None


_MONTH = (r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?")
_DATE = (r"\d{1,2}[/.\-]\d{1,2}[/.\-](?:\d{4}|\d{2})|\d{4}-\d{1,2}-\d{1,2}"
         r"|(?:\d{1,2}(?:st|nd|rd|th)?[ ](?:of[ ])?)?" + _MONTH
         + r"(?:[ ]\d{1,2}(?:st|nd|rd|th)?)?,?[ ]\d{4}")


class BirthDateRecognizer(_Recognizer):
    REGEX = (r"\b(?:born(?:[ ](?:on|in))?|d\.?o\.?b\.?|date[ ]of[ ]birth|birth[ ]?date|birthday"
             r"|b-day)(?:[ ]?(?:is|was|:|-))?[ ]?(?:[.,:][ ]?)?(?:it'?s[ ]|it[ ]is[ ])?(?:on[ ])?"
             r"(?P<v>" + _DATE + r")\b")

    def __init__(self, language: str = "en") -> None:
        super().__init__("DATE_TIME", [Pattern("date of birth", self.REGEX, 0.6)],
                         ["born", "birth", "dob", "birthday"], language)


class YearRecognizer(_Recognizer):
    """A year on its own ("a 1996 film", "since 2011"): DATE_TIME, redacted only where the
    configuration lists DATE_TIME (``entities: strict``). 1800-2099, not inside a longer
    number, a date the other recognizers cover, an amount or a measure."""

    FLAGS = 0
    REGEX = (r"(?<![\w$€£¥.,:/\-])(?P<v>(?:18|19|20)\d\d)(?![\w%°/:\-]|[.,]\d)"
             r"(?![ ]?(?:kg|km|mg|ml|m|g|l|cm|mm|GB|MB|TB|kB|px|ms|s)\b)")

    def __init__(self, language: str = "en") -> None:
        super().__init__("DATE_TIME", [Pattern("year", self.REGEX, 0.45)],
                         ["year", "since", "born", "in"], language)


# nationalities, religions and political groups as adjectives or plural nouns
# (capitalised: "Polish" the nationality, not "polish" the verb)
_NRP_WORDS = (
    "Afghan|Albanian|Algerian|American|Andorran|Angolan|Argentine|Argentinian|Armenian|"
    "Australian|Austrian|Azerbaijani|Bahraini|Bangladeshi|Belarusian|Belgian|Bolivian|Bosnian|"
    "Brazilian|British|Bulgarian|Burmese|Cambodian|Cameroonian|Canadian|Chilean|Chinese|"
    "Colombian|Congolese|Croatian|Cuban|Cypriot|Czech|Danish|Dominican|Dutch|Ecuadorian|"
    "Egyptian|Emirati|English|Eritrean|Estonian|Ethiopian|Fijian|Filipino|Finnish|French|"
    "Georgian|German|Ghanaian|Greek|Guatemalan|Haitian|Honduran|Hungarian|Icelandic|Indian|"
    "Indonesian|Iranian|Iraqi|Irish|Israeli|Italian|Ivorian|Jamaican|Japanese|Jordanian|"
    "Kazakh|Kenyan|Korean|Kosovar|Kuwaiti|Kyrgyz|Lao|Latvian|Lebanese|Liberian|Libyan|"
    "Lithuanian|Luxembourgish|Macedonian|Malagasy|Malawian|Malaysian|Malian|Maltese|"
    "Mauritian|Mexican|Moldovan|Mongolian|Montenegrin|Moroccan|Mozambican|Namibian|Nepalese|"
    "Nepali|Nicaraguan|Nigerian|Nigerien|Norwegian|Omani|Pakistani|Palestinian|Panamanian|"
    "Paraguayan|Persian|Peruvian|Polish|Portuguese|Puerto[ ]Rican|Qatari|Romanian|Russian|"
    "Rwandan|Salvadoran|Samoan|Saudi|Scottish|Senegalese|Serbian|Singaporean|Slovak|Slovenian|"
    "Somali|South[ ]African|Spanish|Sri[ ]Lankan|Sudanese|Swedish|Swiss|Syrian|Taiwanese|"
    "Tajik|Tanzanian|Thai|Tibetan|Tongan|Tunisian|Turkish|Turkmen|Ugandan|Ukrainian|Uruguayan|"
    "Uzbek|Venezuelan|Vietnamese|Welsh|Yemeni|Zambian|Zimbabwean|Arab|Kurdish|Basque|Catalan|"
    "Flemish|Punjabi|Tamil|Bengali|Gujarati|Maori|Inuit|Yoruba|Igbo|Hausa|Zulu|Xhosa|Roma|"
    "Christian|Catholic|Protestant|Orthodox|Anglican|Baptist|Methodist|Lutheran|Evangelical|"
    "Mormon|Muslim|Islamic|Sunni|Shia|Shiite|Jewish|Hindu|Buddhist|Sikh|Jain|Atheist|Agnostic|"
    "Democrat|Republican|Socialist|Communist|Conservative|Labour|Liberal[ ]Democrat")


_LANGUAGE_BEFORE = re.compile(r"(?i:\b(?:in|into|speak|speaks|spoke|speaking|learn|learning|"
                              r"translate|translated|from|to|fluent)[ ]+)\Z")


class NrpRecognizer(_Recognizer):
    """Nationalities, religions and political groups from a word list (NRP; redacted only
    where the configuration lists NRP, e.g. ``entities: strict``): "a Polish film",
    "the Sikh community", "Kenyans". Capitalised words only; not the first word of a
    longer name ("Czech Republic", "Greek Street": the place recognizers' business), nor a
    language ("reply in English", "translated from French")."""

    FLAGS = 0
    REGEX = r"\b(?P<v>(?:" + _NRP_WORDS + r")(?:s|es)?)\b(?![ ][A-Z])"

    def check(self, text: str, m: re.Match[str], pattern: Pattern) -> Iterable[Hit]:
        if _LANGUAGE_BEFORE.search(text, max(0, m.start() - 20), m.start()):
            return ()
        return super().check(text, m, pattern)

    def __init__(self, language: str = "en") -> None:
        super().__init__("NRP", [Pattern("nrp word", self.REGEX, 0.5)], [], language)


class ChunkedUrlRecognizer(UrlRecognizer):  # type: ignore[misc]
    """presidio's ``UrlRecognizer`` -- the same four patterns, scores and context words --
    run only on the whitespace-free chunks of a text that can hold a URL (a letter, digit,
    dot or dash, then a dot, then a letter: every pattern needs one, and none matches a
    blank). presidio runs each pattern over the whole text, and its ``[a-z0-9.-]{1,253}``
    before a list of ~500 domain endings costs ~0.7 ms per 100 words; the chunks give the
    same results (tests/privacy/test_patterns.py compares them on every evaluation text)."""

    def __init__(self, language: str = "en") -> None:
        super().__init__(supported_language=language)
        self._chunk = re.compile(r"\S+")
        self._can_hold = re.compile(r"[a-z0-9.\-]\.[a-z]", re.IGNORECASE)

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None,
                regex_flags: int | None = None) -> list[RecognizerResult]:
        out: list[RecognizerResult] = []
        for m in self._chunk.finditer(text):
            if self._can_hold.search(m.group()) is None:
                continue
            for r in super().analyze(m.group(), entities, None, regex_flags):
                r.start += m.start()
                r.end += m.start()
                out.append(r)
        return out


def recognizers(language: str) -> list[Any]:
    """The recognizers to add to the registry for ``language``."""
    return [ChunkedUrlRecognizer(language),
            FastPhoneRecognizer(language), CardRecognizer(language), FleetIbanRecognizer(language),
            AgeRecognizer(language), ZipCodeRecognizer(language),
            DriverLicenseRecognizer(language), PassportRecognizer(language),
            BankNumberRecognizer(language), SsnRecognizer(language),
            BirthDateRecognizer(language), YearRecognizer(language), NrpRecognizer(language)]
