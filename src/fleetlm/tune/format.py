"""Rows -> chat messages -> token ids with a loss mask (answer tokens only).

The prompt a tuned adapter sees in training is the prompt it must be sent at serving
time: the messages come from :mod:`fleetlm.adapters.task_card` (:func:`task_messages`,
which the server calls too, and the ``fleetlm_task.json`` card the adapter folder carries),
and the token ids from :func:`fleetlm.models.chat.chat_ids`, the one chat-template
renderer. The task-card names are re-exported here for tuning's own modules, and
:func:`read_task_card` gives the card back as tuning's :class:`TaskConfig`.

This module knows the chat template's output (through ``chat_ids``) and nothing of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetlm.adapters import task_card as card
from fleetlm.adapters.task_card import TASK_FILE, classification_user_turn, task_card, task_messages
from fleetlm.errors import ConfigError
from fleetlm.models.chat import chat_ids
from fleetlm.tune.config import TaskConfig
from fleetlm.tune.records import Example

__all__ = ["TASK_FILE", "Encoded", "classification_user_turn", "encode", "prompt_ids",
           "read_task_card", "task_card", "task_messages"]


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids, the assistant turn opened for the answer."""
    return chat_ids(tokenizer, messages)


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
    full = chat_ids(tokenizer, msgs + [{"role": "assistant", "content": example.answer}],
                    add_generation_prompt=False)
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


def read_task_card(folder: Path) -> tuple[TaskConfig, list[str]]:
    """The classification task an adapter was tuned for (its ``fleetlm_task.json``, read by
    :func:`fleetlm.adapters.task_card.read_task_card`) as a :class:`TaskConfig`, and its
    labels."""
    task, labels = card.read_task_card(folder)
    return TaskConfig(type="classification", system_prompt=task.system_prompt,
                      instruction=task.instruction, labels=list(labels)), labels
