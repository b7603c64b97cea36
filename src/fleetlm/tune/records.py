"""The one row type every tuning stage reads and writes, and its JSON-lines form.

Every task shape becomes the same thing: the conversation up to the answer
(``prompt``, OpenAI chat messages) and the answer the model must learn (loss is taken
on the answer's tokens only). Classification rows keep their ``label`` (the answer is
the label) and their raw ``text`` (the user turn before the instruction is added).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Source = Literal["data", "synthetic"]


@dataclass(frozen=True)
class Example:
    prompt: tuple[dict[str, str], ...]  # chat messages before the answer: {"role", "content"}
    answer: str  # the assistant turn that is trained on
    label: str | None = None  # classification only
    text: str | None = None  # classification only: the input text without instruction
    source: Source = "data"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt"] = list(self.prompt)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Example:
        return cls(prompt=tuple(dict(m) for m in d["prompt"]), answer=d["answer"],
                   label=d.get("label"), text=d.get("text"), source=d.get("source", "data"),
                   meta=d.get("meta") or {})


def classification_example(text: str, label: str, source: Source = "data") -> Example:
    """The user turn is the bare text; the instruction and label list are added at format time."""
    return Example(prompt=({"role": "user", "content": text},), answer=label, label=label,
                   text=text, source=source)


def write_jsonl(path: Path, rows: Iterable[Example]) -> int:
    """Write atomically (temp file + rename) so a crash never leaves half a stage output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_jsonl(path: Path) -> list[Example]:
    with path.open(encoding="utf-8") as f:
        return [Example.from_json(json.loads(line)) for line in f if line.strip()]
