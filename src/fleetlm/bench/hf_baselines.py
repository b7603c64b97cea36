"""The transformers baselines of ``fleetlm bench adapters``, measured the way the engine is.

Three ways to serve the same requests with transformers (+ PEFT):

- :func:`peft_switching`: one PeftModel holding every adapter, requests one at a time,
  ``set_adapter`` before each (what a naive multi-adapter server does);
- :func:`peft_mixed_batches`: waves of ``concurrency`` requests, static batches with left
  padding, one adapter per row through ``generate(adapter_names=...)``;
- :func:`hf_continuous_batching`: transformers' own continuous batching (paged attention,
  ``init_continuous_batching``), without adapters -- it has no adapter support.

Every request is queued at the start of the run, decodes exactly ``max_new_tokens`` greedy
tokens (end-of-sequence neither stops nor is suppressed) and reports the same metrics as
the engine side (:data:`METRIC_KEYS`). The model is loaded with
``AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)``; adapters keep that dtype
(PEFT would otherwise upcast them to float32). Loading and one short warm-up generation
are outside the timed part. This module knows nothing about fleetlm's engine.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from fleetlm.bench.common import percentile
from fleetlm.bench.rss import PeakRSS

METRIC_KEYS = ("name", "requests_completed", "generated_tokens", "wall_s", "tokens_per_s",
               "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "peak_rss_mb", "notes")
BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


@dataclass
class RequestTrace:
    submitted: float  # perf_counter seconds
    token_times: list[float] = field(default_factory=list)  # one per generated token
    token_ids: list[int] = field(default_factory=list)


def summarize(name: str, traces: list[RequestTrace], wall_s: float, peak_rss_bytes: int,
              notes: str, **extra: Any) -> dict[str, Any]:
    """The metric dict from finished requests. TTFT: first token minus submission, one per
    request; ITL: every gap between consecutive tokens of one request, pooled over requests."""
    ttft = [1000 * (t.token_times[0] - t.submitted) for t in traces if t.token_times]
    itl = [1000 * (b - a) for t in traces for a, b in pairwise(t.token_times)]
    tokens = sum(len(t.token_ids) for t in traces)

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return {"name": name, "requests_completed": len(traces), "generated_tokens": tokens,
            "wall_s": round(wall_s, 6), "tokens_per_s": round(tokens / wall_s, 3) if wall_s > 0 else None,
            "ttft_p50_ms": r(percentile(ttft, 50)), "ttft_p99_ms": r(percentile(ttft, 99)),
            "itl_p50_ms": r(percentile(itl, 50)), "itl_p99_ms": r(percentile(itl, 99)),
            "peak_rss_mb": round(peak_rss_bytes / 2**20, 1), "notes": notes,
            "outputs": [t.token_ids for t in traces], **extra}


def load_base(model_folder: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_folder), dtype=dtype)
    model.generation_config.eos_token_id = None  # EOS must not stop generation (see _greedy)
    return model.eval()


def load_peft(model: Any, adapters: dict[str, Path]) -> Any:
    """``model`` wrapped in one PeftModel holding ``adapters`` (PEFT name -> folder);
    ``model`` itself when there are none."""
    from peft import PeftModel

    if not adapters:
        return model
    # autocast_adapter_dtype=False: keep the adapters in the model's dtype, as the engine
    # does; low_cpu_mem_usage: no random init of weights about to be overwritten. Loading
    # is still quadratic in the number of adapters (each load walks every module, the
    # adapters' own included): ~80 s for 64 rank-16 adapters on SmolLM2-135M.
    kw: dict[str, Any] = {"autocast_adapter_dtype": False, "low_cpu_mem_usage": True}
    (first, folder), *rest = adapters.items()
    peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=first, **kw)
    for name, folder in rest:
        peft_model.load_adapter(str(folder), adapter_name=name, **kw)
    return peft_model.eval()


def _greedy(max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    # eos_token_id=None (and none on the model's generation_config): no stop on EOS, and,
    # unlike min_new_tokens, EOS is not suppressed either -- the engine's ignore_eos
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            eos_token_id=None, pad_token_id=0, use_cache=True)


def _clock() -> Any:
    from transformers import StoppingCriteria

    class TokenClock(StoppingCriteria):
        """Timestamps each decoding step: generate calls stopping criteria right after a
        step's tokens are appended (the first one included), and never stops anything."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return TokenClock()


def resolve_assignment(adapter_dirs: list[Path], assignment: list[int | str | None]
                       ) -> tuple[list[str | None], dict[str, Path]]:
    """Each request's adapter as a PEFT name (its folder's name; None = base model) and
    the folders of the names used. An entry is an index into ``adapter_dirs`` or a
    folder name."""
    by_name = {d.name: d for d in adapter_dirs}
    if len(by_name) != len(adapter_dirs):
        raise ValueError("adapter folders must have distinct names (they name the PEFT adapters)")
    names: list[str | None] = []
    for a in assignment:
        if isinstance(a, int) and not isinstance(a, bool):
            if not 0 <= a < len(adapter_dirs):
                raise ValueError(f"assignment uses adapter {a} but only {len(adapter_dirs)} "
                                 "adapter folders were given")
            names.append(adapter_dirs[a].name)
        elif a is None or a in by_name:
            names.append(a)
        else:
            raise ValueError(f"assignment names adapter {a!r}, which is not among the "
                             f"{len(adapter_dirs)} adapter folders given")
    used = sorted({n for n in names if n is not None})
    return names, {n: by_name[n] for n in used}


