"""load_rows: every task shape and file format, and errors that name the field to fix."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleetlm.errors import ConfigError
from fleetlm.tune.config import TuneConfig
from fleetlm.tune.load import load_rows

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MakeCfg = Callable[..., TuneConfig]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_classification_csv_with_quoted_multiline_cells(tmp_path: Path, make_cfg: MakeCfg) -> None:
    (tmp_path / "train.csv").write_text(
        'text,category\nI am still waiting on my card?,card_arrival\n'
        '"Two lines,\nwith a comma",card_linking\n', encoding="utf-8")
    train, val = load_rows(make_cfg(data={"label_column": "category"}))
    assert val is None
    assert [(r.text, r.label, r.answer) for r in train] == [
        ("I am still waiting on my card?", "card_arrival", "card_arrival"),
        ("Two lines,\nwith a comma", "card_linking", "card_linking")]
    assert train[0].prompt == ({"role": "user", "content": "I am still waiting on my card?"},)
    assert train[1].meta == {"row": 2}


def test_classification_jsonl_coerces_numeric_labels(tmp_path: Path, make_cfg: MakeCfg) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": 1},
                                           {"text": "bad", "label": 0}])
    write_jsonl(tmp_path / "val.jsonl", [{"text": "fine", "label": 1}])
    train, val = load_rows(make_cfg(path="train.jsonl", data={"validation_path": "val.jsonl"}))
    assert [r.label for r in train] == ["1", "0"]
    assert val is not None and [(r.text, r.label) for r in val] == [("fine", "1")]


def test_json_array_file(tmp_path: Path, make_cfg: MakeCfg) -> None:
    (tmp_path / "train.json").write_text(json.dumps([{"text": "a", "label": "x"}]))
    train, _ = load_rows(make_cfg(path="train.json"))
    assert [(r.text, r.label) for r in train] == [("a", "x")]


def test_completion_rows(tmp_path: Path, make_cfg: MakeCfg) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"q": "2+2?", "a": "4"}])
    train, _ = load_rows(make_cfg("completion", "d.jsonl",
                                  data={"prompt_column": "q", "completion_column": "a"}))
    assert train[0].prompt == ({"role": "user", "content": "2+2?"},)
    assert train[0].answer == "4" and train[0].label is None and train[0].text is None


def test_chat_rows_split_prompt_and_answer(tmp_path: Path, make_cfg: MakeCfg) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye", "name": "x"}]
    write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    train, _ = load_rows(make_cfg("chat", "d.jsonl"))
    assert train[0].answer == "Goodbye"
    assert [m["role"] for m in train[0].prompt] == ["system", "user", "assistant", "user"]


def test_chat_messages_as_json_string_in_csv(tmp_path: Path, make_cfg: MakeCfg) -> None:
    import csv

    msgs = [{"role": "user", "content": "Hi, there"}, {"role": "assistant", "content": "Hey"}]
    with (tmp_path / "d.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["conv"], [json.dumps(msgs)]])
    train, _ = load_rows(make_cfg("chat", "d.csv", data={"messages_column": "conv"}))
    assert train[0].prompt == ({"role": "user", "content": "Hi, there"},)
    assert train[0].answer == "Hey"


def test_chat_last_message_must_be_the_assistant(tmp_path: Path, make_cfg: MakeCfg) -> None:
    write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]},
        {"messages": "not json"}])
    with pytest.raises(ConfigError) as e:
        load_rows(make_cfg("chat", "d.jsonl"))
    msg = str(e.value)
    assert "2 bad row(s)" in msg and "data.messages_column" in msg
    assert "row 2" in msg and "assistant" in msg and "row 3" in msg


def test_missing_file_names_the_field(make_cfg: MakeCfg) -> None:
    with pytest.raises(ConfigError, match=r"data\.path: file .*nope\.csv does not exist"):
        load_rows(make_cfg(path="nope.csv"))


def test_missing_validation_file_names_the_field(tmp_path: Path, make_cfg: MakeCfg) -> None:
    (tmp_path / "train.csv").write_text("text,label\na,x\n")
    with pytest.raises(ConfigError, match=r"data\.validation_path: file"):
        load_rows(make_cfg(data={"validation_path": "val.csv"}))


def test_absent_column_names_the_option(tmp_path: Path, make_cfg: MakeCfg) -> None:
    (tmp_path / "train.csv").write_text("text,category\na,x\n")
    with pytest.raises(ConfigError) as e:
        load_rows(make_cfg(data={"text_column": "txt"}))
    msg = str(e.value)
    assert "data.text_column: column 'txt' not in data.path columns ['text', 'category']" in msg
    assert "data.label_column: column 'label'" in msg  # every problem at once


def test_bad_json_line_names_the_line(tmp_path: Path, make_cfg: MakeCfg) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    with pytest.raises(ConfigError, match=r"data\.path: .*d\.jsonl line 2 is not valid JSON"):
        load_rows(make_cfg(path="d.jsonl"))


@pytest.mark.parametrize("content", ["", "text,label\n", "\n\n"])
def test_empty_file(tmp_path: Path, make_cfg: MakeCfg, content: str) -> None:
    name = "d.jsonl" if content.startswith("\n") else "d.csv"
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=r"data\.path: .* holds no data rows"):
        load_rows(make_cfg(path=name))


def test_unknown_suffix_names_data_format(tmp_path: Path, make_cfg: MakeCfg) -> None:
    (tmp_path / "d.txt").write_text("text,label\na,x\n")
    with pytest.raises(ConfigError, match=r"data\.format"):
        load_rows(make_cfg(path="d.txt"))
    train, _ = load_rows(make_cfg(path="d.txt", data={"format": "csv"}))
    assert len(train) == 1


def test_empty_label_is_an_error(tmp_path: Path, make_cfg: MakeCfg) -> None:
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,\n")
    with pytest.raises(ConfigError, match=r"row 2: data\.label_column: 'label' is empty"):
        load_rows(make_cfg())


def test_labels_outside_task_labels(tmp_path: Path, make_cfg: MakeCfg) -> None:
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\nc,z\nd,z\n")
    with pytest.raises(ConfigError) as e:
        load_rows(make_cfg(task={"labels": ["x"]}))
    msg = str(e.value)
    assert msg.startswith("task.labels:") and "3 row(s)" in msg
    assert "'z' (2 rows)" in msg and "'y' (1 rows)" in msg


def test_max_rows_is_a_seeded_sample(tmp_path: Path, make_cfg: MakeCfg) -> None:
    (tmp_path / "train.csv").write_text(
        "text,label\n" + "".join(f"t{i},l{i % 3}\n" for i in range(100)))
    a, _ = load_rows(make_cfg(data={"max_rows": 10}))
    b, _ = load_rows(make_cfg(data={"max_rows": 10}))
    c, _ = load_rows(make_cfg(data={"max_rows": 10}, seed=1))
    texts = [r.text for r in a]
    assert len(a) == 10 and texts == [r.text for r in b] and texts != [r.text for r in c]
    assert texts == sorted(texts, key=lambda t: int(str(t)[1:]))  # file order kept


@pytest.mark.skipif(not (SHARED / "banking77" / "train.csv").is_file(),
                    reason="../shared/data/banking77 not present")
def test_real_banking77(make_cfg: MakeCfg) -> None:
    train, _ = load_rows(make_cfg(path=SHARED / "banking77" / "train.csv",
                                  data={"label_column": "category"}))
    assert len(train) == 10003
    assert len({r.label for r in train}) == 77


@pytest.mark.skipif(not (SHARED / "clinc150" / "train.jsonl").is_file(),
                    reason="../shared/data/clinc150 not present")
def test_real_clinc150_with_validation_file(make_cfg: MakeCfg) -> None:
    train, val = load_rows(make_cfg(path=SHARED / "clinc150" / "train.jsonl",
                                    data={"validation_path": SHARED / "clinc150" / "val.jsonl"}))
    assert len(train) == 15000 and val is not None and len(val) == 3000
    assert len({r.label for r in train}) == 150
