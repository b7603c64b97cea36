"""Chat messages -> prompt token ids, through the model's own chat template.

The one place a chat prompt is rendered: serving (``/v1/chat/completions``), ``fleetlm
generate --chat`` and tuning (:mod:`fleetlm.tune.format`) all call :func:`chat_ids`, so an
adapter is served the prompt it was trained on. This module knows the tokenizer's template
and nothing of requests or training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fleetlm.errors import ConfigError


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
             add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` ({"role", "content"} each) rendered by the tokenizer's chat
    template; with ``add_generation_prompt`` the assistant turn is opened for the answer.
    A tokenizer without a template is a ConfigError on ``messages``."""
    if not has_chat_template(tokenizer):
        raise ConfigError("messages: the model's tokenizer has no chat template; send a plain "
                          "prompt instead", param="messages")
    out = tokenizer.apply_chat_template([dict(m) for m in messages],
                                        add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    # transformers returns a BatchEncoding from some tokenizers, a plain list from others
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]
