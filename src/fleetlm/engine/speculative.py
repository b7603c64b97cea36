"""Speculative decoding by prompt lookup: draft tokens from the sequence's own context.

Extraction, rewriting and question answering over a document copy long spans of the prompt
into the answer. Prompt lookup (n-gram drafting) finds the last few tokens of a sequence
earlier in its context (prompt + generated tokens) and proposes the tokens that followed
them there; one forward over ``[last token, draft...]`` then checks them all at once, and the
greedy tokens the model agrees with are emitted together (plus the model's own next token).
A decode step reads every weight once whatever the number of tokens it checks, so on a CPU
an accepted draft token costs little.

Only plain greedy requests speculate (no logprobs, penalties or grammar): their output is the
argmax at each position, which the check computes exactly, so the text is the one plain
decoding gives. A request whose drafts keep being rejected stops drafting (see
:class:`DraftStats`). This module is plain Python over token lists plus one argmax; the
engine decides when to speculate and runs the check as a chunk through its prefill path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor


def propose(history: Sequence[int], k: int, ngram_max: int = 3, ngram_min: int = 1,
            window: int = 4096) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest
    suffix n-gram (``ngram_max`` down to ``ngram_min`` tokens) of ``history``; [] if none.
    Only the last ``window`` tokens are searched."""
    n_hist = len(history)
    if k < 1 or n_hist < 2:
        return []
    lo = max(0, n_hist - window)
    for n in range(min(ngram_max, n_hist - 1), ngram_min - 1, -1):
        tail = list(history[n_hist - n:])
        # the most recent match that is not the suffix itself
        for start in range(n_hist - n - 1, lo - 1, -1):
            if history[start] == tail[0] and list(history[start:start + n]) == tail:
                follow = list(history[start + n: start + n + k])
                if follow:
                    return follow
                break
    return []


def accept(draft: Sequence[int], logits: Tensor, vocab: int) -> list[int]:
    """The greedy tokens to emit after checking ``draft`` against ``logits`` [len(draft)+1, V]
    (the logits at the last token and at each draft token): the draft tokens the model's
    argmax agrees with, in order, then the argmax where it first disagrees (or after the
    whole draft). Always at least one token."""
    best = logits[: len(draft) + 1, :vocab].argmax(-1).tolist()
    out = []
    for i, token in enumerate(best):
        out.append(token)
        if i == len(draft) or token != draft[i]:
            break
    return out


@dataclass
class DraftStats:
    """One request's drafting record: it stops drafting once, after ``patience`` proposed
    tokens, fewer than ``min_rate`` of them were accepted (a verify step runs eagerly and
    costs more than a plain compiled decode step, so rejected drafts are a loss)."""

    proposed: int = 0
    accepted: int = 0
    patience: int = 16
    min_rate: float = 0.25

    @property
    def enabled(self) -> bool:
        return self.proposed < self.patience or self.accepted >= self.min_rate * self.proposed

    def record(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
