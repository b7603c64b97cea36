"""Read the raw data files of a tune config into :class:`~fleetlm.tune.records.Example` rows.

    data.path (+ data.validation_path)  --CSV or JSON lines-->  list[Example]

One reader per file format (CSV with a header row; JSON lines, or a JSON array of
objects in a ``.json`` file) and one row builder per task shape:

    classification  data.text_column + data.label_column   -> user turn = text, answer = label
    completion      data.prompt_column + data.completion_column -> user turn, answer
    chat            data.messages_column (OpenAI messages; the last one is the assistant's
                    answer, the ones before it are the prompt; a JSON string in CSV cells)

Every problem is a :class:`~fleetlm.errors.ConfigError` naming the config field to fix;
problems of the same kind (e.g. bad rows) are collected and reported together. Loading
does not clean anything: normalisation, length limits and deduplication belong to
:mod:`fleetlm.tune.prepare`, which counts what it drops.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from fleetlm.errors import ConfigError
from fleetlm.tune.config import TuneConfig
from fleetlm.tune.records import Example, classification_example

# Show at most this many offending rows / labels in an error message.
_SHOW = 5
_JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_ROLES = {"system", "user", "assistant"}


def load_rows(cfg: TuneConfig) -> tuple[list[Example], list[Example] | None]:
    """The training rows of ``data.path`` (a seeded sample of ``data.max_rows`` when set)
    and the rows of ``data.validation_path`` (None when no validation file is given)."""
    train = _load_files(cfg, cfg.data.paths, "data.path")
    if cfg.data.max_rows is not None and len(train) > cfg.data.max_rows:
        keep = sorted(random.Random(cfg.seed).sample(range(len(train)), cfg.data.max_rows))
        train = [train[i] for i in keep]
    val = None
    if cfg.data.validation_paths:
        val = _load_files(cfg, cfg.data.validation_paths, "data.validation_path")
    if cfg.task.type == "classification" and cfg.task.labels is not None:
        _check_labels(cfg.task.labels, [("data.path", train), ("data.validation_path", val or [])])
    return train, val


# ----------------------------------------------------------------------------- files


def _load_files(cfg: TuneConfig, paths: list[Path], field: str) -> list[Example]:
    if len(paths) == 1:
        return _load_file(cfg, paths[0], field)
    return [ex for i, p in enumerate(paths) for ex in _load_file(cfg, p, f"{field}[{i}]")]


def _load_file(cfg: TuneConfig, path: Path, field: str) -> list[Example]:
    if not path.is_file():
        hint = "" if path.parent.is_dir() else f" (folder {path.parent} does not exist either)"
        raise ConfigError(f"{field}: file {path} does not exist{hint}; relative paths are "
                          "taken from the folder of the tune config")
    fmt = _format(cfg.data.format, path, field)
    records = list(_read_csv(path, field) if fmt == "csv" else _read_json(path, field))
    if not records:
        raise ConfigError(f"{field}: {path} holds no data rows; point {field} at a file with "
                          "one row per example")
    return _build(cfg, records, path, field)


def _format(fmt: str, path: Path, field: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in _JSON_SUFFIXES:
        return "jsonl"
    raise ConfigError(f"data.format: cannot tell the format of {field} {path} from its suffix "
                      f"'{suffix}'; name the file .csv or .jsonl, or set data.format: csv | jsonl")


# A record: (row number shown to the user, the row as a mapping). Row numbers are file
# line numbers for JSON lines, and record numbers after the header (1 = first data row)
# for CSV, whose quoted cells may span lines.
_Record = tuple[int, dict[str, Any]]


def _read_csv(path: Path, field: str) -> Iterator[_Record]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long chat transcripts in a cell
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: Excel's byte-order mark
        reader = csv.DictReader(f)
        try:
            if reader.fieldnames is None:
                return
            for n, row in enumerate(reader, start=1):
                if None in row:  # more cells than header columns
                    raise ConfigError(f"{field}: {path} row {n} has more cells than the header "
                                      f"has columns ({len(reader.fieldnames)}); quote cells that "
                                      "contain commas")
                yield n, row
        except csv.Error as e:
            raise ConfigError(f"{field}: {path} is not valid CSV near line {reader.line_num}: "
                              f"{e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{field}: {path} is not UTF-8 text ({e}); re-save it as UTF-8") \
                from None


def _read_json(path: Path, field: str) -> Iterator[_Record]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{field}: {path} is not UTF-8 text ({e}); re-save it as UTF-8") \
            from None
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{field}: {path} is not valid JSON (line {e.lineno}: {e.msg})") \
                from None
        for n, obj in enumerate(items, start=1):
            if not isinstance(obj, dict):
                raise ConfigError(f"{field}: {path} item {n} is a {type(obj).__name__}; "
                                  "every item must be an object of columns")
            yield n, obj
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{field}: {path} line {n} is not valid JSON ({e.msg} at column "
                              f"{e.colno}); every line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{field}: {path} line {n} is a JSON {type(obj).__name__}; every "
                              "line must be one JSON object of columns")
        yield n, obj


# ----------------------------------------------------------------------------- rows


def _build(cfg: TuneConfig, records: list[_Record], path: Path, field: str) -> list[Example]:
    task, data = cfg.task.type, cfg.data
    columns = {"classification": [("data.text_column", data.text_column),
                                  ("data.label_column", data.label_column)],
               "completion": [("data.prompt_column", data.prompt_column),
                              ("data.completion_column", data.completion_column)],
               "chat": [("data.messages_column", data.messages_column)]}[task]
    _check_columns(records, columns, path, field)
    rows: list[Example] = []
    problems: list[str] = []
    for n, rec in records:
        try:
            if task == "classification":
                label = _cell(rec, data.label_column, "data.label_column")
                if not label.strip():
                    raise _RowError("data.label_column", f"'{data.label_column}' is empty; "
                                    "every row needs a label")
                ex = classification_example(_cell(rec, data.text_column, "data.text_column"),
                                            label.strip())
            elif task == "completion":
                ex = Example(prompt=({"role": "user", "content":
                                      _cell(rec, data.prompt_column, "data.prompt_column")},),
                             answer=_cell(rec, data.completion_column, "data.completion_column"))
            else:
                ex = _chat_example(rec.get(data.messages_column), data.messages_column)
        except _RowError as e:
            problems.append(f"row {n}: {e.field}: {e}")
            continue
        rows.append(replace(ex, meta={"row": n}))
    if problems:
        more = f"\n  ... and {len(problems) - _SHOW} more" if len(problems) > _SHOW else ""
        raise ConfigError(f"{field}: {len(problems)} bad row(s) in {path}:\n  "
                          + "\n  ".join(problems[:_SHOW]) + more)
    return rows


class _RowError(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _check_columns(records: list[_Record], columns: list[tuple[str, str]], path: Path,
                   field: str) -> None:
    # CSV rows all share the header; JSON rows may each have their own keys.
    seen: dict[str, None] = {}
    for _, rec in records:
        seen.update(dict.fromkeys(rec))
    missing = [f"{option}: column '{name}' not in {field} columns {list(seen)}"
               for option, name in columns if name not in seen]
    if missing:
        raise ConfigError(f"{path}: " + "; ".join(missing)
                          + "; set the option to the column that holds it")


def _cell(rec: dict[str, Any], column: str, option: str) -> str:
    v = rec.get(column)
    if v is None:  # a JSON row without the key, or null: an empty row, dropped by prepare
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bool | int | float):  # numeric labels, e.g. 0/1
        return str(v)
    raise _RowError(option, f"column '{column}' holds a JSON {type(v).__name__}; expected text")


def _chat_example(v: Any, column: str) -> Example:
    option = "data.messages_column"
    if isinstance(v, str):  # CSV cells carry the messages as a JSON string
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise _RowError(option, f"'{column}' is not a JSON list of messages ({e.msg})") \
                from None
    if not isinstance(v, list) or len(v) < 2:
        raise _RowError(option, f"'{column}' must be a list of at least two messages "
                        "(the prompt, then the assistant's answer)")
    msgs = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or m.get("role") not in _ROLES \
                or not isinstance(m.get("content"), str):
            raise _RowError(option, f"message {i} of '{column}' must be "
                            "{\"role\": system|user|assistant, \"content\": text}")
        msgs.append({"role": m["role"], "content": m["content"]})
    if msgs[-1]["role"] != "assistant":
        raise _RowError(option, f"the last message of '{column}' is from '{msgs[-1]['role']}'; "
                        "it must be the assistant's answer the model learns")
    return Example(prompt=tuple(msgs[:-1]), answer=msgs[-1]["content"])


def _check_labels(labels: list[str], files: list[tuple[str, list[Example]]]) -> None:
    allowed = set(labels)
    problems = []
    for field, rows in files:
        bad = Counter(r.label for r in rows if r.label not in allowed)
        if bad:
            shown = ", ".join(f"'{k}' ({n} rows)" for k, n in bad.most_common(_SHOW))
            more = f" and {len(bad) - _SHOW} more" if len(bad) > _SHOW else ""
            problems.append(f"{field} has {sum(bad.values())} row(s) with labels not in "
                            f"task.labels: {shown}{more}")
    if problems:
        raise ConfigError("task.labels: " + "; ".join(problems)
                          + "; add those labels to task.labels, remove the rows, or drop "
                          "task.labels to use every label found in the data")
