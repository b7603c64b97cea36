"""Routing policies: each turns one request into a score, and one function turns scores into
decisions.

The score convention, used everywhere in fleetlm.router:

    score in [0, 1], HIGHER = the SMALL model is more likely good enough.

    decide(score, threshold) == "small"  iff  score >= threshold, else "large" (escalate).

RouteLLM's routers return the opposite quantity, the "strong win rate" P(large needed | prompt),
and escalate when it is >= their threshold. :func:`score_from_strong_win_rate` is the one place
that converts (``score = 1 - win_rate``); nothing else in fleetlm flips the sign. A threshold
of 0 keeps every request on the small model (even a score of 0.0); a threshold of 1 escalates
everything but a score of exactly 1.0. Thresholds come from data (:mod:`fleetlm.router.calibrate`),
not from intuition, because each policy's scores have their own scale.

Two kinds of policy:

- decide-before-generating (``needs_answer`` False): rules, random, always-*, classifier. The
  request goes straight to the chosen model.
- decide-after-a-small-answer (``needs_answer`` True): confidence. The small model answers first;
  its token log-probabilities give the score. A streaming caller buffers ``buffer_tokens``
  tokens of the small answer (all of it when None), scores them, then either flushes the buffer
  and streams on, or drops it and asks the large model.

This module knows nothing about HTTP, models, upstreams or the config file: policies take plain
arguments, and the server builds them.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

Decision = Literal["small", "large"]


def decide(score: float, threshold: float) -> Decision:
    """THE place a score becomes a decision: ``score >= threshold`` stays on the small model
    (a NaN score escalates)."""
    if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}; "
                         "calibrate one with `fleetlm route calibrate`")
    return "small" if score >= threshold else "large"


@overload
def score_from_strong_win_rate(win_rate: float) -> float: ...
@overload
def score_from_strong_win_rate(win_rate: NDArray[np.float64]) -> NDArray[np.float64]: ...
def score_from_strong_win_rate(win_rate: Any) -> Any:
    """RouteLLM's P(strong model needed) -> fleetlm's score (P(small good enough)); floats or
    numpy arrays. The only sign flip between the two conventions."""
    return 1.0 - win_rate


def flatten_messages(messages: Sequence[Mapping[str, Any]]) -> str:
    """OpenAI chat messages -> one text, ``role: content`` per line.

    List contents (multi-part messages) keep their text parts only. The classifier and the
    rules see this text, so it must be stable: training and serving both use this function.
    """
    lines: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content
                               if isinstance(p, Mapping) and p.get("type", "text") == "text")
        lines.append(f"{m.get('role', 'user')}: {content or ''}")
    return "\n".join(lines)


@dataclass(frozen=True)
class RouteContext:
    """What a policy may look at for one request.

    prompt:          the text the policies score (messages flattened, or a raw completion prompt)
    messages:        the chat messages as sent (empty for /v1/completions)
    token_logprobs:  the small model's answer, one natural-log probability per generated token
                     (for ``needs_answer`` policies; None before generating)
    label_prob:      when the answer was constrained to a list of labels: the probability of
                     the chosen label (the softmax over the labels' sequence probabilities)
    """

    prompt: str
    messages: tuple[Mapping[str, Any], ...] = ()
    token_logprobs: Sequence[float] | None = None
    label_prob: float | None = None

    @classmethod
    def from_messages(cls, messages: Sequence[Mapping[str, Any]], **kw: Any) -> RouteContext:
        return cls(prompt=flatten_messages(messages), messages=tuple(messages), **kw)


@runtime_checkable
class Policy(Protocol):
    """A routing policy. ``score`` must be deterministic for a given context."""

    name: str

    @property
    def needs_answer(self) -> bool:
        """True when ``score`` needs the small model's answer (``token_logprobs``/``label_prob``)."""
        ...

    def score(self, ctx: RouteContext) -> float:
        """In [0, 1]; higher = the small model is more likely good enough."""
        ...


class _BeforeGenerating:
    @property
    def needs_answer(self) -> bool:
        return False


# --- baselines -------------------------------------------------------------------------------


class AlwaysSmall(_BeforeGenerating):
    name = "always-small"

    def score(self, ctx: RouteContext) -> float:
        return 1.0


class AlwaysLarge(_BeforeGenerating):
    """Score 0.0: escalates at any threshold > 0."""

    name = "always-large"

    def score(self, ctx: RouteContext) -> float:
        return 0.0


class RandomPolicy(_BeforeGenerating):
    """A uniform score that depends only on (seed, prompt): the same request always gets the
    same score, so retries route the same way and evaluations are reproducible."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def score(self, ctx: RouteContext) -> float:
        digest = hashlib.blake2b(f"{self.seed}\x00{ctx.prompt}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64  # [0, 1)


# --- rules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One rule: every condition given must hold for it to match (conditions left at their
    defaults are ignored). ``route`` is where a match sends the request.

    regex:      re.search on the prompt (compiled once; flags via inline syntax, e.g. ``(?i)``)
    keywords:   any of these words/phrases occurs in the prompt (case-insensitive substring)
    min_chars:  prompt length >= min_chars
    max_chars:  prompt length <= max_chars
    """

    route: Decision
    regex: str | None = None
    keywords: tuple[str, ...] = ()
    min_chars: int | None = None
    max_chars: int | None = None
    _compiled: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.route not in ("small", "large"):
            problems.append(f"route must be 'small' or 'large', got {self.route!r}")
        if self.regex is None and not self.keywords and self.min_chars is None \
                and self.max_chars is None:
            problems.append("a rule needs at least one of regex, keywords, min_chars, max_chars")
        if self.regex is not None:
            try:
                object.__setattr__(self, "_compiled", re.compile(self.regex))
            except re.error as e:
                problems.append(f"regex {self.regex!r} does not compile: {e}")
        if isinstance(self.keywords, str):
            problems.append("keywords must be a list of strings, not one string")
        else:
            object.__setattr__(self, "keywords", tuple(k.lower() for k in self.keywords))
        for name in ("min_chars", "max_chars"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                problems.append(f"{name} must be a non-negative integer, got {v!r}")
        if problems:
            raise ValueError("invalid routing rule: " + "; ".join(problems))

    def matches(self, prompt: str) -> bool:
        if self.min_chars is not None and len(prompt) < self.min_chars:
            return False
        if self.max_chars is not None and len(prompt) > self.max_chars:
            return False
        if self._compiled is not None and self._compiled.search(prompt) is None:
            return False
        if self.keywords:
            low = prompt.lower()
            if not any(k in low for k in self.keywords):
                return False
        return True


class RulesPolicy(_BeforeGenerating):
    """Ordered rules; the first that matches decides (score 1.0 = small, 0.0 = large).
    ``default`` applies when none matches. Use with a threshold in (0, 1]."""

    name = "rules"

    def __init__(self, rules: Sequence[Rule], default: Decision = "small") -> None:
        if default not in ("small", "large"):
            raise ValueError(f"default must be 'small' or 'large', got {default!r}")
        self.rules = tuple(rules)
        self.default: Decision = default

    def match(self, prompt: str) -> Rule | None:
        """The first rule that matches, None when the default applies."""
        return next((r for r in self.rules if r.matches(prompt)), None)

    def score(self, ctx: RouteContext) -> float:
        rule = self.match(ctx.prompt)
        route = rule.route if rule is not None else self.default
        return 1.0 if route == "small" else 0.0


# --- confidence ------------------------------------------------------------------------------


class ConfidencePolicy:
    """Score = how sure the small model was of its own answer.

    - with ``label_prob`` (output constrained to labels): that probability;
    - else from the answer's token log-probabilities, over the first ``buffer_tokens`` tokens
      (all when None): ``aggregate="mean"`` gives the geometric-mean token probability
      exp(mean logprob); ``"min"`` the least likely token's probability exp(min logprob).
    """

    name = "confidence"

    def __init__(self, aggregate: Literal["mean", "min"] = "mean",
                 buffer_tokens: int | None = None) -> None:
        if aggregate not in ("mean", "min"):
            raise ValueError(f"aggregate must be 'mean' or 'min', got {aggregate!r}")
        if buffer_tokens is not None and buffer_tokens < 1:
            raise ValueError(f"buffer_tokens must be >= 1 or None (whole answer), "
                             f"got {buffer_tokens!r}")
        self.aggregate = aggregate
        self.buffer_tokens = buffer_tokens

    @property
    def needs_answer(self) -> bool:
        return True

    def score(self, ctx: RouteContext) -> float:
        if ctx.label_prob is not None:
            return min(1.0, max(0.0, float(ctx.label_prob)))
        if ctx.token_logprobs is None:
            raise ValueError("the confidence policy needs the small model's answer: "
                             "pass token_logprobs or label_prob in the RouteContext")
        lps = list(ctx.token_logprobs)
        if self.buffer_tokens is not None:
            lps = lps[: self.buffer_tokens]
        if not lps:  # an empty answer says nothing good about the small model
            return 0.0
        agg = sum(lps) / len(lps) if self.aggregate == "mean" else min(lps)
        return min(1.0, math.exp(min(0.0, agg)))


# --- classifier ------------------------------------------------------------------------------


class PromptScorer(Protocol):
    """What the classifier policy needs of a trained router
    (:class:`fleetlm.router.classifier.TrainedRouter` is one): a prompt's score in [0, 1]."""

    def score(self, prompt: str) -> float: ...


class ClassifierPolicy(_BeforeGenerating):
    """A router trained on past outcomes (:mod:`fleetlm.router.classifier`) scores the prompt
    before anything is generated."""

    name = "classifier"

    def __init__(self, router: PromptScorer) -> None:
        self.router = router

    def score(self, ctx: RouteContext) -> float:
        return self.router.score(ctx.prompt)


POLICY_NAMES = ("confidence", "classifier", "rules", "random", "always-small", "always-large")
