"""The learned recognizer's plain-Python parts on hand-made offsets: gold spans -> BIO
piece tags, piece probabilities -> character spans, the case flag, the overlap scorer,
and the config and weights-file checks that need no model."""

from __future__ import annotations

import json

import pydantic
import pytest

from fleetlm.privacy import PiiConfig, PiiModelNotInstalled
from fleetlm.privacy.learned.labels import (
    IGNORE,
    CharSpan,
    bio_labels,
    case_flags,
    decode,
    gold_spans,
    tag_pieces,
)
from fleetlm.privacy.learned.model import (
    META_KEY,
    SHIPPED_WEIGHTS,
    WEIGHTS_NAME,
    LearnedMeta,
    resolve_weights,
)
from fleetlm.privacy.learned.scoring import span_scores

LABELS = bio_labels()
TEXT = "Jo Ann Smith lives at 450 Main St, Oslo."
# word pieces as a fast tokenizer reports them: (0, 0) for [CLS] / [SEP]
OFFSETS = [(0, 0), (0, 2), (3, 6), (7, 10), (10, 12), (13, 18), (19, 21), (22, 25),
           (26, 30), (31, 33), (33, 34), (35, 39), (39, 40), (0, 0)]


def _onehot(tags: list[str]) -> list[list[float]]:
    rows = []
    for t in tags:
        row = [0.01] * len(LABELS)
        row[LABELS.index(t)] = 0.9
        rows.append(row)
    return rows


def test_gold_spans_map_types_and_drop_the_unlearned():
    row = {"spans": [
        {"entity_type": "GPE", "start_position": 35, "end_position": 39},
        {"entity_type": "STREET_ADDRESS", "start_position": 22, "end_position": 33},
        {"entity_type": "PERSON", "start_position": 0, "end_position": 12},
        {"entity_type": "EMAIL_ADDRESS", "start_position": 1, "end_position": 2},
        {"entity_type": "AGE", "start_position": 3, "end_position": 4}]}
    assert gold_spans(row) == [CharSpan(0, 12, "PERSON"), CharSpan(22, 33, "LOCATION"),
                               CharSpan(35, 39, "LOCATION")]


def test_tag_pieces_bio_over_word_pieces():
    spans = [CharSpan(0, 12, "PERSON"), CharSpan(22, 25, "LOCATION"),
             CharSpan(26, 33, "LOCATION"), CharSpan(35, 39, "LOCATION")]
    tags = [LABELS[t] if t != IGNORE else "-" for t in tag_pieces(OFFSETS, spans, LABELS)]
    assert tags == ["-", "B-PERSON", "I-PERSON", "I-PERSON", "I-PERSON", "O", "O",
                    "B-LOCATION", "B-LOCATION", "I-LOCATION", "O", "B-LOCATION", "O", "-"]


def test_case_flags_mark_capitalised_pieces():
    assert case_flags(TEXT, OFFSETS) == [0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0]


def test_decode_grows_to_whole_words_and_joins_blank_separated_pieces():
    # "Smith" is tagged only on its second piece ("th"), and the address comes as two
    # B- spans: the name still covers the whole word, the address is one span
    tags = ["O", "B-PERSON", "I-PERSON", "O", "I-PERSON", "O", "O",
            "B-LOCATION", "B-LOCATION", "I-LOCATION", "O", "B-LOCATION", "O", "O"]
    spans = decode(TEXT, OFFSETS, _onehot(tags), LABELS)
    assert [(TEXT[s.start:s.end], s.entity_type) for s in spans] == [
        ("Jo Ann Smith", "PERSON"), ("450 Main St", "LOCATION"), ("Oslo", "LOCATION")]
    assert all(s.score == pytest.approx(0.91) for s in spans)  # B- plus I- probability


