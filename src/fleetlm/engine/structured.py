"""Structured output: a per-request token mask that keeps generation inside a JSON schema.

OpenAI's ``response_format`` (``json_object`` or ``json_schema``), or fleetlm's
``{"type": "choice", "choices": [...]}`` (the output is exactly one of the strings, e.g. a
classifier's labels), is compiled by llguidance into a grammar over the model's own tokens. Each step the sampler asks the
:class:`TokenConstraint` which tokens may come next and sets the others' logits to
-inf, so the output is valid by construction -- nothing is ever retried. When the
grammar is complete only EOS is allowed, and :attr:`TokenConstraint.is_finished` tells
the engine to stop the request with finish_reason "stop".

This module knows the tokenizer (llguidance needs every token's bytes) but nothing of
batching or the model: it turns one request's response_format into a mask [V].
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fleetlm.errors import ConfigError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)

# compact JSON: no free whitespace, so a small model cannot loop on newlines
# between fields (its only way out would be max_tokens)
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}

_adapters: dict[tuple[int, int], tuple[Any, Any]] = {}  # (id(hf tok), V) -> (hf tok, LLTokenizer)
_adapters_lock = threading.Lock()


def schema_of(response_format: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a response_format asks for (``{"type": "object"}`` for
    json_object), or None for ``{"type": "text"}``. Assumes the shape was validated
    by :meth:`SamplingParams.validate`."""
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format["json_schema"]
        schema = spec.get("schema")
        return {"type": "object"} if schema is None else dict(schema)
    return None


def choice_grammar(choices: list[str]) -> str:
    """A lark grammar accepting exactly one of ``choices`` (JSON string literals are valid
    lark string literals, escapes included)."""
    return "start: " + " | ".join(json.dumps(c) for c in dict.fromkeys(choices)) + "\n"


def _llg_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's view of a Hugging Face tokenizer; building one takes ~0.4 s, so it is
    cached per tokenizer object (the tokenizer is kept alive so its id stays unique)."""
    import llguidance.hf

    key = (id(tokenizer), vocab_size)
    with _adapters_lock:
        hit = _adapters.get(key)
        if hit is None:
            try:
                llt = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
            except ValueError as e:  # a slow (Python) tokenizer
                raise ConfigError(f"response_format: needs a fast Hugging Face tokenizer, "
                                  f"and this model has {type(tokenizer).__name__} ({e})",
                                  param="response_format") from e
            hit = (tokenizer, llt)
            _adapters[key] = hit
        return hit[1]


class TokenConstraint:
    """One request's grammar state: which tokens may come next, advanced token by token.

    ``allowed_mask`` -> bool [V]; ``advance(token)`` after each chosen token;
    ``is_finished`` once the JSON value is complete (or the matcher has failed).
    """

    def __init__(self, response_format: dict[str, Any], tokenizer: Any, vocab_size: int) -> None:
        import llguidance

        if tokenizer is None:
            raise ConfigError("response_format: constrained decoding needs a tokenizer, "
                              "and this model has none", param="response_format")
        try:
            if response_format.get("type") == "choice":
                grammar = llguidance.LLMatcher.grammar_from_lark(choice_grammar(
                    response_format["choices"]))
            else:
                schema = schema_of(response_format)
                if schema is None:
                    raise ConfigError("response_format: type 'text' needs no constraint",
                                      param="response_format")
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    json.dumps(schema), overrides=_JSON_OPTIONS)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"response_format: the grammar cannot be built ({e})",
                              param="response_format") from e
        llt = _llg_tokenizer(tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.matcher = llguidance.LLMatcher(llt, grammar, log_level=0)
        if self.matcher.is_error():
            raise ConfigError(f"response_format: cannot be compiled: {self.matcher.get_error()}",
                              param="response_format")
        # llguidance writes one bit per token into int32 words; unpacked per step
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed_mask(self) -> Tensor:
        """bool [V]: True for the tokens the grammar accepts next (EOS once complete)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        # int32 words are little-endian, token i is bit i % 32 of word i // 32
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.view(np.bool_))

    def apply(self, logits: Tensor) -> Tensor:
        """logits [V] with the disallowed tokens set to -inf (a new tensor)."""
        mask = self.allowed_mask().to(logits.device, non_blocking=True)
        return logits.masked_fill(~mask, float("-inf"))

    def advance(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            # only a token outside the mask gets here; the request then ends
            log.warning("structured output: token %d rejected: %s", token_id,
                        self.matcher.get_error())

    @property
    def is_finished(self) -> bool:
        """The grammar takes no more tokens (complete, or failed): stop the request."""
        return bool(self.matcher.is_stopped())
