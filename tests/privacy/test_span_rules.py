"""The rules that find spans from other spans and the text's layout (pure functions:
text and spans in, spans out), each with the cases it must leave alone."""

from __future__ import annotations

from fleetlm.privacy.config import DEFAULT_ENTITIES, STRICT_ENTITIES
from fleetlm.privacy.span_rules import (
    apply_rules,
    countries,
    drop_lowercase_words,
    letterhead_orgs,
    name_parts_again,
    same_shape_ids,
    speaker_labels,
)
from fleetlm.privacy.spans import PiiSpan, whole_word_matches


def span(text: str, value: str, kind: str, nth: int = 0) -> PiiSpan:
    start = -1
    for _ in range(nth + 1):
        start = text.index(value, start + 1)
    return PiiSpan(start, start + len(value), kind, 0.85)


def values(text: str, spans: list[PiiSpan]) -> list[tuple[str, str]]:
    return [(text[s.start:s.end], s.entity_type) for s in spans]


def test_name_parts_found_again_in_any_order():
    text = "Duplicate profile: Yuki Sato (yuki@example.jp) and Sato Yuki are the same. Ask Sato."
    got = name_parts_again(text, [span(text, "Yuki Sato", "PERSON")])
    assert values(text, got) == [("Sato", "PERSON"), ("Sato", "PERSON"), ("Yuki", "PERSON")]
    # only whole words, never inside another word or an e-mail address
    assert all(text[s.start - 1] in " " for s in got)


def test_name_parts_skip_stop_words_and_lower_case():
    text = "Will Smith called. Will you call back? will do. Smithers said no."
    got = name_parts_again(text, [span(text, "Will Smith", "PERSON")])
    assert got == []  # "Will" is a stop word; "Smithers" is another word


def test_speaker_labels_of_a_dialogue():
    text = "Ella: What a wife.\nDestiny: Remember me?\nNatasha: You saved my life!"
    got = speaker_labels(text, [span(text, "Ella", "PERSON")])
    assert values(text, got) == [("Destiny", "PERSON"), ("Natasha", "PERSON")]


def test_headers_and_a_single_label_are_not_speakers():
    headers = "Subject: refund\nFrom: the shop\nNote: call back\nCustomer: wants money"
    assert speaker_labels(headers, []) == []
    one = "Reminder: the office is closed on Monday."
    assert speaker_labels(one, []) == []
    inline = "Tom said: yes. Ann said: no."  # not at the start of a line
    assert speaker_labels(inline, []) == []
    # a structured prompt's field labels: no speaker is a detected person
    prompt = "Labels: positive, negative\n\nText: Dreadful food and a rude waiter."
    assert speaker_labels(prompt, []) == []
    fields = "Intent: refund\nCategory: cards\nSummary: Anna wants money back"
    assert speaker_labels(fields, [span(fields, "Anna", "PERSON")]) == []  # not a label
    dialogue = "Ella: What a wife.\nDestiny: Remember me?"
    assert speaker_labels(dialogue, []) == []  # nobody known: not taken for a dialogue


def test_same_shape_identifier_gets_the_type_of_the_found_one():
    text = "My passport number changed. The new one is 672019458; the old 488120376 is void."
    got = same_shape_ids(text, [span(text, "672019458", "US_PASSPORT")])
    assert values(text, got) == [("488120376", "US_PASSPORT")]
    # another shape (more digits, or a card's groups) is left alone
    other = "Passport 672019458, order 1234567890, card 4111 1111 1111 1111."
    assert same_shape_ids(other, [span(other, "672019458", "US_PASSPORT")]) == []
    # identifiers of other kinds do not spread
    phone = "Call 555 0123 or 555 0199."
    assert same_shape_ids(phone, [span(phone, "555 0123", "PHONE_NUMBER")]) == []


def test_letterhead_line_above_an_address_is_an_organisation():
    text = "Amazon Web Services\n\n9092 Avda. Generalísimo 6 Apt. 868\nPaulista"
    got = letterhead_orgs(text, [span(text, "Generalísimo 6 Apt. 868\nPaulista", "LOCATION")])
    assert values(text, got) == [("Amazon Web Services", "ORGANIZATION")]
    prefixed = "> Carly Jones\n> Topcoder\n> 53772 Holmatun 45"
    got = letterhead_orgs(prefixed, [span(prefixed, "Carly Jones", "PERSON"),
                                     span(prefixed, "53772 Holmatun 45", "LOCATION")])
    assert values(prefixed, got) == [("Topcoder", "ORGANIZATION")]


