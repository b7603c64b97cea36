"""prepare: normalisation, every drop reason, dedup, leakage, split, anonymisation."""

from __future__ import annotations

import random
import sys
import types
from collections import Counter
from collections.abc import Callable

import pytest

from fleetlm.errors import ConfigError, FleetLMError
from fleetlm.tune.config import TuneConfig
from fleetlm.tune.prepare import (
    NearDupIndex,
    brute_force_near_pairs,
    exact_key,
    normalize_text,
    prepare,
    word_frequencies,
    word_set,
)
from fleetlm.tune.records import Example, classification_example

MakeCfg = Callable[..., TuneConfig]
LONG = ("I would like to know why the payment I made with my card at the supermarket "
        "yesterday evening is still showing as pending in the app")  # 25 words


def cls(rows: list[tuple[str, str]]) -> list[Example]:
    return [classification_example(t, label) for t, label in rows]


def distinct(n: int, label: str = "a") -> list[Example]:
    """n rows that are neither exact nor near duplicates of each other."""
    return cls([(f"question number {i} about {w}", label)
                for i, w in enumerate(random.Random(label).sample(range(10**6), n))])


def test_normalize_text() -> None:
    assert normalize_text("Ｈｅｌｌｏ\u00a0\u00a0 wor\u200bld \t!\r\n\r\n\r\n\nnext ") == \
        "Hello world !\n\nnext"
    assert normalize_text("def f():\n    return  1  \n") == "def f():\n    return 1"


def test_normalize_applies_to_every_message_and_answer(make_cfg: MakeCfg) -> None:
    row = Example(prompt=({"role": "system", "content": " sys\u3000prompt "},
                          {"role": "user", "content": "ｆｕｌｌ  width"}), answer=" ans\u00a0 ")
    res = prepare([row], [row], make_cfg("chat", prepare={"dedup": "off"}))
    assert res.train[0].prompt == ({"role": "system", "content": "sys prompt"},
                                   {"role": "user", "content": "full width"})
    assert res.train[0].answer == "ans"
    res = prepare([row], None, make_cfg("chat", prepare={"normalize": False, "dedup": "off"}))
    assert res.train[0].answer == " ans\u00a0 "


def test_every_drop_reason_is_counted(make_cfg: MakeCfg) -> None:
    rows = [*distinct(10), *cls([("   ", "a"), ("hi", "a"), ("x" * 60, "a")])]
    res = prepare(rows, None, make_cfg(prepare={"min_chars": 5, "max_chars": 50}))
    r = res.report
    assert (r["dropped_empty"], r["dropped_too_short"], r["dropped_too_long"]) == (1, 1, 1)
    assert r["rows_in"] == 13 and r["train_rows"] + r["val_rows"] == 10


def test_empty_answer_is_dropped(make_cfg: MakeCfg) -> None:
    rows = [Example(prompt=({"role": "user", "content": "q1"},), answer="a"),
            Example(prompt=({"role": "user", "content": "q2"},), answer="  ")]
    assert prepare(rows, None, make_cfg("completion")).report["dropped_empty"] == 1


def test_exact_duplicates_ignore_case_punctuation_and_spaces(make_cfg: MakeCfg) -> None:
    assert exact_key("How do I top-up?") == exact_key("how do i top up") == "howdoitopup"
    rows = cls([("How do I top-up?", "a"), ("how do i  top up", "a"), ("HOW DO I TOP UP!!", "a"),
                ("Something else entirely", "a")])
    res = prepare(rows, [], make_cfg())
    assert res.report["exact_duplicates"] == 2
    assert [r.text for r in res.train] == ["How do I top-up?", "Something else entirely"]


def test_near_duplicates_one_word_changed(make_cfg: MakeCfg) -> None:
    changed = LONG.replace("yesterday", "today")
    reordered = "Yesterday evening, " + LONG.replace(" yesterday evening", "")
    rows = cls([(LONG, "a"), (changed, "a"), (reordered, "a"), ("a different question", "a")])
    res = prepare(rows, [], make_cfg())
    assert res.report["near_duplicates"] == 2 and res.report["exact_duplicates"] == 0
    assert [r.text for r in res.train] == [LONG, "a different question"]
    # at a stricter threshold the changed word makes them different rows
    strict = prepare(rows, [], make_cfg(prepare={"near_dup_threshold": 0.95}))
    assert strict.report["near_duplicates"] == 1  # only the reordered one (same words)
    exact_only = prepare(rows, [], make_cfg(prepare={"dedup": "exact"}))
    assert exact_only.report["near_duplicates"] == 0 and len(exact_only.train) == 4


def test_conflicting_labels_drop_every_row_of_the_group(make_cfg: MakeCfg) -> None:
    rows = cls([("Has my top-up gone through?", "top_up_reverted"),
                ("has my top up gone through", "pending_top_up"),
                (LONG, "pending_card_payment"), (LONG.replace("card", "debit card"), "other"),
                ("unrelated row", "x")])
    res = prepare(rows, [], make_cfg())
    assert res.report["conflicting_labels"] == 4
    assert [r.text for r in res.train] == ["unrelated row"]


def test_validation_leakage_is_removed(make_cfg: MakeCfg) -> None:
    train = distinct(5)
    val = cls([(str(train[0].text).upper() + "?", "a"), (str(train[1].text), "b"),
               ("a genuinely new question", "a")])
    res = prepare(train, val, make_cfg())
    assert res.report["val_leakage_removed"] == 2
    assert [r.text for r in res.val] == ["a genuinely new question"]
    assert len(res.train) == 5