def test_decode_i_tag_of_another_type_continues_the_span_typed_by_vote():
    # a tie: the opening tag's type
    tags = ["O", "B-PERSON", "I-LOCATION", "O", "O", "O", "O", "O", "O", "O", "O", "O", "O", "O"]
    spans = decode(TEXT, OFFSETS, _onehot(tags), LABELS)
    assert [(s.start, s.end, s.entity_type) for s in spans] == [(0, 6, "PERSON")]
    # "John" B-PERSON 0.92, "Smith" I-ORGANIZATION 0.52 / I-PERSON 0.33: one PERSON
    rows = _onehot(tags)
    rows[1] = [0.0] * len(LABELS)
    rows[1][LABELS.index("B-PERSON")] = 0.92
    rows[1][LABELS.index("B-ORGANIZATION")] = 0.08
    rows[2] = [0.0] * len(LABELS)
    rows[2][LABELS.index("I-ORGANIZATION")] = 0.52
    rows[2][LABELS.index("I-PERSON")] = 0.33
    rows[2][LABELS.index("O")] = 0.15
    spans = decode(TEXT, OFFSETS, rows, LABELS)
    assert [(s.start, s.end, s.entity_type) for s in spans] == [(0, 6, "PERSON")]
    assert spans[0].score == pytest.approx((0.92 + 0.33) / 2)
    # an I- tag after O opens a span of its own type
    tags = ["O", "O", "I-LOCATION", "O", "O", "O", "O", "O", "O", "O", "O", "O", "O", "O"]
    spans = decode(TEXT, OFFSETS, _onehot(tags), LABELS)
    assert [(s.start, s.end, s.entity_type) for s in spans] == [(3, 6, "LOCATION")]


def test_span_scores_overlap_rule():
    gold = [[CharSpan(0, 5, "PERSON"), CharSpan(10, 15, "LOCATION"), CharSpan(16, 20, "LOCATION")]]
    pred = [[CharSpan(2, 4, "PERSON"), CharSpan(10, 20, "LOCATION"), CharSpan(30, 33, "PERSON")]]
    s = span_scores(gold, pred)
    assert s["PERSON"] == {"gold": 1, "predicted": 2, "precision": 0.5, "recall": 1.0,
                           "f2": pytest.approx(5 * 0.5 / 3)}
    assert s["LOCATION"]["recall"] == 1.0 and s["LOCATION"]["precision"] == 1.0
    assert s["overall"]["gold"] == 3 and s["overall"]["precision"] == pytest.approx(2 / 3)


def test_config_ner_option_is_typed_and_learned_by_default():
    assert PiiConfig().ner == "learned" and PiiConfig().learned_model is None
    assert PiiConfig().learned_precision == "int8"
    with pytest.raises(pydantic.ValidationError, match="learned_precision"):
        PiiConfig(learned_precision="int4")
    assert PiiConfig(ner="both").ner == "both"
    with pytest.raises(pydantic.ValidationError, match="ner"):
        PiiConfig(ner="bert")
    with pytest.raises(pydantic.ValidationError, match="learned_modle"):
        PiiConfig(learned_modle="x")  # type: ignore[call-arg]


def test_missing_weights_name_the_field_and_the_fix(tmp_path):
    with pytest.raises(PiiModelNotInstalled, match="PiiConfig.learned_model=.*privacy train"):
        resolve_weights(tmp_path / "nowhere")
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    assert resolve_weights(tmp_path) == tmp_path / WEIGHTS_NAME
    assert resolve_weights(None) == SHIPPED_WEIGHTS


def test_shipped_weights_are_small_and_self_describing():
    from safetensors import safe_open

    assert SHIPPED_WEIGHTS.stat().st_size < 2_000_000
    with safe_open(str(SHIPPED_WEIGHTS), framework="pt") as f:
        meta = LearnedMeta.from_json(f.metadata()[META_KEY])
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        names = list(f.keys())
    assert meta.labels == LABELS and meta.base == "all-MiniLM-L6-v2"
    assert dtypes == {"F16"}
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)
    assert json.loads(meta.to_json())["rank"] == meta.rank


def test_decode_with_a_tensors_argmax_matches_its_own_row_by_row_choice():
    """The model's path hands decode each row's torch argmax; ties (exact, as a quantised
    model's probabilities can be) must go to the first maximum, as decode's own choice."""
    import random

    import torch

    rng = random.Random(0)
    for _ in range(200):
        rows = [[rng.choice([0.0, 0.1, 0.25, 0.25, 0.5]) for _ in LABELS] for _ in OFFSETS]
        best = torch.tensor(rows).argmax(-1).tolist()
        assert best == [max(range(len(r)), key=r.__getitem__) for r in rows]
        assert decode(TEXT, OFFSETS, rows, LABELS, best=best) == decode(TEXT, OFFSETS, rows, LABELS)
