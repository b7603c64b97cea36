"""Logits -> next token: penalties, temperature, top-k, top-p, min-p, seeded sampling.

The mask functions work on [B, V] float logits and are pure, so tests can check them
on hand-made numbers. :class:`RequestSampler` holds one request's state (token
counts for penalties, its own ``torch.Generator``, and for ``response_format`` a
:class:`~fleetlm.engine.structured.TokenConstraint` whose mask is applied first), so a
seeded request reproduces whatever else runs beside it. The sampler knows nothing about
text; the constraint alone reads the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.structured import TokenConstraint

NEG_INF = float("-inf")


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (ties at the boundary kept), mask the rest."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # a token is dropped when the tokens ranked above it already reach p
    before = probs.cumsum(-1) - probs
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = probs.amax(-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """HF/CTRL rule: for seen tokens, divide positive logits and multiply negative ones."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI rule: logit -= presence * [count > 0] + frequency * count (output tokens)."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None  # log-probability of the chosen token under the model
    top_logprobs: list[tuple[int, float]]  # (token id, logprob), most likely first
    # with a structured-output constraint: the chosen token's log-probability among the
    # tokens the constraint allowed (the model's distribution renormalised over them). Summed
    # over an answer constrained to a list of labels, it is the log-probability of the chosen
    # label among the labels -- what the router's confidence policy scores.
    constrained_logprob: float | None = None


class RequestSampler:
    """One request's sampling state: penalties' token counts and its random generator.

    Reported log-probabilities are those of the model's own distribution (before
    penalties, temperature, truncation and the structured-output mask), so they measure
    the model's confidence. ``tokenizer`` is needed only for ``response_format``.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int],
                 device: torch.device | str = "cpu", tokenizer: Any = None) -> None:
        self.params = params
        self.vocab_size = vocab_size
        # compiled here, in the submitting thread: a bad schema raises ConfigError there
        self.constraint: TokenConstraint | None = None
        if params.constrained:
            assert params.response_format is not None
            self.constraint = TokenConstraint(params.response_format, tokenizer, vocab_size)
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        needs_counts = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device) if needs_counts else None
        self.seen: Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids:
                self.seen[torch.tensor(prompt_ids, device=device)] = True

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to track, mask or report: the token is just the argmax."""
        return (self.params.greedy and self.counts is None and self.seen is None
                and self.params.logprobs is None and self.constraint is None)

    @property
    def finished(self) -> bool:
        """The structured-output grammar is complete: the request should stop."""
        return self.constraint is not None and self.constraint.is_finished

    def observe(self, token_id: int) -> None:
        if self.constraint is not None:
            self.constraint.advance(token_id)
        if self.counts is not None:
            self.counts[token_id] += 1
        if self.seen is not None:
            self.seen[token_id] = True

    def process(self, logits: Tensor) -> Tensor:
        """Penalised, tempered, truncated logits [V] (float32) ready to sample from."""
        p = self.params
        x = logits
        if self.seen is not None:
            x = apply_repetition_penalty(x, self.seen, p.repetition_penalty)
        if self.counts is not None:
            x = apply_presence_frequency(x, self.counts, p.presence_penalty, p.frequency_penalty)
        if p.greedy:
            return x
        # shift so the top logit is 0 first: dividing by a tiny temperature then gives
        # -inf for the rest rather than +inf (whose softmax is nan)
        x = (x - x.max()) / p.temperature
        x = apply_top_k(x, p.top_k)
        x = apply_top_p(x, p.top_p)
        return apply_min_p(x, p.min_p)

    def sample(self, logits: Tensor) -> SampleResult:
        """Choose the next token from one row of logits [V]."""
        logits = logits[: self.vocab_size].float()
        masked = logits if self.constraint is None else self.constraint.apply(logits)
        x = self.process(masked)
        if self.params.greedy:
            token = int(torch.argmax(x))
        else:
            probs = torch.softmax(x, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.observe(token)
        if self.params.logprobs is None:
            return SampleResult(token, None, [])
        logp = torch.log_softmax(logits, dim=-1)
        top: list[tuple[int, float]] = []
        if self.params.logprobs > 0:
            vals, idx = torch.topk(logp, self.params.logprobs)
            top = list(zip(idx.tolist(), vals.tolist(), strict=True))
        constrained = None
        if self.constraint is not None:
            constrained = float(torch.log_softmax(masked, dim=-1)[token])
        return SampleResult(token, float(logp[token]), top, constrained)