def test_stratified_split(make_cfg: MakeCfg) -> None:
    rows = [*distinct(40, "big"), *distinct(2, "pair"), *distinct(1, "single"),
            *distinct(9, "mid")]
    cfg = make_cfg(data={"validation_fraction": 0.25})
    res = prepare(rows, None, cfg)
    train_labels = Counter(r.label for r in res.train)
    val_labels = Counter(r.label for r in res.val)
    assert set(train_labels) == {"big", "pair", "single", "mid"}  # every label stays in train
    assert val_labels["single"] == 0 and val_labels["big"] == 10
    assert len(res.val) == 13 and len(res.train) + len(res.val) == 52
    assert res.report["labels"] == 4 and res.report["val_rows"] == 13
    again = prepare(rows, None, cfg)
    assert [r.text for r in again.val] == [r.text for r in res.val]  # seeded
    other = prepare(rows, None, make_cfg(data={"validation_fraction": 0.25}, seed=7))
    assert [r.text for r in other.val] != [r.text for r in res.val]


def test_random_split_for_generation_tasks(make_cfg: MakeCfg) -> None:
    rows = [Example(prompt=({"role": "user", "content": f"task {i} {i * 7919}"},), answer="ok")
            for i in range(20)]
    res = prepare(rows, None, make_cfg("completion", data={"validation_fraction": 0.2}))
    assert (len(res.train), len(res.val)) == (16, 4)


def test_max_validation_rows_is_stratified(make_cfg: MakeCfg) -> None:
    train = distinct(5, "a")
    val = [*distinct(30, "x"), *distinct(10, "y")]
    res = prepare(train, val, make_cfg(data={"max_validation_rows": 8}))
    assert Counter(r.label for r in res.val) == {"x": 6, "y": 2}


class FakeRedactor:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def redact_many(self, texts: list[str]) -> list[str]:
        self.calls.append(list(texts))
        return [t.replace("Alice", "<PERSON_1>") for t in texts]


def test_anonymisation_with_a_duck_typed_redactor(make_cfg: MakeCfg) -> None:
    rows = [Example(prompt=({"role": "system", "content": "Help Alice's bank"},
                            {"role": "user", "content": f"I am Alice, request {i}"}),
                    answer=f"Hello Alice, done {i}") for i in range(10)]
    red = FakeRedactor()
    res = prepare(rows, None, make_cfg("chat", prepare={"anonymize": True}), redactor=red)
    out = [*res.train, *res.val]
    assert res.report["anonymized_rows"] == 10 and len(out) == 10
    assert all("Alice" not in m["content"] for r in out for m in r.prompt)
    assert all(r.answer.startswith("Hello <PERSON_1>") for r in out)
    sent = [t for call in red.calls for t in call]
    assert sent.count("Help Alice's bank") == 1  # each distinct text once


def test_anonymisation_keeps_classification_labels(make_cfg: MakeCfg) -> None:
    rows = cls([("Alice lost her card", "Alice_label"), ("my card is gone", "other")])
    res = prepare(rows, [], make_cfg(prepare={"anonymize": True}), redactor=FakeRedactor())
    assert [(r.text, r.label, r.answer, r.prompt[0]["content"]) for r in res.train][0] == \
        ("<PERSON_1> lost her card", "Alice_label", "Alice_label", "<PERSON_1> lost her card")
    assert res.report["anonymized_rows"] == 1


def test_anonymize_without_presidio_names_the_fix(make_cfg: MakeCfg,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fleetlm.privacy", None)  # import fails
    with pytest.raises(ConfigError, match=r"prepare\.anonymize.*presidio"):
        prepare(distinct(3), None, make_cfg(prepare={"anonymize": True}))


def test_anonymize_with_a_missing_spacy_model_names_the_fix(
        make_cfg: MakeCfg, monkeypatch: pytest.MonkeyPatch) -> None:
    class Unloadable:
        def load(self) -> None:
            raise FleetLMError("spaCy model en_core_web_sm is not installed; pip install it")

    fake = types.ModuleType("fleetlm.privacy")
    fake.PiiRedactor = Unloadable  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fleetlm.privacy", fake)
    with pytest.raises(ConfigError, match=r"prepare\.anonymize.*en_core_web_sm.*"
                                          r"prepare\.anonymize: false"):
        prepare(distinct(3), None, make_cfg(prepare={"anonymize": True}))


def test_empty_after_cleaning_names_the_settings(make_cfg: MakeCfg) -> None:
    rows = cls([("hi", "a"), ("yo", "a"), ("x" * 100, "a")])
    with pytest.raises(ConfigError) as e:
        prepare(rows, None, make_cfg(prepare={"min_chars": 5, "max_chars": 50}))
    msg = str(e.value)
    assert "2 shorter than prepare.min_chars" in msg and "1 longer than prepare.max_chars" in msg
    assert "lower prepare.min_chars" in msg and "raise prepare.max_chars" in msg


def test_progress_is_reported(make_cfg: MakeCfg) -> None:
    seen: list[str] = []
    prepare(distinct(10), None, make_cfg(), progress=lambda s, d, t: seen.append(s))
    assert seen == ["normalize", "filter", "dedup", "split"]


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.85, 0.9, 1.0])
def test_near_dup_index_matches_brute_force(threshold: float) -> None:
    rng = random.Random(threshold)
    vocab = [f"w{i}" for i in range(30)]
    texts = [" ".join(rng.sample(vocab, rng.randint(1, 12))) for _ in range(300)]
    sets = [word_set(t) for t in texts]
    index = NearDupIndex(threshold, word_frequencies(texts))
    fast: set[tuple[int, int]] = set()
    for j, s in enumerate(sets):
        fast.update((i, j) for i in index.matches(s))
        index.add(s, j)
    slow = brute_force_near_pairs(sets, threshold)
    assert fast == slow and len(slow) > 0

