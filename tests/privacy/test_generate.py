"""The template generator of extra training rows: deterministic per seed, exact offsets,
every entity type, diacritics and negatives present, no overlapping spans, and rows that
the training code's label conversion accepts."""

from __future__ import annotations

import collections
import itertools
import re

import pytest

from fleetlm.privacy.learned.generate import generate
from fleetlm.privacy.learned.labels import (
    IGNORE,
    LEARNED_TYPES,
    bio_labels,
    gold_spans,
    tag_pieces,
)

TYPES = {"PERSON", "GPE", "STREET_ADDRESS", "ORGANIZATION", "DATE_TIME", "NRP", "TITLE",
         "AGE", "ZIP_CODE", "PHONE_NUMBER", "EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE",
         "US_SSN", "US_DRIVER_LICENSE", "US_PASSPORT", "US_BANK_NUMBER", "IP_ADDRESS", "URL",
         "DOMAIN_NAME"}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return generate(2000, seed=0)


def test_deterministic_per_seed():
    a, b = generate(200, seed=7), generate(200, seed=7)
    assert a == b
    assert [r["full_text"] for r in generate(200, seed=8)] != [r["full_text"] for r in a]
    assert generate(0) == []


def test_format_and_exact_offsets(rows):
    assert len(rows) == 2000
    for r in rows:
        assert isinstance(r["full_text"], str) and r["full_text"]
        for s in r["spans"]:
            assert set(s) == {"entity_type", "entity_value", "start_position", "end_position"}
            assert r["full_text"][s["start_position"]:s["end_position"]] == s["entity_value"]
            assert s["entity_value"] and s["entity_value"] == s["entity_value"].strip()


def test_no_span_overlaps_another(rows):
    for r in rows:
        spans = sorted((s["start_position"], s["end_position"]) for s in r["spans"])
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, r


def test_every_type_present(rows):
    counts = collections.Counter(s["entity_type"] for r in rows for s in r["spans"])
    assert set(counts) == TYPES, set(counts) ^ TYPES
    assert counts["PERSON"] > 1000


def test_diacritics_and_many_kinds_of_name(rows):
    persons = [s["entity_value"] for r in rows for s in r["spans"]
               if s["entity_type"] == "PERSON"]
    non_ascii = [p for p in persons if not p.isascii()]
    assert len(non_ascii) > 100
    assert any(c in "".join(non_ascii) for c in "łńśżąę")  # Polish
    assert any(c in "".join(non_ascii) for c in "äöüÄÖÜ")  # German and others
    assert any("-" in p for p in persons)  # double-barrelled
    assert any(re.search(r"\b(van|de|von|da|O')", p) for p in persons)  # particles
    assert any(p.islower() for p in persons)  # chat style
    places = [s["entity_value"] for r in rows for s in r["spans"] if s["entity_type"] == "GPE"]
    assert any(not p.isascii() for p in places)


def test_titles_are_not_inside_person_spans(rows):
    for r in rows:
        for s in r["spans"]:
            if s["entity_type"] == "PERSON":
                assert not re.match(r"(?i)(mr|mrs|ms|dr|prof|miss)\.?\s", s["entity_value"])


def test_negatives_present(rows):
    learned = [gold_spans(r) for r in rows]
    empty = sum(1 for g in learned if not g)
    assert 0.15 * len(rows) < empty < 0.35 * len(rows)
    texts = " ".join(r["full_text"] for r in rows if not r["spans"])
    for word in ("Visa", "IBAN", "SSN"):
        assert word in texts


def test_rows_accepted_by_label_conversion(rows):
    labels = bio_labels(LEARNED_TYPES)
    for r in rows:
        spans = gold_spans(r)
        text = r["full_text"]
        offsets = [(0, 0)] + [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)] + [(0, 0)]
        tags = tag_pieces(offsets, spans, labels)
        assert len(tags) == len(offsets) and tags[0] == IGNORE
        for s in spans:  # every learned span starts with a B- tag on some piece
            firsts = [t for (a, b), t in zip(offsets, tags, strict=True)
                      if a < s.end and s.start < b]
            assert firsts and labels[firsts[0]] == f"B-{s.entity_type}"


def test_rows_accepted_by_the_real_tokenizer(rows):
    pytest.importorskip("transformers")
    from fleetlm.privacy.errors import PiiModelNotInstalled
    from fleetlm.privacy.learned.model import LearnedMeta, encode, minilm_folder

    try:
        folder = minilm_folder()
    except PiiModelNotInstalled as e:  # the encoder package is optional
        pytest.skip(str(e))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    meta = LearnedMeta()
    sample = rows[:300]
    windows = encode(tok, [r["full_text"] for r in sample], meta)
    tagged = collections.Counter()
    for w in windows:
        w.tags = tag_pieces(w.offsets, gold_spans(sample[w.text_index]), meta.labels)
        tagged.update(meta.labels[t][2:] for t in w.tags if t != IGNORE and t != 0)
    assert set(tagged) == set(LEARNED_TYPES)
