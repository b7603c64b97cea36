"""Single-stream generation: prefill the prompt, then decode one token at a time.

This is the one-request path behind ``fleetlm generate`` and ``fleetlm bench decode``;
the batching engine reuses the same model forward and sampler. The KV cache is
allocated once per generator (one slot, ``max_len`` positions). Attention reads only
the first ``kv_len`` cache positions, rounded up to a multiple of ``KV_BUCKET`` so the
compiled decode step sees few distinct shapes.

With ``compile=True`` the decode step goes through ``torch.compile`` with inductor's
freezing (weights become constants) and max-autotune (dense matmuls get inductor's C++
GEMM templates where they time faster; int8 projections call our own GEMV op). Once a
kv bucket has been compiled, later steps in it skip Dynamo's guard evaluation, which
otherwise costs about a millisecond a step on this model. If compilation fails (no C++
compiler, unsupported op) the generator falls back to eager and says so once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fleetlm.engine.detokenizer import Detokenizer
from fleetlm.engine.sampler import RequestSampler
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.errors import ConfigError
from fleetlm.models.kv_cache import KV_BUCKET, bucket
from fleetlm.models.loader import LoadedModel

log = logging.getLogger(__name__)

# Inductor settings for the decode step. They are applied with config.patch around every
# call that may compile: freezing is read only from the global config (torch.compile's
# options= ignores it). Autotuning's tables go to the log, not the user's terminal.
INDUCTOR_CONFIG = {
    "freezing": True,
    "max_autotune": True,
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}


@dataclass
class GenerationEvent:
    token_id: int
    text: str  # text that became safe to show with this token (may be "")
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last event


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]]]
    prompt_tokens: int
    ttft_s: float  # prompt submitted -> first token sampled
    decode_s: float  # first token -> last token


class Generator:
    def __init__(self, lm: LoadedModel, max_len: int = 2048, compile: bool = False,
                 prefill_chunk: int = 512) -> None:
        cfg = lm.config
        limit = lm.model.rope_cos.shape[0]
        if max_len > limit:
            raise ConfigError(f"max_len={max_len} exceeds the model's {limit} positions")
        self.lm = lm
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.cache = lm.model.allocate_cache(1, bucket(max_len))
        self.slots = None  # one sequence in slot 0: the cache is read through a view
        self.vocab_size = cfg.vocab_size
        self._decode: Callable[..., Tensor] = lm.model.forward
        self._compiled_buckets: set[int] = set()
        self.compiled = False
        if compile:
            import torch._dynamo as dynamo

            # one compiled graph per kv bucket: raise Dynamo's limit so none falls back
            n_buckets = bucket(max_len) // KV_BUCKET
            limit = max(dynamo.config.recompile_limit, n_buckets + 2)
            dynamo.config.recompile_limit = limit
            self._decode = torch.compile(lm.model.forward, dynamic=False, fullgraph=True)
            self.compiled = True

    def _forward_decode(self, ids: Tensor, pos: Tensor, kv_len: int) -> Tensor:
        if self.compiled:
            import torch._inductor.config as inductor_config

            try:
                with inductor_config.patch(INDUCTOR_CONFIG):
                    if kv_len in self._compiled_buckets:
                        # every bucket this call could hit is compiled: evaluate only the
                        # guards that tell the compiled graphs apart
                        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                            return self._decode(ids, pos, self.cache, self.slots, kv_len, None)[:, 0]
                    out = self._decode(ids, pos, self.cache, self.slots, kv_len, None)[:, 0]
                    self._compiled_buckets.add(kv_len)
                    return out
            except Exception as e:  # inductor needs a C++ toolchain; eager always works
                log.warning("torch.compile failed (%s: %s); decoding eagerly", type(e).__name__, e)
                self._decode, self.compiled = self.lm.model.forward, False
        return self.lm.model(ids, pos, self.cache, self.slots, kv_len, None)[:, 0]

    def warmup(self, lengths: tuple[int, ...] = (1,)) -> None:
        """Run (and compile) the decode step for the kv buckets covering ``lengths``.

        Writes a dummy key/value at position ``n - 1`` of the cache, which any later
        request overwrites before reading.
        """
        with torch.inference_mode():
            for n in lengths:
                pos = torch.tensor([[n - 1]])
                for _ in range(2):  # the second call runs the compiled graph once
                    self._forward_decode(torch.zeros(1, 1, dtype=torch.long), pos, bucket(n))

    def warmup_request(self, prompt_len: int, max_tokens: int) -> None:
        """Compile every kv bucket a request of this size can decode in."""
        last = min(prompt_len + max_tokens, self.max_len)
        self.warmup(tuple(range(bucket(prompt_len + 1), bucket(last) + 1, KV_BUCKET)))

    def prefill(self, prompt_ids: list[int]) -> Tensor:
        """Write the prompt into the cache; return the last position's logits [vocab]."""
        n = len(prompt_ids)
        ids = torch.tensor(prompt_ids, dtype=torch.long)[None]
        logits = None
        for start in range(0, n, self.prefill_chunk):
            end = min(n, start + self.prefill_chunk)
            pos = torch.arange(start, end)[None]
            logits = self.lm.model(ids[:, start:end], pos, self.cache, self.slots, bucket(end),
                                   torch.tensor([end - start - 1]))
        assert logits is not None
        return logits[0]

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenerationEvent]:
        """Yield one event per generated token; the last one carries ``finish_reason``."""
        params.validate(self.vocab_size)
        if not prompt_ids:
            raise ConfigError("prompt: must contain at least one token")
        n_prompt = len(prompt_ids)
        if n_prompt >= self.max_len:
            raise ConfigError(
                f"prompt: {n_prompt} tokens leave no room to generate within max_len={self.max_len}"
            )
        max_new = min(params.max_tokens, self.max_len - n_prompt)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.lm.stop_token_ids)
        sampler = RequestSampler(params, self.vocab_size, prompt_ids)
        detok = Detokenizer(self.lm.tokenizer, params.stop)
        with torch.inference_mode():
            logits = self.prefill(prompt_ids)
            pos = n_prompt
            for i in range(max_new):
                s = sampler.sample(logits)
                if s.token_id in stop_ids:
                    yield GenerationEvent(s.token_id, detok.flush(), s.logprob, s.top_logprobs, "stop")
                    return
                text = detok.push(s.token_id)
                if detok.stopped:
                    yield GenerationEvent(s.token_id, text, s.logprob, s.top_logprobs, "stop")
                    return
                if i == max_new - 1:
                    text += detok.flush()
                    reason = "length"
                    yield GenerationEvent(s.token_id, text, s.logprob, s.top_logprobs, reason)
                    return
                yield GenerationEvent(s.token_id, text, s.logprob, s.top_logprobs)
                ids = torch.tensor([[s.token_id]])
                logits = self._forward_decode(ids, torch.tensor([[pos]]), bucket(pos + 1))[0]
                pos += 1

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        t0 = time.perf_counter()
        t_first = None
        text, ids, lps, tops = [], [], [], []
        reason = "length"
        for ev in self.stream(prompt_ids, params):
            if t_first is None:
                t_first = time.perf_counter()
            text.append(ev.text)
            ids.append(ev.token_id)
            lps.append(ev.logprob)
            tops.append(ev.top_logprobs)
            reason = ev.finish_reason or reason
        t1 = time.perf_counter()
        return GenerationResult("".join(text), ids, reason, lps, tops, len(prompt_ids),
                                (t_first or t1) - t0, t1 - (t_first or t1))