def test_letterhead_needs_an_address_below_a_short_capitalised_free_line():
    loc = "Paulista 12"
    for above in ("please send it here", "We moved last year to the new office on the hill",
                  "Hello,", "Mr Brown"):
        text = f"{above}\n{loc}"
        spans = [span(text, loc, "LOCATION")]
        if above == "Mr Brown":
            spans.append(span(text, "Brown", "PERSON"))  # a line already detected
        assert letterhead_orgs(text, spans) == [], above
    no_address = "Topcoder\nSee you soon"
    assert letterhead_orgs(no_address, []) == []
    far = "Topcoder\n\n\n\nPaulista 12"  # more than one blank line between
    assert letterhead_orgs(far, [span(far, "Paulista 12", "LOCATION")]) == []


def test_country_names_in_exact_case_and_whole_words():
    text = "I cannot pay because Samoa is not listed; American Samoa neither. samoa, Samoans"
    got = countries(text, [])
    assert values(text, got) == [("Samoa", "LOCATION"), ("American Samoa", "LOCATION")]
    covered = countries(text, [span(text, "Samoa", "LOCATION")])
    assert values(text, covered) == [("American Samoa", "LOCATION")]


def test_lowercase_common_words_are_not_places():
    text = "The zoo has lemurs, antelope, camels and more in Lyon."
    spans = [span(text, w, "LOCATION") for w in ("lemurs", "antelope", "camels", "Lyon")]
    assert values(text, drop_lowercase_words(text, spans)) == [("Lyon", "LOCATION")]
    # next to another detection it is part of an address ("MOSS, nan"); people stay
    addr = "27534 Thorsgata 63\nMOSS\n, nan\n 51971, ask jordan"
    spans = [span(addr, "MOSS", "LOCATION"), span(addr, "nan", "LOCATION"),
             span(addr, "jordan", "PERSON")]
    assert len(drop_lowercase_words(addr, spans)) == 3
    # an all-lower-case text keeps them: its names are lower case too
    low = "i moved to lyon last week"
    assert len(drop_lowercase_words(low, [span(low, "lyon", "LOCATION")])) == 1


def test_apply_rules_adds_only_configured_types():
    text = "Ella: hi\nDestiny: hello from Samoa\nTopcoder\n12 Main St"
    spans = [span(text, "Ella", "PERSON"), span(text, "12 Main St", "LOCATION")]
    strict = values(text, apply_rules(text, spans, STRICT_ENTITIES))
    assert ("Destiny", "PERSON") in strict and ("Samoa", "LOCATION") in strict
    assert ("Topcoder", "ORGANIZATION") in strict
    default = values(text, apply_rules(text, spans, DEFAULT_ENTITIES))
    assert ("Topcoder", "ORGANIZATION") not in default  # ORGANIZATION is not redacted
    only_email = values(text, apply_rules(text, spans, ("EMAIL_ADDRESS",)))
    assert only_email == values(text, spans)


def test_whole_word_matches_is_the_regex_it_replaces():
    """The find loop against the regex pii.py compiled per value before (a slow twin)."""
    import re

    def regex(text: str, value: str, extra: str = "") -> list[tuple[int, int]]:
        w = r"[\w" + re.escape(extra) + "]" if extra else r"\w"
        left = rf"(?<!{w})" if re.match(r"\w", value) else ""
        right = rf"(?!{w})" if re.search(r"\w$", value) else ""
        return [m.span() for m in re.finditer(left + re.escape(value) + right, text)]

    text = ("Ann, Anne and Ann-Marie met ann at Ann's; +1 555 0100 and +1 555 01000; "
            "Jürgen_Ann Ann_ Müller Mülleri ÅAnn Ann")
    for value in ("Ann", "ann", "+1 555 0100", "Müller", "Ann-Marie", "Ann's", " Ann", "x"):
        for extra in ("", "-"):
            assert whole_word_matches(text, value, extra) == regex(text, value, extra), value
    assert whole_word_matches(text, "") == []
    assert whole_word_matches("aaaa", "aa") == []  # overlapping repeats: none whole
