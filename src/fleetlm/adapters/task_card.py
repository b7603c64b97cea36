"""The task card of a tuned adapter: how it was prompted in training, so it is served alike.

``fleetlm tune`` writes ``fleetlm_task.json`` (:data:`TASK_FILE`, made by :func:`task_card`)
into the adapter folder it publishes; a server or router reads it back with
:func:`read_task_card` and builds the same chat messages with :func:`task_messages` that
training built. The prompt a tuned adapter sees in training is the prompt it must be sent
at serving time, so both sides call this module.

This module knows the card's JSON and the prompt's wording. It does not know tuning's
config or row types (anything with the fields of :class:`TaskLike` and :class:`RowLike`
will do: tune's ``TaskConfig`` and ``Example`` have them), the chat template, or the engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fleetlm.errors import ConfigError

TASK_FILE = "fleetlm_task.json"


class TaskLike(Protocol):
    """What the prompt needs of a task (tune's ``TaskConfig`` has it)."""

    @property
    def type(self) -> str: ...  # "classification" | "completion" | "chat"

    @property
    def system_prompt(self) -> str | None: ...

    @property
    def instruction(self) -> str: ...  # classification: put before the text


class RowLike(Protocol):
    """What the prompt needs of a row (tune's ``Example`` has it)."""

    @property
    def prompt(self) -> Sequence[Mapping[str, str]]: ...  # chat messages before the answer

    @property
    def answer(self) -> str: ...

    @property
    def text(self) -> str | None: ...  # classification: the input text, no instruction


@dataclass(frozen=True)
class Task:
    """A classification task as its card describes it."""

    type: str
    system_prompt: str | None
    instruction: str
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Row:
    """A row to prompt with, for callers without training rows (a served request's text)."""

    text: str | None = None
    prompt: tuple[Mapping[str, str], ...] = ()
    answer: str = ""


def classification_user_turn(text: str, task: TaskLike, labels: Sequence[str] | None = None) -> str:
    """The user message of a classification prompt; ``labels`` are listed for an untuned
    model (zero- and few-shot), a tuned adapter has learned them."""
    head = task.instruction
    if labels is not None:
        head = (head + "\n" if head else "") + "Labels: " + ", ".join(labels)
    return f"{head}\n\nText: {text}" if head else text


def task_messages(example: RowLike, task: TaskLike, *, labels: Sequence[str] | None = None,
                  shots: Sequence[RowLike] = ()) -> list[dict[str, str]]:
    """The chat messages before the answer; ``shots`` become earlier user/assistant turns."""
    msgs: list[dict[str, str]] = []
    if task.system_prompt:
        msgs.append({"role": "system", "content": task.system_prompt})
    for i, ex in enumerate((*shots, example)):
        if task.type == "classification":
            assert ex.text is not None, "classification rows carry their text"
            shown = labels if i == 0 else None  # the label list once, in the first turn
            turn = [{"role": "user", "content": classification_user_turn(ex.text, task, shown)}]
        else:
            turn = [dict(m) for m in ex.prompt if m["role"] != "system" or not task.system_prompt]
        msgs.extend(turn)
        if ex is not example:
            msgs.append({"role": "assistant", "content": ex.answer})
    return msgs


def task_card(task: TaskLike, labels: Sequence[str] | None) -> dict[str, Any]:
    """What a server needs to prompt the adapter as it was trained (``fleetlm_task.json``)."""
    return {"type": task.type, "system_prompt": task.system_prompt,
            "instruction": task.instruction if task.type == "classification" else None,
            "labels": list(labels) if labels is not None else None,
            "user_turn": ("{instruction}\n\nText: {text}" if task.instruction else "{text}")
            if task.type == "classification" else None}


def read_task_card(folder: Path) -> tuple[Task, list[str]]:
    """The classification task an adapter was tuned for, rebuilt from its
    ``fleetlm_task.json``, and its labels. Rebuilding the card must give the file back, else
    the prompts would not be those of training."""
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: the adapter was not published by "
                          "`fleetlm tune`, so how it was prompted is unknown")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{path} is not JSON ({e}); re-publish the adapter with "
                          "`fleetlm tune`") from None
    labels = card.get("labels") if isinstance(card, dict) else None
    if not isinstance(card, dict) or card.get("type") != "classification" or not labels:
        kind = card.get("type") if isinstance(card, dict) else None
        raise ConfigError(f"{path}: a classification adapter with its labels is needed, got "
                          f"type {kind!r}")
    bad = [k for k in ("system_prompt", "instruction")
           if card.get(k) is not None and not isinstance(card[k], str)]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        bad.append("labels")
    if bad:
        raise ConfigError(f"{path}: {', '.join(bad)} must be text (labels: a list of texts); "
                          "re-publish the adapter with `fleetlm tune`")
    task = Task(type="classification", system_prompt=card.get("system_prompt"),
                instruction=card.get("instruction") or "", labels=tuple(labels))
    rebuilt = task_card(task, labels)
    differs = [k for k in ("system_prompt", "instruction", "user_turn") if rebuilt[k] != card.get(k)]
    if differs:
        raise ConfigError(f"{path}: {', '.join(differs)} cannot be rebuilt by this fleetlm's "
                          f"prompt format; re-publish the adapter with `fleetlm tune`")
    return task, list(labels)
