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
decoding gives. Each request's draft length adapts to what it accepts, and a request whose
drafts are rejected pauses drafting for longer and longer (see :class:`DraftStats`). This
module is plain Python over token lists plus one argmax; the engine decides when to
speculate and runs the check as a chunk through its prefill path.
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
    """One request's drafting control: how long its next draft may be, and whether it drafts
    at all this step. A check of d draft tokens costs about as much as 1 + 0.3 d plain steps
    (docs/benchmarks.md), so a rejected draft is a loss and a long one a bigger loss.

    *Length*: +2 after a check that accepted its whole draft, -1 (at least 1) after one
    that did not (the heuristic of transformers' assisted generation).
    *Pauses*: a check that accepts nothing pauses drafting for 1, 2, 4, ... up to
    ``max_pause`` decode steps, doubling with each such check in a row; any accepted token
    ends the streak. A request that does not copy pays one short check now and then, and
    one that starts copying later (a quoted passage, a list it repeats) drafts again within
    ``max_pause`` steps, where stopping for good would miss it."""

    max_pause: int = 16
    proposed: int = 0
    accepted: int = 0
    length: int | None = None  # the next draft's most tokens; None: the engine's maximum
    misses: int = 0  # checks in a row that accepted nothing
    wait: int = 0  # decode steps left before the next draft

    def room(self, k: int) -> int:
        """At most this many draft tokens now, with ``k`` the engine's maximum."""
        return k if self.length is None else min(k, self.length)

    def ready(self) -> bool:
        """Whether to draft at this decode step; call once per step that could draft (a
        paused request counts its step down)."""
        if self.wait > 0:
            self.wait -= 1
            return False
        return True

    def record(self, proposed: int, accepted: int, k: int) -> None:
        """A check of ``proposed`` draft tokens accepted ``accepted``; ``k``: the maximum."""
        self.proposed += proposed
        self.accepted += accepted
        length = self.room(k)
        self.length = min(k, length + 2) if accepted >= proposed else max(1, length - 1)
        if accepted == 0:
            self.misses += 1
            self.wait = min(self.max_pause, 1 << min(self.misses - 1, 30))
        else:
            self.misses = 0
