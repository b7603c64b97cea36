"""Build ``support_v1.json`` (presidio's synthetic-set format) from the hand-labelled
``support_v1.txt`` beside it, after checking every line; stdlib only.

    python3 -m fleetlm.privacy.eval.build            # from src/ (or: python3 build.py)
    python3 -m fleetlm.privacy.eval.build --check    # fail if the JSON is stale or a line is wrong
    python3 -m fleetlm.privacy.eval.build --stats    # counts as Markdown tables (for the README)
    python3 -m fleetlm.privacy.eval.build --fix-checksums  # rewrite card/IBAN check digits in the .txt

Source format, one example a line: ``<style>: <text>`` with style ``ticket``, ``email`` or
``chat``; personal data marked inline as ``[[TYPE|value]]``. Blank lines and lines starting
with ``#`` are skipped; ``template_id`` is the 1-based line number in the .txt.

Checks (any failure: every problem is printed with its line number, exit status 1, no
output written): the style prefix; balanced, non-nested markup; allowed types; values
without outer whitespace and not glued to a word; per-type value shapes; Luhn for
CREDIT_CARD, country length, BBAN shape and mod-97 for IBAN_CODE, the SSA's invalid ranges
for US_SSN; 5 to 60 words; no duplicate lines; at least 320 examples; and leak checks on
the unlabelled text: no ``@``, no URL, no IPv4, no run of 9+ digits, and no labelled value
repeated elsewhere in the same line without a label.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "support_v1.txt"
OUTPUT = HERE / "support_v1.json"
SOURCE_TAG = "fleetlm-handlabelled-v1"
STYLES = ("ticket", "email", "chat")
TYPES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN",
         "IP_ADDRESS", "URL", "DOMAIN_NAME", "STREET_ADDRESS", "GPE", "ZIP_CODE", "DATE_TIME",
         "ORGANIZATION", "US_BANK_NUMBER", "US_DRIVER_LICENSE", "US_PASSPORT", "AGE")
MIN_LINES = 320
MIN_WORDS, MAX_WORDS = 5, 60

LINE_RE = re.compile(r"(ticket|email|chat): (\S.*)")
MARK_RE = re.compile(r"\[\[([A-Z_]+)\|([^\[\]|]*)\]\]")

# country -> (IBAN length, BBAN shape); ISO 13616 registry, the countries used here and
# their neighbours
IBAN_FORMATS: dict[str, tuple[int, str]] = {
    "AT": (20, r"\d{16}"), "BE": (16, r"\d{12}"), "CH": (21, r"\d{5}[A-Z0-9]{12}"),
    "DE": (22, r"\d{18}"), "DK": (18, r"\d{14}"), "ES": (24, r"\d{20}"),
    "FI": (18, r"\d{14}"), "FR": (27, r"\d{10}[A-Z0-9]{11}\d{2}"),
    "GB": (22, r"[A-Z]{4}\d{14}"), "IE": (22, r"[A-Z]{4}\d{14}"),
    "IT": (27, r"[A-Z]\d{10}[A-Z0-9]{12}"), "LU": (20, r"\d{3}[A-Z0-9]{13}"),
    "NL": (18, r"[A-Z]{4}\d{10}"), "NO": (15, r"\d{11}"), "PL": (28, r"\d{24}"),
    "PT": (25, r"\d{21}"), "SE": (24, r"\d{20}"),
}
# issuer prefixes of the networks the set uses: Visa, Mastercard (51-55, 2221-2720),
# Amex, Discover, JCB, Diners Club
CARD_PREFIX_RE = re.compile(r"4|5[1-5]|2(2[2-9][1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|3[47]"
                            r"|6011|65|35(2[89]|[3-8]\d)|3(0[0-5]|[689])")
SSN_BLOCKLIST = {"078051120", "219099999", "123456789"}  # published/advertised numbers
TITLES = ("Mr", "Mrs", "Ms", "Miss", "Mx", "Dr", "Prof", "Sir", "Dame")
SHAPES: dict[str, re.Pattern[str]] = {
    "EMAIL_ADDRESS": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "URL": re.compile(r"(https?://|www\.)[^\s]+[^\s.,;:!?)]"),
    "DOMAIN_NAME": re.compile(r"([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,}"),
    "PHONE_NUMBER": re.compile(r"\+?[\d(][\d ()./-]*\d"),
    "ZIP_CODE": re.compile(r"[A-Z0-9][A-Z0-9 -]{1,8}[A-Z0-9]"),
    "AGE": re.compile(r"\d{1,3}"),
    "US_BANK_NUMBER": re.compile(r"\d[\d -]*\d"),
    "US_PASSPORT": re.compile(r"[A-Z]\d{8}|\d{9}"),
    "US_DRIVER_LICENSE": re.compile(r"[A-Z0-9][A-Z0-9 -]{4,18}[A-Z0-9]"),
    "CREDIT_CARD": re.compile(r"\d{4}([ -]?)\d{4,6}\1\d{4,5}(\1\d{1,4})?"),
    "US_SSN": re.compile(r"\d{3}([ -]?)\d{2}\1\d{4}"),
    "IBAN_CODE": re.compile(r"[A-Z]{2}\d{2}( ?[A-Z0-9]{1,4})+"),
}
# digit counts where a shape alone is too loose
DIGITS = {"PHONE_NUMBER": (7, 15), "US_BANK_NUMBER": (8, 17), "CREDIT_CARD": (13, 19),
          "US_DRIVER_LICENSE": (5, 16), "ZIP_CODE": (1, 10)}
# unlabelled text that looks like personal data (each one a missing label)
LEAKS = {
    "an '@' outside a label": re.compile(r"@"),
    "a URL outside a label": re.compile(r"https?://|www\.", re.I),
    "an IPv4 address outside a label": re.compile(r"\b\d{1,3}(\.\d{1,3}){3}\b"),
    "9+ digits outside a label": re.compile(r"\d(?:[ -]?\d){8,}"),
}


def digits(value: str) -> str:
    return re.sub(r"\D", "", value)


def luhn_ok(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def luhn_fix(value: str) -> str:
    """The value with its last digit replaced by the Luhn check digit."""
    body = digits(value)[:-1]
    for check in "0123456789":
        if luhn_ok(body + check):
            return value[:-1] + check
    raise AssertionError(value)


def iban_mod97(compact: str) -> int:
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97


def iban_fix(value: str) -> str:
    """The value with check digits (characters 3-4) recomputed, spacing kept."""
    compact = value.replace(" ", "")
    check = 98 - iban_mod97(compact[:2] + "00" + compact[4:])
    return value[:2] + f"{check:02d}" + value[4:]


def iban_problem(value: str) -> str | None:
    compact = value.replace(" ", "")
    if value != " ".join(compact[i:i + 4] for i in range(0, len(compact), 4)) and " " in value:
        return "spaces must group the IBAN in fours"
    fmt = IBAN_FORMATS.get(compact[:2])
    if fmt is None:
        return f"country {compact[:2]} not in IBAN_FORMATS"
    length, bban = fmt
    if len(compact) != length:
        return f"{compact[:2]} IBANs have {length} characters, this one {len(compact)}"
    if not re.fullmatch(bban, compact[4:]):
        return f"BBAN {compact[4:]} does not match {compact[:2]}'s format {bban}"
    if iban_mod97(compact) != 1:
        return f"mod-97 check fails (check digits should be {iban_fix(value)[2:4]})"
    return None


def ssn_problem(value: str) -> str | None:
    d = digits(value)
    if d[:3] in ("000", "666") or d[0] == "9":
        return "area 000, 666 and 900-999 are never issued"
    if d[3:5] == "00" or d[5:] == "0000":
        return "group 00 and serial 0000 are never issued"
    if d in SSN_BLOCKLIST or len(set(d)) == 1:
        return "published or degenerate number"
    return None


def value_problem(etype: str, value: str) -> str | None:
    """What is wrong with a labelled value of this type, or None."""
    shape = SHAPES.get(etype)
    if shape is not None and not shape.fullmatch(value):
        return f"{value!r} does not look like a {etype}"
    if etype in DIGITS:
        lo, hi = DIGITS[etype]
        if not lo <= len(digits(value)) <= hi:
            return f"{etype} {value!r}: {lo}-{hi} digits expected"
    if etype == "CREDIT_CARD":
        if not CARD_PREFIX_RE.match(digits(value)):
            return f"{value!r}: no card network issues this prefix"
        if not luhn_ok(digits(value)):
            return f"{value!r}: Luhn check fails (last digit should be {luhn_fix(value)[-1]})"
    if etype == "IBAN_CODE":
        p = iban_problem(value)
        return f"IBAN {value!r}: {p}" if p else None
    if etype == "US_SSN":
        p = ssn_problem(value)
        return f"SSN {value!r}: {p}" if p else None
    if etype == "IP_ADDRESS":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return f"{value!r} is not an IPv4/IPv6 address"
    if etype == "AGE" and not 0 < int(value) <= 120:
        return f"age {value} out of range"
    if etype == "PERSON" and (re.search(r"\d", value) or value.split(" ")[0].rstrip(".") in TITLES):
        return f"PERSON {value!r}: no digits, and titles stay outside the span"
    if etype == "DATE_TIME" and not re.search(r"\d", value):
        return f"DATE_TIME {value!r}: only explicit dates are labelled (a day or a year in digits)"
    return None


def parse_text(body: str) -> tuple[str, list[dict], list[str]]:
    """(full text, spans, problems) of one line's text with its ``[[TYPE|value]]`` marks."""
    problems: list[str] = []
    parts: list[str] = []
    spans: list[dict] = []
    pos = 0
    for m in MARK_RE.finditer(body):
        parts.append(body[pos:m.start()])
        etype, value = m.group(1), m.group(2)
        start = sum(map(len, parts))
        parts.append(value)
        pos = m.end()
        if etype not in TYPES:
            problems.append(f"unknown type {etype!r}")
        if not value or value != value.strip() or "  " in value:
            problems.append(f"{etype} value {value!r}: empty or stray whitespace")
        elif etype in TYPES and (p := value_problem(etype, value)):
            problems.append(p)
        spans.append({"entity_type": etype, "entity_value": value,
                      "start_position": start, "end_position": start + len(value)})
    parts.append(body[pos:])
    text = "".join(parts)
    outside = MARK_RE.sub(" ", body)
    for bad in ("[[", "]]", "{{", "}}", "|"):
        if bad in outside:
            problems.append(f"{bad!r} outside a well-formed [[TYPE|value]] (nested or unbalanced?)")
    for s in spans:
        a, b = s["start_position"], s["end_position"]
        if text[a:b] != s["entity_value"]:
            problems.append(f"offset bug at {a}:{b}")
        if (a > 0 and text[a - 1].isalnum()) or (b < len(text) and text[b].isalnum()):
            problems.append(f"{s['entity_value']!r} is glued to the word around it")
    problems += leak_problems(text, spans)
    n_words = len(text.split())
    if not MIN_WORDS <= n_words <= MAX_WORDS:
        problems.append(f"{n_words} words; {MIN_WORDS}-{MAX_WORDS} expected")
    return text, spans, problems


