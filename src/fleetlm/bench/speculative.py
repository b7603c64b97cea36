"""``fleetlm bench speculative``: single-stream decode with and without prompt-lookup drafts.

An extraction-style request -- the chat template around "copy the key sentences of this
passage" and a window of the reference text -- is answered greedily by an in-process engine
with ``fleetlm serve``'s defaults (weights, compilation), first without speculation, then
with ``--speculative-tokens`` drafts per step. Reported: decode tokens/s of each (first token
to last, median over requests), the ratio (the issue's target: >= 1.5x), the share of drafted
tokens accepted, and whether the two runs' tokens are identical (they must be).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleetlm.bench.common import (
    REFERENCE_TEXT,
    environment,
    fleetlm_settings,
    median,
    run_one,
    write_json,
)
from fleetlm.config import StrictModel

INSTRUCTION = "Copy the following passage word for word, without changing anything:\n\n"


class SpecBenchConfig(StrictModel):
    model: str = "smollm2-135m"
    dtype: str = "auto"
    quantize: str = "auto"
    compile: bool = True
    speculative_tokens: int = 6
    draft_model: str | None = None  # a third run: prompt lookup, then this draft model
    passage_words: int = 80
    requests: int = 4
    max_new_tokens: int = 96

    def check(self) -> None:
        from fleetlm.errors import ConfigError

        bad = [f"{k}={getattr(self, k)}: must be >= 1" for k in
               ("speculative_tokens", "passage_words", "requests", "max_new_tokens")
               if getattr(self, k) < 1]
        if bad:
            raise ConfigError("bench speculative: " + "; ".join(bad))


def _prompts(tokenizer: Any, cfg: SpecBenchConfig) -> list[list[int]]:
    from fleetlm.models.chat import chat_ids

    words = REFERENCE_TEXT.split()
    out = []
    for i in range(cfg.requests):
        start = (i * 37) % max(1, len(words) - cfg.passage_words)
        passage = " ".join(words[start:start + cfg.passage_words])
        out.append(chat_ids(tokenizer, [{"role": "user", "content": INSTRUCTION + passage}]))
    return out


def _one(engine: Any, prompt: list[int], max_new: int) -> tuple[float, list[int]]:
    """(decode tokens/s from the first token to the last, tokens) of one greedy request."""
    from fleetlm.engine.sampling_params import SamplingParams

    stamps, tokens = run_one(engine, prompt, SamplingParams(max_tokens=max_new, temperature=0.0))
    times = stamps[1:]  # token arrivals
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return rate, tokens


def run(cfg: SpecBenchConfig, out: Path | None) -> dict[str, Any]:
    from rich.console import Console

    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model

    cfg.check()
    console = Console(stderr=True)
    lm = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize)
    prompts = _prompts(lm.tokenizer, cfg)
    max_len = max(len(p) for p in prompts) + cfg.max_new_tokens + 1
    results: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "environment": environment()}
    runs: dict[str, dict[str, Any]] = {}
    tokens: dict[str, list[list[int]]] = {}
    draft = (load_model(cfg.draft_model, dtype=cfg.dtype, quantize=cfg.quantize)
             if cfg.draft_model else None)
    runs_of: list[tuple[str, int, Any]] = [("plain", 0, None),
                                           ("speculative", cfg.speculative_tokens, None)]
    if draft is not None:
        runs_of.append(("draft_model", cfg.speculative_tokens, draft))
    for label, k, d in runs_of:
        engine = Engine(lm, EngineConfig(max_running=1, max_len=max_len, max_hot_adapters=0,
                                         compile=cfg.compile, speculative_tokens=k,
                                         prefix_cache_bytes=0), draft=d)
        engine.warmup()
        _one(engine, prompts[0], 8)  # warm-up
        proposed0, accepted0 = engine.draft_tokens_proposed, engine.draft_tokens_accepted
        rates, toks = [], []
        for p in prompts:
            rate, t = _one(engine, p, cfg.max_new_tokens)
            rates.append(rate)
            toks.append(t)
        runs[label] = {"decode_tok_s_p50": round(median(rates), 1),
                       "decode_tok_s_per_request": [round(r, 1) for r in rates],
                       "generated_tokens": sum(len(t) for t in toks), "steps": engine.steps}
        proposed = engine.draft_tokens_proposed - proposed0
        if proposed:
            accepted = engine.draft_tokens_accepted - accepted0
            runs[label].update(draft_tokens_proposed=proposed, draft_tokens_accepted=accepted,
                               acceptance=round(accepted / proposed, 3))
        if engine.draft is not None:
            runs[label]["draft_model_tokens_proposed"] = engine.draft.proposed
        tokens[label] = toks
        share = (f", {runs[label]['acceptance']:.0%} of {proposed} drafted tokens accepted"
                 if proposed else "")
        console.print(f"  {label:>11}: {runs[label]['decode_tok_s_p50']} tok/s decode "
                      f"({runs[label]['steps']} steps{share}; per request "
                      f"{', '.join(f'{r:.0f}' for r in rates)})")
    results["runs"] = runs
    results["fleetlm"] = fleetlm_settings(lm)
    results["speedup"] = round(runs["speculative"]["decode_tok_s_p50"]
                               / max(runs["plain"]["decode_tok_s_p50"], 1e-9), 3)
    if "draft_model" in runs:
        results["speedup_draft_model"] = round(runs["draft_model"]["decode_tok_s_p50"]
                                               / max(runs["plain"]["decode_tok_s_p50"], 1e-9), 3)
    results["greedy_identical"] = all(t == tokens["plain"] for t in tokens.values())
    console.print(f"  speculative / plain: {results['speedup']}x (target >= 1.5x); greedy "
                  f"tokens identical: {results['greedy_identical']}")
    write_json(results, out)
    return results
