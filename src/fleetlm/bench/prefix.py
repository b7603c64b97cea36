"""``fleetlm bench prefix``: time to first token with a shared prompt prefix, cached vs not.

The workload a route's system prompt creates: every request starts with the same
``prefix_tokens`` tokens (a window of the reference text) and ends with its own
``suffix_tokens``. Requests run one at a time on an in-process engine with ``fleetlm
serve``'s defaults (weights, compilation), first with prefix caching off, then on (after
one request has filled the cache). Reported: TTFT p50/p90 of each, their ratio (the issue's
target: <= 0.3x at 500 prefix tokens), and whether the greedy tokens of the two runs agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleetlm.bench.common import (
    environment,
    fleetlm_settings,
    median,
    percentile,
    run_one,
    write_json,
)
from fleetlm.config import StrictModel


class PrefixBenchConfig(StrictModel):
    model: str = "smollm2-135m"
    dtype: str = "auto"
    quantize: str = "auto"
    compile: bool = True
    prefix_tokens: int = 500
    suffix_tokens: int = 16
    requests: int = 16
    max_new_tokens: int = 16

    def check(self) -> None:
        from fleetlm.errors import ConfigError

        bad = [f"{k}={getattr(self, k)}: must be >= 1" for k in
               ("prefix_tokens", "suffix_tokens", "requests", "max_new_tokens")
               if getattr(self, k) < 1]
        if bad:
            raise ConfigError("bench prefix: " + "; ".join(bad))


def _one(engine: Any, prompt: list[int], max_new: int) -> tuple[float, list[int]]:
    """(time to first token, tokens) of one greedy request."""
    from fleetlm.engine.sampling_params import SamplingParams

    stamps, tokens = run_one(engine, prompt, SamplingParams(max_tokens=max_new, temperature=0.0,
                                                            ignore_eos=True))
    return stamps[1] - stamps[0], tokens


def run(cfg: PrefixBenchConfig, out: Path | None) -> dict[str, Any]:
    from rich.console import Console

    from fleetlm.bench.workload import make_prompts
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model

    cfg.check()
    console = Console(stderr=True)
    lm = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize)
    prefix = make_prompts(lm.tokenizer, 1, cfg.prefix_tokens, 0)[0]
    suffixes = make_prompts(lm.tokenizer, cfg.requests + 1, cfg.suffix_tokens, 1)
    prompts = [prefix + s for s in suffixes]
    max_len = cfg.prefix_tokens + cfg.suffix_tokens + cfg.max_new_tokens + 1
    results: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "environment": environment()}
    runs: dict[str, dict[str, Any]] = {}
    tokens: dict[str, list[list[int]]] = {}
    for label, budget in (("uncached", 0), ("cached", 256 << 20)):
        engine = Engine(lm, EngineConfig(max_running=1, max_len=max_len, max_hot_adapters=0,
                                         compile=cfg.compile, prefix_cache_bytes=budget))
        engine.warmup()
        _one(engine, prompts[0], cfg.max_new_tokens)  # warm-up; fills the cache when on
        ttfts, toks = [], []
        for p in prompts[1:]:
            ttft, t = _one(engine, p, cfg.max_new_tokens)
            ttfts.append(ttft)
            toks.append(t)
        runs[label] = {"ttft_p50_ms": round(median(ttfts) * 1e3, 1),
                       "ttft_p90_ms": round((percentile(ttfts, 90) or 0) * 1e3, 1),
                       "prefix_hits": engine.prefix_cache.hits if engine.prefix_cache else 0}
        tokens[label] = toks
        console.print(f"  {label:>8}: TTFT p50 {runs[label]['ttft_p50_ms']} ms, "
                      f"p90 {runs[label]['ttft_p90_ms']} ms")
    results["runs"] = runs
    results["fleetlm"] = fleetlm_settings(lm)
    results["ttft_ratio_cached_vs_uncached"] = round(
        runs["cached"]["ttft_p50_ms"] / runs["uncached"]["ttft_p50_ms"], 3)
    results["greedy_identical"] = tokens["cached"] == tokens["uncached"]
    console.print(f"  cached / uncached TTFT: {results['ttft_ratio_cached_vs_uncached']}x "
                  f"(target <= 0.3x); greedy tokens identical: {results['greedy_identical']}")
    write_json(results, out)
    return results