def leak_problems(text: str, spans: list[dict]) -> list[str]:
    """Unlabelled text that looks like personal data, or repeats a labelled value."""
    blank = list(text)
    for s in spans:
        blank[s["start_position"]:s["end_position"]] = "\0" * (s["end_position"] - s["start_position"])
    rest = "".join(blank)
    problems = [f"{what}: {m.group(0)!r}" for what, rx in LEAKS.items()
                for m in [rx.search(rest)] if m]
    for value in {s["entity_value"] for s in spans if len(s["entity_value"]) >= 3}:
        if re.search(r"(?<!\w)" + re.escape(value) + r"(?!\w)", rest):
            problems.append(f"{value!r} is labelled once but appears again unlabelled")
    return problems


def masked(text: str, spans: list[dict]) -> str:
    out, pos = [], 0
    for s in spans:
        out += [text[pos:s["start_position"]], "{{" + s["entity_type"] + "}}"]
        pos = s["end_position"]
    return "".join(out + [text[pos:]])


def build(lines: list[str]) -> tuple[list[dict], list[str]]:
    """(rows, problems as 'line N: ...')."""
    rows: list[dict] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for no, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = LINE_RE.fullmatch(line)
        if m is None or line != line.rstrip() or "\t" in line:
            problems.append(f"line {no}: expected '<ticket|email|chat>: text' without tabs "
                            f"or trailing spaces: {line[:60]!r}")
            continue
        text, spans, line_problems = parse_text(m.group(2))
        problems += [f"line {no}: {p}" for p in line_problems]
        key = text.casefold()
        if key in seen:
            problems.append(f"line {no}: duplicate of line {seen[key]}")
        seen.setdefault(key, no)
        rows.append({"full_text": text, "masked": masked(text, spans), "spans": spans,
                     "template_id": no,
                     "metadata": {"source": SOURCE_TAG, "style": m.group(1)}})
    if len(rows) < MIN_LINES:
        problems.append(f"{len(rows)} examples; at least {MIN_LINES} expected")
    return rows, problems


