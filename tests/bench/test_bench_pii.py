"""The scoring of ``fleetlm bench pii`` on hand-made spans (exact numbers), the message and
request builders it times, and its settings' errors. No presidio or spaCy here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetlm.bench.pii import (
    KEY_TYPES,
    SYSTEM_PROMPT,
    PiiBenchConfig,
    Span,
    chat_requests,
    hundred_word_messages,
    load_pii_config,
    load_set,
    score,
    targets_met,
)
from fleetlm.errors import ConfigError

TEXT = "Jan van Berg, 450 Oak Road 15, Leeds. Age 42. Mail ann@x.org now"


def _at(value: str, etype: str, text: str = TEXT) -> Span:
    start = text.index(value)
    return Span(start, start + len(value), etype)


GOLD = [_at("Jan van Berg", "PERSON"), _at("450", "STREET_ADDRESS"),
        _at("Oak Road 15", "STREET_ADDRESS"), _at("Leeds", "GPE"), _at("42", "AGE"),
        _at("ann@x.org", "EMAIL_ADDRESS")]
PRED = [_at("Jan van", "PERSON"),  # overlaps the name, leaves "Berg": not found
        _at("450 Oak Road 15", "LOCATION"),  # covers both address pieces
        _at("Leeds", "PERSON"),  # hides the city, wrong type
        _at("ann@x.org", "EMAIL_ADDRESS"),
        _at("now", "LOCATION")]  # on nothing
ENTITIES = ("PERSON", "LOCATION", "EMAIL_ADDRESS")


@pytest.fixture(scope="module")
def res() -> dict:
    return score([(TEXT, GOLD)], [PRED], ENTITIES)


def test_typed_rule_counts_covered_gold_spans(res):
    per = res["typed"]["per_type"]
    assert per["PERSON"] == {"gold": 1, "predicted": 2, "gold_found": 0, "predicted_correct": 1,
                             "precision": 0.5, "recall": 0.0, "f2": 0.0,
                             "gold_overlapped": 1, "recall_overlap": 1.0}
    assert per["LOCATION"] == {"gold": 3, "predicted": 2, "gold_found": 2, "predicted_correct": 1,
                               "precision": 0.5, "recall": pytest.approx(2 / 3),
                               "f2": pytest.approx(0.625), "gold_overlapped": 2,
                               "recall_overlap": pytest.approx(2 / 3)}
    assert per["EMAIL_ADDRESS"]["f2"] == 1.0
    overall = res["typed"]["overall"]
    assert (overall["gold"], overall["gold_found"], overall["predicted"],
            overall["predicted_correct"]) == (5, 3, 5, 3)
    assert overall["precision"] == overall["recall"] == overall["f2"] == pytest.approx(0.6)
    assert overall["recall_overlap"] == pytest.approx(0.8)
    every = res["typed"]["overall_all_gold"]  # AGE counted as a miss
    assert every["gold"] == 6 and every["recall"] == pytest.approx(0.5)
    assert every["f2"] == pytest.approx(1.5 / 2.9)


def test_any_type_rule_and_in_clear(res):
    assert res["any_type"] == {"gold": 6, "predicted": 5, "gold_found": 4, "predicted_correct": 4,
                               "precision": 0.8, "recall": pytest.approx(4 / 6),
                               "f2": pytest.approx(5 * 0.8 * (4 / 6) / (3.2 + 4 / 6))}
    # the half-hidden name is not in the clear; the age is (nothing overlaps it)
    assert res["in_clear"] == {"gold": 6, "in_clear": 1, "share": pytest.approx(1 / 6),
                               "detectable_gold": 5, "detectable_in_clear": 0,
                               "detectable_share": 0.0}
    assert res["key_recall"] == {"types": {"EMAIL_ADDRESS": 1.0, "PHONE_NUMBER": None,
                                           "CREDIT_CARD": None, "IBAN_CODE": None},
                                 "min": 1.0, "gold": {"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 0,
                                                      "CREDIT_CARD": 0, "IBAN_CODE": 0}}
    assert res["undetectable_gold"] == {"AGE": 1}
    rows = res["per_gold_type"]
    assert list(rows) == ["STREET_ADDRESS", "AGE", "EMAIL_ADDRESS", "GPE", "PERSON"]
    assert rows["STREET_ADDRESS"] == {"presidio_type": "LOCATION", "gold": 2, "found": 2,
                                      "recall": 1.0, "covered_any_type": 2, "in_clear": 0,
                                      "detectable": True, "why_not": None}
    assert rows["GPE"]["covered_any_type"] == 1 and rows["GPE"]["found"] == 0
    assert rows["AGE"]["why_not"] == "not in entities" and rows["AGE"]["in_clear"] == 1
    assert rows["PERSON"]["covered_any_type"] == 0 and rows["PERSON"]["in_clear"] == 0


def test_placeholders_side_by_side_cover_a_value():
    text = "Dear Jan van Berg, call 555-0100."
    gold = [_at("Jan van Berg", "PERSON", text), _at("555-0100", "PHONE_NUMBER", text)]
    # spaces and dashes between placeholders leak nothing; a missed digit does
    side_by_side = [_at("Jan", "PERSON", text), _at("van Berg", "PERSON", text),
                    _at("555", "PHONE_NUMBER", text), _at("010", "PHONE_NUMBER", text)]
    res = score([(text, gold)], [side_by_side], ("PERSON", "PHONE_NUMBER"))
    assert res["per_gold_type"]["PERSON"]["found"] == 1
    assert res["per_gold_type"]["PHONE_NUMBER"]["found"] == 0
    assert res["per_gold_type"]["PHONE_NUMBER"]["in_clear"] == 0
    assert res["typed"]["per_type"]["PHONE_NUMBER"]["recall_overlap"] == 1.0
    assert res["key_recall"]["types"]["PHONE_NUMBER"] == 0.0 and res["key_recall"]["min"] == 0.0


def test_types_not_configured_are_undetectable_not_in_the_typed_rows():
    text = "Mail ann@x.org on 12 March, see https://x.org/a"
    gold = [_at("ann@x.org", "EMAIL_ADDRESS", text), _at("12 March", "DATE_TIME", text),
            _at("https://x.org/a", "URL", text), _at("x", "MADE_UP", text)]
    res = score([(text, gold)], [[]], ("EMAIL_ADDRESS",))
    assert set(res["typed"]["per_type"]) == {"EMAIL_ADDRESS"}
    assert res["typed"]["per_type"]["EMAIL_ADDRESS"]["precision"] is None
    assert res["typed"]["per_type"]["EMAIL_ADDRESS"]["f2"] is None
    why = {t: r["why_not"] for t, r in res["per_gold_type"].items()}
    assert why == {"EMAIL_ADDRESS": None, "DATE_TIME": "not in entities",
                   "URL": "not in entities", "MADE_UP": "type unknown to gold_to_presidio"}
    assert res["in_clear"]["share"] == 1.0


def test_empty_predictions_and_gold():
    res = score([("nothing here", [])], [[]], ENTITIES)
    assert res["typed"]["overall"]["f2"] is None and res["in_clear"]["share"] is None
    assert res["key_recall"]["min"] is None
    assert targets_met({**res, "latency_100_words_ms": {"p50": None, "p99": None}}) == {
        "f2": None, "key_recall": None, "in_clear": None, "latency_p50": None,
        "latency_p99": None}


def test_targets_met(res):
    met = targets_met({**res, "latency_100_words_ms": {"p50": 9.0, "p99": 51.0}})
    assert met == {"f2": False, "key_recall": True, "in_clear": False, "latency_p50": True,
                   "latency_p99": False}


def test_hundred_word_messages_concatenate_examples():
    texts = ["one two three", "four five", "six"]
    msgs = hundred_word_messages(texts, 10, words=4)
    assert msgs == ["one two three four", "four five six one", "six one two three"]
    big = hundred_word_messages([f"w{i} x y" for i in range(50)], 20)
    assert len(big) == 20 and all(len(m.split()) == 100 for m in big)
    assert big[1].startswith("w1 x y w2") and not big[1].endswith(" ")
    assert hundred_word_messages(["", " "], 5) == [] and hundred_word_messages([], 5) == []


def test_chat_requests_are_system_then_three_turns():
    assert chat_requests(["a", "b"], 5) == [[SYSTEM_PROMPT, "a", "b", "a"],
                                            [SYSTEM_PROMPT, "b", "a", "b"]]
    assert chat_requests([], 5) == []
    assert len(chat_requests(["a"] * 10, 3)) == 3


def test_key_types_are_the_issue_s():
    assert KEY_TYPES == ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE")


def test_sets_load_and_bad_settings_name_the_option(tmp_path: Path):
    support = load_set("support-v1", limit=5)
    assert support.name == "support-v1" and len(support.rows) == 5
    assert support.rows[0][1] and all(isinstance(s, Span) for s in support.rows[0][1])
    good = tmp_path / "mine.json"
    good.write_text(json.dumps([{"full_text": "Hi Ann", "spans": [
        {"entity_type": "PERSON", "start_position": 3, "end_position": 5}]}]))
    assert load_set(str(good)).name == "mine" and load_set(str(good)).rows == [
        ("Hi Ann", [Span(3, 5, "PERSON")])]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": "no full_text"}]))
    cfg = PiiBenchConfig(data=[str(tmp_path / "nope.json"), str(bad), str(good)], limit=0,
                         latency_messages=-1)
    with pytest.raises(ConfigError) as e:
        cfg.check()
    msg = str(e.value)
    assert "--limit=0" in msg and "--latency-messages=-1" in msg
    assert "nope.json: no such file" in msg and "synthetic-val" in msg
    assert "bad.json: not in presidio's synthetic-set format" in msg
    with pytest.raises(ConfigError, match="--data: name at least one data set"):
        PiiBenchConfig(data=[]).check()


def test_pii_config_file(tmp_path: Path):
    ok = tmp_path / "pii.yaml"
    ok.write_text("entities: [PERSON, EMAIL_ADDRESS]\nscore_threshold: 0.5\n")
    assert load_pii_config(ok).entities == ("PERSON", "EMAIL_ADDRESS")
    typo = tmp_path / "typo.yaml"
    typo.write_text("entitys: [PERSON]\n")
    with pytest.raises(ConfigError, match="entitys: unknown key"):
        load_pii_config(typo)
    with pytest.raises(ConfigError, match="--pii-config .*no such file"):
        load_pii_config(tmp_path / "none.yaml")


class _FakeRedactor:
    """Replaces the word "Ann" (the only personal data it knows) through the mapping."""

    def redact(self, text, mapping):
        while "Ann" in text:
            text = text.replace("Ann", mapping.placeholder_for("Ann", "PERSON"), 1)
        return text, mapping

    def redact_many(self, texts, mapping):
        return [self.redact(t, mapping)[0] for t in texts]


def test_timings_without_a_detector():
    from fleetlm.bench.pii import time_detection, time_round_trip

    lat = time_detection(lambda m: None, ["a b", "c d"])
    assert lat["n"] == 2 and lat["cpu"]["n"] == 2 and lat["words"] == 100
    assert time_detection(lambda m: None, [])["p50"] is None
    rt = time_round_trip(_FakeRedactor(), chat_requests(["Hi, Ann here.", "Dear Ann,", "ok"], 3))
    assert rt["total"]["n"] == 3 and rt["restored_exactly"] == 3
    assert rt["words_p50"] == len(SYSTEM_PROMPT.split()) + 6
