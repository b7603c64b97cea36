"""Rows -> chat messages -> token ids with a loss mask (answer tokens only).

The prompt a tuned adapter sees in training is the prompt it must be sent at serving
time; :func:`task_messages` builds it for both, and the adapter folder carries the task
(``fleetlm_task.json``, see :func:`task_card`) so a server or router can rebuild it.

This module knows the chat template (through the tokenizer) and nothing of training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetlm.errors import ConfigError
from fleetlm.tune.config import TaskConfig
from fleetlm.tune.records import Example

TASK_FILE = "fleetlm_task.json"


def classification_user_turn(text: str, task: TaskConfig, labels: Sequence[str] | None = None) -> str:
    """The user message of a classification prompt; ``labels`` are listed for an untuned
    model (zero- and few-shot), a tuned adapter has learned them."""
    head = task.instruction
    if labels is not None:
        head = (head + "\n" if head else "") + "Labels: " + ", ".join(labels)
    return f"{head}\n\nText: {text}" if head else text


def task_messages(example: Example, task: TaskConfig, *, labels: Sequence[str] | None = None,
                  shots: Sequence[Example] = ()) -> list[dict[str, str]]:
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


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    answer_start: int  # tokens before it are prompt (no loss); from it on, the answer + EOS

    @property
    def num_answer_tokens(self) -> int:
        return len(self.input_ids) - self.answer_start


def encode(tokenizer: Any, example: Example, task: TaskConfig) -> Encoded:
    """Prompt (chat template, generation prompt) + answer + the template's end-of-turn token.

    Anything the template writes after the end-of-turn token (a newline) is dropped: the
    model must learn to stop, not to write the next turn's separator."""
    msgs = task_messages(example, task)
    prompt = prompt_ids(tokenizer, msgs)
    full_out = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": example.answer}],
                                             tokenize=True)
    full = list(full_out["input_ids"] if hasattr(full_out, "keys") else full_out)
    if full[: len(prompt)] != prompt:
        raise ConfigError("task: the model's chat template renders the prompt differently with "
                          "and without the answer, so the answer tokens cannot be found; use a "
                          "model whose template appends the assistant turn")
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    answer = full[len(prompt):]
    if end is not None and end in answer:
        answer = answer[: answer.index(end) + 1]
    elif end is not None:
        answer = answer + [end]
    return Encoded(prompt + answer, len(prompt))


def task_card(task: TaskConfig, labels: Sequence[str] | None) -> dict[str, Any]:
    """What a server needs to prompt the adapter as it was trained (``fleetlm_task.json``)."""
    return {"type": task.type, "system_prompt": task.system_prompt,
            "instruction": task.instruction if task.type == "classification" else None,
            "labels": list(labels) if labels is not None else None,
            "user_turn": ("{instruction}\n\nText: {text}" if task.instruction else "{text}")
            if task.type == "classification" else None}


def read_task_card(folder: Path) -> tuple[TaskConfig, list[str]]:
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
    task = TaskConfig(type="classification", system_prompt=card.get("system_prompt"),
                      instruction=card.get("instruction") or "", labels=list(labels))
    rebuilt = task_card(task, labels)
    differs = [k for k in ("system_prompt", "instruction", "user_turn") if rebuilt[k] != card.get(k)]
    if differs:
        raise ConfigError(f"{path}: {', '.join(differs)} cannot be rebuilt by this fleetlm's "
                          f"prompt format; re-publish the adapter with `fleetlm tune`")
    return task, list(labels)
