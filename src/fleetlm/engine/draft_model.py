"""Speculative decoding with a small draft model: the draft proposes, the served model checks.

A draft model shares the served model's tokenizer (SmolLM2-135M for SmolLM2-360M or -1.7B,
one Qwen2.5 size for a larger one) and is several times cheaper per token. For each
sequence that speculates, the draft catches up on the tokens it has not seen yet, then
decodes ``k`` greedy tokens on its own; the engine checks them all in one forward of the
served model (engine/speculative.py's ``accept``), so the output is exactly plain greedy
decoding's whatever the draft proposes. The served model's adapters apply to the check; the
draft runs without them (it only has to guess well).

The draft keeps a KV cache per sequence, for at most ``max_sequences`` sequences at once
(least recently used first out: a sequence that loses its cache catches up on its whole
history when it next speculates). Each cache is the draft model's own, one row, so the
draft's one-token steps can run its compiled decode graph. After a check the cache holds
keys and values for tokens the served model may have rejected; the next catch-up starts
at the longest prefix the draft's tokens share with the sequence's history and overwrites
the rest.

This module knows the model's forward and KV cache, nothing about scheduling.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fleetlm.errors import ConfigError
from fleetlm.models.loader import LoadedModel


def check_compatible(target: LoadedModel, draft: LoadedModel) -> None:
    """Raise ConfigError unless ``draft`` can propose tokens for ``target``: the same
    vocabulary (token ids must mean the same text)."""
    if target.tokenizer is None or draft.tokenizer is None:
        raise ConfigError("draft model: both models need their tokenizers to compare "
                          "vocabularies (load them with_tokenizer=True)")
    tv, dv = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if tv != dv:
        differ = sorted(set(tv.items()) ^ set(dv.items()))[:3]
        raise ConfigError(
            f"draft model {draft.name!r} does not share the tokenizer of {target.name!r} "
            f"({len(dv)} against {len(tv)} tokens; first differences {differ}): pick a "
            "draft from the same model family (e.g. SmolLM2-135M for SmolLM2-360M)")


@dataclass
class _Cache:
    kv: Any  # the draft model's KVCache, one row
    tokens: list[int] = field(default_factory=list)  # whose keys/values it holds, in order


class DraftModel:
    """Greedy draft tokens from a small model for the engine's speculating sequences."""

    def __init__(self, lm: LoadedModel, max_len: int, max_sequences: int = 4,
                 compile: bool = False) -> None:
        if max_sequences < 1:
            raise ConfigError(f"draft model: max_sequences={max_sequences} must be >= 1")
        limit = lm.model.rope_cos.shape[0]
        if max_len > limit:
            raise ConfigError(f"draft model {lm.name!r} handles {limit} positions, fewer than "
                              f"the engine's max_len={max_len}: lower max_len")
        self.lm = lm
        self.max_len = max_len
        self.max_sequences = max_sequences
        self._caches: OrderedDict[str, _Cache] = OrderedDict()
        self.proposed = 0  # draft tokens proposed (for benchmarks and logs)
        if compile and not lm.model.decode_compiled:
            lm.model.compile_decode()

    def forget(self, seq_id: str) -> None:
        """Drop a finished sequence's cache (the engine calls it for every ended request)."""
        self._caches.pop(seq_id, None)

    def _cache(self, seq_id: str) -> _Cache:
        cache = self._caches.get(seq_id)
        if cache is None:
            if len(self._caches) >= self.max_sequences:
                self._caches.popitem(last=False)  # least recently used
            cache = _Cache(self.lm.model.allocate_cache(1, self.max_len))
            self._caches[seq_id] = cache
        self._caches.move_to_end(seq_id)
        return cache

    def _next(self, cache: _Cache, tokens: Sequence[int], start: int, vocab: int) -> int:
        """Feed ``tokens`` at positions start.. into the cache; the argmax after the last."""
        n = len(tokens)
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        positions = torch.arange(start, start + n, dtype=torch.long)[None]
        logits = self.lm.model(ids, positions, cache.kv, None, start + n,
                               logits_index=torch.tensor([n - 1]))
        del cache.tokens[start:]
        cache.tokens.extend(tokens)
        return int(logits[0, :vocab].argmax())

    @torch.inference_mode()
    def propose(self, seq_id: str, history: Sequence[int], k: int, vocab: int) -> list[int]:
        """Up to ``k`` greedy draft tokens to follow ``history`` (prompt + generated tokens),
        ids below ``vocab`` (the served model's); [] when ``history`` is too long."""
        if k < 1 or not history or len(history) + k > self.max_len:
            return []
        cache = self._cache(seq_id)
        common = 0
        for a, b in zip(cache.tokens, history, strict=False):
            if a != b:
                break
            common += 1
        start = min(common, len(history) - 1)  # the last token is fed again for its logits
        token = self._next(cache, history[start:], start, vocab)
        drafts = [token]
        while len(drafts) < k:
            token = self._next(cache, [token], len(history) + len(drafts) - 1, vocab)
            drafts.append(token)
        self.proposed += len(drafts)
        return drafts