def fix_checksums(lines: list[str]) -> tuple[list[str], list[str]]:
    """Lines with CREDIT_CARD and IBAN_CODE check digits recomputed; the changes made."""
    changes: list[str] = []

    def fix(m: re.Match[str]) -> str:
        etype, value = m.group(1), m.group(2)
        new = value
        if etype == "CREDIT_CARD" and digits(value):
            new = luhn_fix(value)
        elif etype == "IBAN_CODE" and re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9 ]+", value):
            new = iban_fix(value)
        if new != value:
            changes.append(f"{etype}: {value} -> {new}")
        return f"[[{etype}|{new}]]"

    return [MARK_RE.sub(fix, line) for line in lines], changes


def stats(rows: list[dict]) -> str:
    types = Counter(s["entity_type"] for r in rows for s in r["spans"])
    lines_with = Counter(t for r in rows for t in {s["entity_type"] for s in r["spans"]})
    styles = Counter(r["metadata"]["style"] for r in rows)
    no_pii = sum(1 for r in rows if not r["spans"])
    words = [len(r["full_text"].split()) for r in rows]
    out = [f"{len(rows)} examples, {sum(types.values())} labelled spans, {no_pii} examples "
           f"without personal data; {min(words)}-{max(words)} words "
           f"(mean {sum(words) / len(words):.1f}).", "",
           "| entity type | spans | examples with it |", "|---|---:|---:|"]
    out += [f"| {t} | {n} | {lines_with[t]} |" for t, n in types.most_common()]
    out += ["", "| style | examples | spans | without personal data |", "|---|---:|---:|---:|"]
    for st in STYLES:
        rs = [r for r in rows if r["metadata"]["style"] == st]
        out.append(f"| {st} | {styles[st]} | {sum(len(r['spans']) for r in rs)} | "
                   f"{sum(1 for r in rs if not r['spans'])} |")
    return "\n".join(out)


def render(rows: list[dict]) -> str:
    return json.dumps(rows, ensure_ascii=False, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("--output", type=Path, default=OUTPUT)
    ap.add_argument("--check", action="store_true", help="validate; fail if the output is stale")
    ap.add_argument("--stats", action="store_true", help="print counts as Markdown")
    ap.add_argument("--fix-checksums", action="store_true",
                    help="rewrite CREDIT_CARD/IBAN_CODE check digits in the source first")
    args = ap.parse_args(argv)
    lines = args.source.read_text(encoding="utf-8").splitlines()
    if args.fix_checksums:
        lines, changes = fix_checksums(lines)
        print("\n".join(changes) or "no check digit changed")
        args.source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, problems = build(lines)
    if problems:
        print(f"{args.source}: {len(problems)} problem(s)", *problems, sep="\n", file=sys.stderr)
        return 1
    text = render(rows)
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: rebuild with python3 -m fleetlm.privacy.eval.build",
                  file=sys.stderr)
            return 1
    else:
        args.output.write_text(text, encoding="utf-8")
    print(stats(rows) if args.stats else
          f"{len(rows)} examples, {sum(len(r['spans']) for r in rows)} spans"
          + ("" if args.check else f" -> {args.output}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
