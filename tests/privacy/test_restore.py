"""Placeholder bookkeeping without a model: the mapping, restore() and the stream restorer."""

from __future__ import annotations

import pytest

from fleetlm.privacy import PiiMapping, StreamRestorer, restore


def _mapping() -> PiiMapping:
    m = PiiMapping()
    assert m.placeholder_for("Ada Lovelace", "PERSON") == "<PERSON_1>"
    assert m.placeholder_for("ada@example.org", "EMAIL_ADDRESS") == "<EMAIL_ADDRESS_1>"
    for i in range(2, 11):  # <PERSON_1> is then a prefix of <PERSON_10>
        m.placeholder_for(f"Person {i}", "PERSON")
    return m


FULL = ("Hi <PERSON_1>, mail <EMAIL_ADDRESS_1> or <PERSON_10>; a < b > c, <FOO_9> and "
        "<PERSON_99> stay, <<PERSON_1>> and <PERSON_1 end <PERSON_")


def _stream(chunks: list[str], m: PiiMapping) -> str:
    r = StreamRestorer(m)
    return "".join(r.feed(c) for c in chunks) + r.flush()


def test_mapping_reuses_placeholders_and_counts_without_values():
    m = PiiMapping()
    assert m.placeholder_for("Bob", "PERSON") == "<PERSON_1>"
    assert m.placeholder_for("Eve", "PERSON") == "<PERSON_2>"
    assert m.placeholder_for("Bob", "PERSON") == "<PERSON_1>"
    assert m.placeholder_for("Bob", "LOCATION") == "<PERSON_1>"  # one placeholder per value
    assert m.value_of("<PERSON_2>") == "Eve" and m.placeholder_of("Eve") == "<PERSON_2>"
    assert m.counts() == {"PERSON": 2}
    assert m.occurrences() == {"PERSON": 3, "LOCATION": 1}
    assert "Bob" not in repr(m) and "Eve" not in repr(m)


def test_reserved_literals_are_never_handed_out():
    m = PiiMapping()
    m.reserve_literals("the user typed <PERSON_1> and <PERSON_2> themselves")
    assert m.placeholder_for("Bob", "PERSON") == "<PERSON_3>"
    assert restore("<PERSON_1> <PERSON_3>", m) == "<PERSON_1> Bob"


def test_restore_replaces_known_and_keeps_unknown_placeholders():
    m = _mapping()
    assert restore(FULL, m) == (
        "Hi Ada Lovelace, mail ada@example.org or Person 10; a < b > c, <FOO_9> and "
        "<PERSON_99> stay, <Ada Lovelace> and <PERSON_1 end <PERSON_")
    assert restore("no placeholders", m) == "no placeholders"


def test_stream_every_single_split_equals_restore():
    m = _mapping()
    want = restore(FULL, m)
    for i in range(len(FULL) + 1):
        assert _stream([FULL[:i], FULL[i:]], m) == want, i


def test_stream_every_pair_of_splits_equals_restore():
    m = _mapping()
    text = "<PERSON_1> met <PERSON_10> at <EMAIL_ADDRESS_1>, not <FOO_9>"
    want = restore(text, m)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert _stream([text[:i], text[i:j], text[j:]], m) == want, (i, j)


def test_stream_char_by_char_and_empty_chunks():
    m = _mapping()
    assert _stream(list(FULL), m) == restore(FULL, m)
    assert _stream(["", *list(FULL), "", ""], m) == restore(FULL, m)


def test_stream_holds_back_only_a_possible_placeholder():
    m = _mapping()
    r = StreamRestorer(m)
    assert r.feed("Hello <PER") == "Hello "  # could still become <PERSON_1>
    assert r.feed("SON_1") == ""  # ... or <PERSON_10>
    assert r.feed("> said hi") == "Ada Lovelace said hi"
    assert r.feed("a <Q") == "a <Q"  # no known placeholder starts with <Q
    assert r.feed(" 1 < 2") == " 1 < 2"
    assert r.feed(" <FOO_") == " <FOO_"  # unknown type: passes through at once
    assert r.feed(" <EMAIL") == " "
    assert r.flush() == "<EMAIL"  # an unfinished placeholder stays as typed
    assert r.flush() == ""


@pytest.mark.parametrize("chunks", [["<PERSON_1", "0>"], ["<PERSON_1", ">0>"], ["<", "<PERSON_1>>"]])
def test_stream_prefix_of_two_placeholders(chunks):
    m = _mapping()
    assert _stream(chunks, m) == restore("".join(chunks), m)