def _generate(model: Any, rows: list[list[int]], max_new_tokens: int, **kwargs: Any
              ) -> tuple[list[list[int]], list[float]]:
    """Greedy-decode a static batch (left-padded); the new tokens of each row and the time
    at which each step's tokens existed."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, width - len(r):] = torch.tensor(r)
        mask[j, width - len(r):] = 1
    clock = _clock()
    from transformers import StoppingCriteriaList

    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=_greedy(max_new_tokens),
                         stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
    new = out[:, width:].tolist()
    assert all(len(t) == max_new_tokens for t in new) and len(clock.times) == max_new_tokens
    return new, clock.times


def _check_lengths(prompts: list[list[int]], assignment: list[Any] | None) -> None:
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if assignment is not None and len(assignment) != len(prompts):
        raise ValueError(f"{len(assignment)} adapter assignments for {len(prompts)} prompts")


_MEASURED = ("requests queued at t=0 (run start); TTFT = first token - t=0 (queueing included); "
             "token times from a StoppingCriteria callback that generate calls after every "
             "decoding step (all rows of a batch share a step's time)")


def peft_switching(model_folder: Path, adapter_dirs: list[Path], prompts: list[list[int]],
                   assignment: list[int | str | None], max_new_tokens: int, *, dtype: torch.dtype,
                   time_budget_s: float | None = None) -> dict[str, Any]:
    """Requests one at a time in order, ``set_adapter`` before each (``disable_adapter``
    for a request without one), ``generate`` with batch size 1. Once ``time_budget_s``
    has passed, the remaining requests are skipped (the first always runs); throughput is
    over the completed ones."""
    from contextlib import nullcontext

    _check_lengths(prompts, assignment)
    names, needed = resolve_assignment(adapter_dirs, assignment)
    t = time.perf_counter()
    model = load_peft(load_base(model_folder, dtype), needed)
    load_s = time.perf_counter() - t
    with torch.inference_mode():
        _generate(model, [prompts[0]], 2)  # warm-up, not timed
        traces: list[RequestTrace] = []
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            for ids, a in zip(prompts, names, strict=True):
                if traces and time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                    break
                if a is not None:
                    model.set_adapter(a)
                ctx = model.disable_adapter() if a is None and needed else nullcontext()
                with ctx:
                    new, times = _generate(model, [ids], max_new_tokens)
                traces.append(RequestTrace(t0, times, new[0]))
            wall = time.perf_counter() - t0
    skipped = len(prompts) - len(traces)
    notes = (f"PEFT set_adapter per request, batch size 1, {len(needed)} adapters loaded in one "
             f"PeftModel; {_MEASURED}; " + (f"{skipped} requests skipped after the {time_budget_s} s "
                                            "budget; " if skipped else "") + "load_s not in wall_s")
    result = summarize("transformers-peft-switching", traces, wall, rss.peak_bytes, notes,
                       load_s=round(load_s, 3), adapters_loaded=len(needed), dtype=str(dtype).removeprefix("torch."))
    del model
    gc.collect()
    return result


def peft_mixed_batches(model_folder: Path, adapter_dirs: list[Path], prompts: list[list[int]],
                       assignment: list[int | str | None], concurrency: int, max_new_tokens: int, *,
                       dtype: torch.dtype, time_budget_s: float | None = None) -> dict[str, Any]:
    """Static batching: waves of ``concurrency`` requests in order, left-padded with an
    attention mask, ``generate(adapter_names=[one per row])`` ("__base__" for a row without
    adapter). A wave starts only when the previous one has finished; no wave starts after
    ``time_budget_s`` (the first always runs)."""
    _check_lengths(prompts, assignment)
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency} must be >= 1")
    names, needed = resolve_assignment(adapter_dirs, assignment)
    t = time.perf_counter()
    model = load_peft(load_base(model_folder, dtype), needed)
    load_s = time.perf_counter() - t

    def rows(wave: list[str | None]) -> dict[str, Any]:
        return {"adapter_names": [BASE if a is None else a for a in wave]} if needed else {}

    with torch.inference_mode():
        _generate(model, [prompts[0]], 2, **rows(names[:1]))  # warm-up, not timed
        traces: list[RequestTrace] = []
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            for start in range(0, len(prompts), concurrency):
                if traces and time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                    break
                wave = names[start:start + concurrency]
                new, times = _generate(model, prompts[start:start + concurrency], max_new_tokens, **rows(wave))
                traces += [RequestTrace(t0, times, row) for row in new]
            wall = time.perf_counter() - t0
    skipped = len(prompts) - len(traces)
    notes = (f"static batches of {concurrency} with left padding, PEFT adapter_names per row "
             f"({len(needed)} adapters in one PeftModel); {_MEASURED}; "
             + (f"{skipped} requests skipped after the {time_budget_s} s budget; " if skipped else "")
             + "load_s not in wall_s")
    result = summarize("transformers-peft-mixed-batches", traces, wall, rss.peak_bytes, notes,
                       load_s=round(load_s, 3), adapters_loaded=len(needed), dtype=str(dtype).removeprefix("torch."))
    del model
    gc.collect()
    return result


def hf_continuous_batching(model_folder: Path, prompts: list[list[int]], concurrency: int,
                           max_new_tokens: int, *, dtype: torch.dtype, time_budget_s: float | None = None,
                           block_size: int = 32) -> dict[str, Any]:
    """transformers' continuous batching (``init_continuous_batching``: a background thread,
    paged KV cache, ``paged|sdpa`` attention), no adapters, every request queued at t=0.

    Sized explicitly: ``max_requests_per_batch=concurrency`` (the FIFO scheduler serves
    decoding requests first, so at most ``concurrency`` are in flight), a token budget per
    step of ``concurrency x longest prompt`` (a full wave prefills in one step) and a KV
    cache of twice what ``concurrency`` requests need. Left to itself, on CPU it sizes the
    cache from 90% of system RAM. Per-token times are its own ``record_timestamps``. Past
    ``time_budget_s`` the unfinished requests are dropped (hard stop) and only completed
    ones count -- which undercounts the work done, so prefer fewer requests to a budget.
    Errors are returned as ``{"error": ...}`` with the metric keys set to None.
    """
    _check_lengths(prompts, None)
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    longest = max(len(p) for p in prompts)
    per_request_blocks = -(-(longest + max_new_tokens + 1) // block_size)
    cb_settings: dict[str, Any] = {
        "max_requests_per_batch": concurrency, "block_size": block_size,
        "num_blocks": 2 * concurrency * per_request_blocks,
        "max_batch_tokens": max(concurrency * longest, 256),
        "allow_block_sharing": False,  # prompts are distinct: no prefix to share
        "scheduler_type": "fifo"}
    # eos -1: never stops on EOS, and nothing is suppressed (CB reads eos from this config)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    notes = (f"transformers continuous batching, no adapters; ContinuousBatchingConfig({cb_settings}); "
             "requests queued at t=0, TTFT = first token - t=0; token times from its "
             "record_timestamps (set after each step's token is read back)")
    name = "transformers-continuous-batching"
    t = time.perf_counter()
    model = load_base(model_folder, dtype)
    load_s = time.perf_counter() - t
    manager = None
    try:
        manager = model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**cb_settings))
        manager.start()
        warm = manager.add_request(prompts[0], request_id="warmup", max_new_tokens=2)
        if warm is None or _wait(manager, {"warmup"}, None).get("warmup") is None:
            raise RuntimeError("the warm-up request did not finish")
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            ids = [manager.add_request(p, request_id=f"r{i}", max_new_tokens=max_new_tokens,
                                       record_timestamps=True) for i, p in enumerate(prompts)]
            done = _wait(manager, {i for i in ids if i is not None},
                         None if time_budget_s is None else t0 + time_budget_s)
            traces = [RequestTrace(t0, list(o.timestamps or []), list(o.generated_tokens))
                      for rid in ids if rid in done for o in [done[rid]]]
            wall = max((tr.token_times[-1] for tr in traces if tr.token_times), default=time.perf_counter()) - t0
        failed = [rid for rid, o in done.items() if o.error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed: {done[failed[0]].error}")
        short = [(len(tr.token_ids), len(tr.token_times)) for tr in traces
                 if not len(tr.token_ids) == len(tr.token_times) == max_new_tokens]
        if short:
            raise RuntimeError(f"(tokens, timestamps) of some requests: {short[:5]}, "
                               f"expected {max_new_tokens} of each")
        skipped = len(prompts) - len(traces)
        if skipped:
            notes += f"; {skipped} requests dropped after the {time_budget_s} s budget"
        return summarize(name, traces, wall, rss.peak_bytes, notes, load_s=round(load_s, 3),
                         dtype=str(dtype).removeprefix("torch."))
    except Exception as e:  # a failing baseline is a result, not a crash of the benchmark
        return {**dict.fromkeys(METRIC_KEYS), "name": name, "notes": notes,
                "error": f"{type(e).__name__}: {e}"}
    finally:
        if manager is not None:
            manager.stop(block=True, timeout=30, hard_stop=True)
            manager.destroy()
        del model
        gc.collect()


def _wait(manager: Any, ids: set[str], deadline: float | None) -> dict[str, Any]:
    """Collect finished outputs for ``ids`` until all are in, the deadline passes or the
    manager's thread dies."""
    done: dict[str, Any] = {}
    while len(done) < len(ids):
        if deadline is not None and time.perf_counter() > deadline:
            break
        out = manager.get_result(timeout=0.05)
        if out is None:
            if not manager.is_running():
                err = manager.background_thread_status.fatal_error
                raise RuntimeError(f"continuous batching thread stopped: {err}")
            continue
        if out.request_id in ids and out.is_finished():
            done[out.request_id] = out
    return done
