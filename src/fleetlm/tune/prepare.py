"""Clean the loaded rows before any other stage sees them.

    train (+ val) --normalise--> --drop empty / too short / too long--> --dedup (exact,
    near; classification: contradicting labels)--> --val leakage--> --split (when no
    validation file)--> --val subsample--> --anonymise--> PrepareResult

Every dropped row is counted under one reason in ``PrepareResult.report``.

*Prompt text* is what dedup and the length limits look at: the bare text for
classification, the joined non-system prompt messages otherwise (a system prompt shared
by every row would make all rows look alike). Two rows are exact duplicates when their
prompt texts agree after casefolding and removing everything but letters and digits;
near duplicates when the Jaccard similarity of their word sets is at least
``prepare.near_dup_threshold``. Near duplicates are found with an exact set-similarity
join (prefix filtering over rarest-first word order, then a full Jaccard check), not
MinHash: no pair above the threshold is missed and nothing is random, and at the high
thresholds used here the candidate lists stay short. :func:`brute_force_near_pairs` is
its slow twin for tests. The first row of a group is kept; for classification, a group
whose rows disagree on the label is dropped entirely (``conflicting_labels``).

Anonymisation runs last, on the rows that are kept, because the PII detector is by far
the slowest step. The answer of a classification row is its label and is not redacted.

This module knows nothing about tokenizers, chat templates or training; it does not
read files (see :mod:`fleetlm.tune.load`).
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from fleetlm.errors import ConfigError, FleetLMError
from fleetlm.tune.config import TuneConfig
from fleetlm.tune.records import Example

Progress = Callable[[str, int, int], None]  # (stage name, done, total)
DedupMode = Literal["off", "exact", "near"]


class Redactor(Protocol):
    def redact_many(self, texts: list[str]) -> list[str]: ...


@dataclass
class PrepareResult:
    train: list[Example]
    val: list[Example]
    report: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- text

# C0/C1 control characters except tab and newline, and zero-width characters NFKC keeps.
_DELETE = {c: None for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20),
                             *range(0x7F, 0xA0), 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF]}
_INNER_SPACE = re.compile(r"(?<=\S)[ \t\f\v]+")  # runs after a non-space: not indentation
_BLANK_LINES = re.compile(r"\n{3,}")
_NON_WORD = re.compile(r"[\W_]+")
_WORD = re.compile(r"\w+")


def normalize_text(text: str) -> str:
    """NFKC, control characters removed, inner whitespace runs collapsed to one space,
    trailing spaces and extra blank lines removed. Leading indentation is kept (code)."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_DELETE)
    lines = [_INNER_SPACE.sub(" ", line).rstrip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def prompt_text(ex: Example) -> str:
    """The text that dedup and the length limits judge a row by (see module docstring)."""
    if ex.text is not None:
        return ex.text
    return "\n".join(m["content"] for m in ex.prompt if m.get("role") != "system")


def exact_key(text: str) -> str:
    """Casefolded letters and digits only: 'Top-up?' and 'top up' share a key."""
    key = _NON_WORD.sub("", text.casefold())
    return key if key else text.casefold().strip()  # text of punctuation only


def word_set(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.casefold()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# ----------------------------------------------------------------------------- dedup


class NearDupIndex:
    """Sets added so far; :meth:`matches` returns the ids of those with Jaccard >= threshold.

    Prefix filtering: with every set's words sorted in one global order, two sets with
    Jaccard >= t share a word among the first ``|s| - ceil(t*|s|) + 1`` words of each.
    Only those prefix words are indexed, so ordering rarest-first (``frequencies``) keeps
    the candidate lists short. Any fixed order is correct; words not in ``frequencies``
    sort first, as if they were the rarest.
    """

    def __init__(self, threshold: float, frequencies: Counter[str] | None = None):
        assert 0.0 < threshold <= 1.0, threshold
        self.threshold = threshold
        self._freq = frequencies if frequencies is not None else Counter()
        self._sets: dict[int, frozenset[str]] = {}
        self._postings: dict[str, list[int]] = defaultdict(list)

    def _prefix(self, s: frozenset[str]) -> list[str]:
        n = len(s) - math.ceil(self.threshold * len(s) - 1e-9) + 1
        return sorted(s, key=lambda w: (self._freq[w], w))[:n]

    def matches(self, s: frozenset[str]) -> list[int]:
        if not s:
            return []
        lo, hi = self.threshold * len(s), len(s) / self.threshold  # size filter
        found: list[int] = []
        seen: set[int] = set()
        for w in self._prefix(s):
            for i in self._postings.get(w, ()):
                if i in seen:
                    continue
                seen.add(i)
                other = self._sets[i]
                if lo - 1e-9 <= len(other) <= hi + 1e-9 \
                        and jaccard(s, other) >= self.threshold - 1e-12:
                    found.append(i)
        return sorted(found)

    def add(self, s: frozenset[str], id_: int) -> None:
        if not s:
            return
        self._sets[id_] = s
        for w in self._prefix(s):
            self._postings[w].append(id_)


def brute_force_near_pairs(sets: Sequence[frozenset[str]], threshold: float) -> set[tuple[int, int]]:
    """Every pair (i < j) with Jaccard >= threshold, by comparing all pairs: the twin of
    :class:`NearDupIndex` for tests, O(n^2)."""
    return {(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))
            if sets[i] and sets[j] and jaccard(sets[i], sets[j]) >= threshold - 1e-12}


def word_frequencies(texts: Iterable[str]) -> Counter[str]:
    """Document frequency of every word: the rarest-first order of :class:`NearDupIndex`."""
    freq: Counter[str] = Counter()
    for t in texts:
        freq.update(word_set(t))
    return freq


class Deduper:
    """Texts kept so far, by exact key and (mode "near") by word set.

    :meth:`match` says whether a new text duplicates kept ones, :meth:`add` keeps one.
    Shared by :func:`prepare` (rows against rows, validation against training) and the
    synthetic-data filter (synthetic rows against data rows and each other).
    """

    def __init__(self, mode: DedupMode, threshold: float,
                 frequencies: Counter[str] | None = None):
        self.mode = mode
        self._exact: dict[str, list[int]] = defaultdict(list)
        self._near = NearDupIndex(threshold, frequencies) if mode == "near" else None

    def match(self, text: str) -> tuple[Literal["exact", "near"], list[int]] | None:
        if self.mode == "off":
            return None
        ids = self._exact.get(exact_key(text))
        if ids:
            return "exact", list(ids)
        if self._near is not None:
            near = self._near.matches(word_set(text))
            if near:
                return "near", near
        return None

    def add(self, text: str, id_: int) -> None:
        self._exact[exact_key(text)].append(id_)
        if self._near is not None:
            self._near.add(word_set(text), id_)


@dataclass
class _DedupCounts:
    exact: int = 0
    near: int = 0
    conflicting: int = 0


def _dedup(rows: list[Example], mode: DedupMode, threshold: float, freq: Counter[str],
           classification: bool, counts: _DedupCounts) -> list[Example]:
    """Keep the first row of every duplicate group; drop groups with contradicting labels."""
    if mode == "off":
        return rows
    dd = Deduper(mode, threshold, freq)
    kept: list[int] = []
    conflicted: set[int] = set()  # kept rows whose group turned out to contradict itself
    for i, ex in enumerate(rows):
        text = prompt_text(ex)
        m = dd.match(text)
        if m is None:
            dd.add(text, i)
            kept.append(i)
            continue
        kind, ids = m
        if classification and any(rows[j].label != ex.label or j in conflicted for j in ids):
            # the matched rows stay indexed, so later look-alikes are dropped as well
            counts.conflicting += 1 + sum(1 for j in ids if j not in conflicted)
            conflicted.update(ids)
        elif kind == "exact":
            counts.exact += 1
        else:
            counts.near += 1
    return [rows[i] for i in kept if i not in conflicted]


def _remove_leakage(val: list[Example], train: list[Example], mode: DedupMode,
                    threshold: float, freq: Counter[str]) -> tuple[list[Example], int]:
    """Validation rows that duplicate a training row (exact even when dedup is "off")."""
    dd = Deduper("near" if mode == "near" else "exact", threshold, freq)
    for i, ex in enumerate(train):
        dd.add(prompt_text(ex), i)
    kept = [ex for ex in val if dd.match(prompt_text(ex)) is None]
    return kept, len(val) - len(kept)


# ----------------------------------------------------------------------------- split


def _allocate(sizes: dict[str, int], caps: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over groups in proportion to ``sizes`` (largest remainder), never
    more than ``caps[group]`` from a group."""
    total = min(total, sum(caps.values()))
    n_all = sum(sizes.values())
    share = {k: total * n / n_all for k, n in sizes.items()}
    out = {k: min(caps[k], math.floor(x)) for k, x in share.items()}
    # hand out the rest by largest remainder; ties by name, so the result is deterministic
    order = sorted(sizes, key=lambda k: (-(share[k] - math.floor(share[k])), k))
    while sum(out.values()) < total:
        for k in order:
            if sum(out.values()) >= total:
                break
            if out[k] < caps[k]:
                out[k] += 1
    return out


def _pick(rows: list[Example], n: int, rng: random.Random, stratify: bool,
          keep_one: bool) -> tuple[list[Example], list[Example]]:
    """(picked, rest): ``n`` rows picked at random, in proportion per label when
    ``stratify``; ``keep_one`` leaves at least one row of every label in ``rest``."""
    if stratify:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, ex in enumerate(rows):
            groups[str(ex.label)].append(i)
        sizes = {k: len(v) for k, v in groups.items()}
        caps = {k: len(v) - 1 if keep_one else len(v) for k, v in groups.items()}
        quota = _allocate(sizes, caps, n)
        chosen: set[int] = set()
        for k in sorted(groups):
            chosen.update(rng.sample(groups[k], quota[k]))
    else:
        cap = len(rows) - 1 if keep_one else len(rows)
        chosen = set(rng.sample(range(len(rows)), max(0, min(n, cap))))
    picked = [ex for i, ex in enumerate(rows) if i in chosen]
    rest = [ex for i, ex in enumerate(rows) if i not in chosen]
    return picked, rest


# ----------------------------------------------------------------------------- anonymise


def default_redactor() -> Redactor:
    """The presidio redactor of :mod:`fleetlm.privacy`, imported and loaded only when asked
    for, so a missing presidio or spaCy model fails before any work is done."""
    hint = ("; install presidio (pip install presidio-analyzer presidio-anonymizer and a "
            "spaCy English model) or set prepare.anonymize: false")
    try:
        from fleetlm.privacy import PiiRedactor
    except ImportError as e:
        raise ConfigError(f"prepare.anonymize is true but fleetlm.privacy cannot be imported "
                          f"({e}){hint}") from None
    try:
        return PiiRedactor().load()
    except FleetLMError as e:  # PiiDetectionError: presidio or the spaCy model is missing
        raise ConfigError(f"prepare.anonymize is true but the PII detector cannot be loaded: "
                          f"{e}{hint}") from None


_REDACT_CHUNK = 256  # texts per redact_many call: progress granularity


def anonymize_rows(rows: list[Example], redactor: Redactor, classification: bool,
                   progress: Progress | None = None) -> tuple[list[Example], int]:
    """Rows with every prompt message (and non-label answer) redacted; also the number
    of rows that changed. Each distinct text is sent to the redactor once."""
    unique: dict[str, None] = {}
    for ex in rows:
        unique.update(dict.fromkeys(m["content"] for m in ex.prompt))
        if not classification:
            unique[ex.answer] = None
    texts = list(unique)
    redacted: dict[str, str] = {}
    for start in range(0, len(texts), _REDACT_CHUNK):
        chunk = texts[start:start + _REDACT_CHUNK]
        out = redactor.redact_many(chunk)
        if len(out) != len(chunk):
            raise ConfigError(f"prepare.anonymize: the redactor returned {len(out)} texts for "
                              f"{len(chunk)}; it must return one text per input")
        redacted.update(zip(chunk, out, strict=True))
        if progress is not None:
            progress("anonymize", min(start + len(chunk), len(texts)), len(texts))
    out_rows, changed = [], 0
    for ex in rows:
        prompt = tuple({**m, "content": redacted[m["content"]]} for m in ex.prompt)
        answer = ex.answer if classification else redacted[ex.answer]
        new = replace(ex, prompt=prompt, answer=answer,
                      text=redacted[ex.text] if ex.text is not None and ex.text in redacted
                      else ex.text)
        if new.prompt != ex.prompt or new.answer != ex.answer:
            changed += 1
        out_rows.append(new)
    return out_rows, changed


# ----------------------------------------------------------------------------- prepare


def normalize_row(ex: Example) -> Example:
    """:func:`normalize_text` of every message, the answer, and a classification row's text."""
    prompt = tuple({**m, "content": normalize_text(m["content"])} for m in ex.prompt)
    answer = normalize_text(ex.answer)
    if ex.label is not None:  # classification: the answer is the label
        return replace(ex, prompt=prompt, answer=answer, label=answer,
                       text=normalize_text(ex.text) if ex.text is not None else None)
    return replace(ex, prompt=prompt, answer=answer)


def length_verdict(ex: Example, min_chars: int, max_chars: int) -> str | None:
    """Why a row fails the length limits ("empty", "too_short", "too_long"), or None."""
    n = len(prompt_text(ex).strip())
    if n == 0 or not ex.answer.strip():
        return "empty"
    if n < min_chars:
        return "too_short"
    if n > max_chars:
        return "too_long"
    return None


def _length_filter(rows: list[Example], min_chars: int, max_chars: int,
                   counts: Counter[str]) -> list[Example]:
    kept = []
    for ex in rows:
        why = length_verdict(ex, min_chars, max_chars)
        if why is None:
            kept.append(ex)
        else:
            counts[f"dropped_{why}"] += 1
    return kept


def prepare(train: list[Example], val: list[Example] | None, cfg: TuneConfig,
            redactor: Redactor | None = None, progress: Progress | None = None) -> PrepareResult:
    """Clean ``train`` and ``val`` (or carve ``val`` from ``train``); see the module docstring."""
    p = cfg.prepare
    classification = cfg.task.type == "classification"
    if p.anonymize and redactor is None:
        redactor = default_redactor()  # fail before the work, not after
    counts: Counter[str] = Counter()
    n_in = len(train) + len(val or [])

    def step(name: str) -> None:
        if progress is not None:
            progress(name, 1, 1)

    if p.normalize:
        train = [normalize_row(ex) for ex in train]
        val = [normalize_row(ex) for ex in val] if val is not None else None
    step("normalize")
    train = _length_filter(train, p.min_chars, p.max_chars, counts)
    val = _length_filter(val, p.min_chars, p.max_chars, counts) if val is not None else None
    step("filter")

    freq = word_frequencies(prompt_text(ex) for ex in [*train, *(val or [])]) \
        if p.dedup == "near" else Counter()
    dc = _DedupCounts()
    train = _dedup(train, p.dedup, p.near_dup_threshold, freq, classification, dc)
    leakage = 0
    if val is not None:
        val = _dedup(val, p.dedup, p.near_dup_threshold, freq, classification, dc)
        val, leakage = _remove_leakage(val, train, p.dedup, p.near_dup_threshold, freq)
    step("dedup")
    if not train:
        raise ConfigError(_empty_message(n_in, counts, dc, p.dedup))

    rng = random.Random(cfg.seed)
    if val is None:
        n_val = round(len(train) * cfg.data.validation_fraction)
        val, train = _pick(train, n_val, rng, stratify=classification, keep_one=True)
    if cfg.data.max_validation_rows is not None and len(val) > cfg.data.max_validation_rows:
        val, _ = _pick(val, cfg.data.max_validation_rows, rng, stratify=classification,
                       keep_one=False)
    step("split")

    anonymized = 0
    if p.anonymize:
        assert redactor is not None
        both, anonymized = anonymize_rows([*train, *val], redactor, classification, progress)
        train, val = both[:len(train)], both[len(train):]

    report: dict[str, int] = {
        "rows_in": n_in,
        "dropped_empty": counts["dropped_empty"],
        "dropped_too_short": counts["dropped_too_short"],
        "dropped_too_long": counts["dropped_too_long"],
        "exact_duplicates": dc.exact,
        "near_duplicates": dc.near,
        "conflicting_labels": dc.conflicting,
        "val_leakage_removed": leakage,
        "anonymized_rows": anonymized,
        "train_rows": len(train),
        "val_rows": len(val),
        "labels": len({ex.label for ex in train}) if classification else 0,
    }
    return PrepareResult(train=train, val=val, report=report)


def _empty_message(n_in: int, counts: Counter[str], dc: _DedupCounts, mode: str) -> str:
    reasons: list[tuple[int, str, str]] = [
        (counts["dropped_empty"], "empty", "check that the data.*_column options point at "
         "the columns holding the text"),
        (counts["dropped_too_short"], "shorter than prepare.min_chars",
         "lower prepare.min_chars"),
        (counts["dropped_too_long"], "longer than prepare.max_chars", "raise prepare.max_chars"),
        (dc.exact, "exact duplicates", "set prepare.dedup: off"),
        (dc.near, "near duplicates", "raise prepare.near_dup_threshold or set "
         "prepare.dedup: exact"),
        (dc.conflicting, "duplicates with contradicting labels", "fix the labels, or set "
         "prepare.dedup: off"),
    ]
    parts = [f"{n} {what}" for n, what, _ in reasons if n]
    fixes = [fix for n, _, fix in reasons if n]
    return (f"prepare removed every training row ({n_in} in: " + ", ".join(parts or ["none"])
            + f"; dedup mode '{mode}'); to keep rows: " + "; ".join(fixes or ["add rows"]))

