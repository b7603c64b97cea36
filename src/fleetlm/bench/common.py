"""Helpers shared by benchmarks: fixed prompts, medians, environment facts, JSON out."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

# A fixed, license-free text used for prompts and perplexity. Long enough for 512+ tokens.
REFERENCE_TEXT = (
    "The river town woke slowly. Fishermen carried their nets down to the water while the "
    "baker opened her shutters and set out the first loaves of the day. Children ran along the "
    "quay, chasing gulls that rose and settled again on the warm stones. At the end of the "
    "pier an old lighthouse keeper counted the boats as they left the harbour, writing each "
    "name in a ledger he had kept for forty years. The ledger recorded storms and calm days, "
    "births and funerals, the price of salt and the arrival of the first train, which had "
    "changed the town more than any storm. Before the railway, goods came by cart over the "
    "hills, and a journey to the city took three days. Afterwards, the city came to the town: "
    "visitors in pale suits, painters with folding easels, and merchants who bought the whole "
    "catch before the boats had even landed. The keeper did not mind the visitors, but he "
    "worried about the young people, who now saw a door open to the wider world and walked "
    "through it one by one. Schools were built, and a library, and a small hospital with twelve "
    "beds. The doctor, a quiet woman from the north, taught the keeper's granddaughter to read "
    "charts of the human body the way he had taught her to read charts of the sea. In winter "
    "the harbour froze at its edges and the boats stayed in, and the town turned inward: "
    "repairs, accounts, long evenings of cards and stories. In spring the ice broke with a "
    "sound like distant guns, and the whole cycle began again. Economists who later studied "
    "the region described it as a case of rapid integration into national markets, with "
    "rising incomes, falling fertility and a steady flow of migrants to the cities. Those "
    "numbers were true, but they did not describe the smell of tar and bread in the morning, "
    "or the ledger, or the keeper standing at the end of the pier, counting boats until the "
    "last one came home. Historians argue about whether the railway caused the change or "
    "merely accelerated a process that had started with the new roads and the postal service. "
    "Either way, by the end of the century the town had doubled in size, the old market had "
    "moved indoors, and the lighthouse was run by a machine that needed no ledger at all."
)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float | None:
    """numpy's default (linear interpolation); None for no data."""
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else None


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and "cpu" not in info:
                info["cpu"] = value.strip()
            elif key in ("flags", "Features") and "cpu_flags" not in info:
                # the vector extensions the fast paths choose between (x86 flags, ARM features)
                info["cpu_flags"] = sorted(f for f in value.split() if f in _SIMD_FLAGS)
    except OSError:
        pass
    return info


_SIMD_FLAGS = frozenset({
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm"})


def write_json(data: dict[str, Any], out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))


def fleetlm_settings(lm: Any, warmup_s: float | None = None) -> dict[str, Any]:
    """What a benchmark's fleetlm ran with (dtype, weights, compiled; warm-up seconds)."""
    out: dict[str, Any] = {"dtype": str(lm.dtype).removeprefix("torch."), "quantize": lm.quantize,
                           "compiled": lm.model.decode_compiled}
    if warmup_s is not None:
        out["warmup_s"] = round(warmup_s, 1)
    from fleetlm.kernels import cpu, int8_gemv

    if int8_gemv.is_loaded():
        out["kernels"] = cpu.kernel_isa()
        # batches of a bfloat16 model multiply with vdpbf16ps (int8_gemv.bf16_dot)
        out["int8_bf16_dot"] = int8_gemv.bf16_dot() and str(lm.dtype) == "torch.bfloat16"
    out["fused_decode"] = lm.model.fused_decode() is not None
    return out


def run_one(engine: Any, prompt: list[int], params: Any) -> tuple[list[float], list[int]]:
    """One request through an engine stepped on this thread: ([submit time, then each
    token's arrival time], the tokens)."""
    import time

    stamps: list[float] = [time.perf_counter()]
    tokens: list[int] = []

    def on_event(ev: Any) -> None:
        if ev.token_id is not None:
            stamps.append(time.perf_counter())
            tokens.append(ev.token_id)

    engine.submit(prompt, params, callback=on_event)
    while engine.step():
        pass
    return stamps, tokens
