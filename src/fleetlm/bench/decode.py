"""``fleetlm bench decode``: single-stream decode speed and time to first token.

In one run, on the same model and prompts: fleetlm (float32, bfloat16, int8, int4),
transformers ``generate`` (float32 and bfloat16, the same dequantised weights) and
llama.cpp through llama-cpp-python (the original GGUF file, ``--threads`` threads; optional
extra ``bench``). Every system decodes ``new_tokens`` greedy tokens with end-of-sequence
ignored, ``repeats`` times per prompt length; medians are reported.

Also measured: what int8 and int4 cost in quality -- perplexity on a fixed text and greedy
agreement with float32 (teacher-forced top-1 agreement, and the share of a free-running
greedy continuation that matches float32 token for token).
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from fleetlm.bench.common import REFERENCE_TEXT, environment, median, write_json
from fleetlm.config import StrictModel

SYSTEMS = ("fleetlm-float32", "fleetlm-bfloat16", "fleetlm-int8", "fleetlm-int4",
           "transformers-float32", "transformers-bfloat16", "llama.cpp")


class DecodeBenchConfig(StrictModel):
    model: str = "smollm2-135m"
    new_tokens: int = 128
    repeats: int = 3
    prompt_lengths: list[int] = Field(default_factory=lambda: [16, 512])
    skip: list[str] = Field(default_factory=list)
    compile: bool = True
    threads: int = 2  # llama.cpp threads (torch uses its default, printed in the JSON)

    def check(self) -> None:
        unknown = [s for s in self.skip if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"--skip {unknown}: unknown systems; choose from {', '.join(SYSTEMS)}")
        if self.new_tokens < 2:
            raise ValueError("--new-tokens must be >= 2 to measure a decode rate")
        if self.repeats < 1:
            raise ValueError("--repeats must be >= 1")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise ValueError("--prompt-lengths must be positive integers")


@dataclass
class Measurement:
    system: str
    prompt_tokens: int
    ttft_ms: float  # median
    decode_tok_s: float  # median
    runs: list[dict[str, float]]
    detail: dict[str, Any] = Field(default_factory=dict)


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    ids: list[int] = tokenizer(REFERENCE_TEXT, add_special_tokens=False)["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _summarise(system: str, n_prompt: int, runs: list[dict[str, float]], **detail: Any) -> Measurement:
    return Measurement(system, n_prompt, median([r["ttft_ms"] for r in runs]),
                       median([r["decode_tok_s"] for r in runs]), runs, detail)


def bench_fleetlm(cfg: DecodeBenchConfig, dtype: str, quantize: str, prompts: dict[int, list[int]]
                  ) -> tuple[list[Measurement], Any]:
    from fleetlm.engine.generate import Generator
    from fleetlm.engine.sampling_params import SamplingParams
    from fleetlm.models.kv_cache import bucket
    from fleetlm.models.loader import load_model

    lm = load_model(cfg.model, dtype=dtype, quantize=quantize)
    longest = max(prompts) + cfg.new_tokens + 1
    gen = Generator(lm, max_len=bucket(longest), compile=cfg.compile)
    t0 = time.perf_counter()
    for n in prompts:  # compile (or warm) every kv bucket the measurement will touch
        gen.warmup_request(n, cfg.new_tokens)
    warm_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=cfg.new_tokens, temperature=0.0, ignore_eos=True)
    name = f"fleetlm-{quantize if quantize in ('int8', 'int4') else dtype}"
    out = []
    for n, ids in prompts.items():
        gen.generate(ids, params)  # warm the prefill path for this length
        runs = []
        for _ in range(cfg.repeats):
            r = gen.generate(ids, params)
            runs.append({"ttft_ms": 1000 * r.ttft_s,
                         "decode_tok_s": (len(r.token_ids) - 1) / r.decode_s})
        out.append(_summarise(name, n, runs, dtype=str(lm.dtype).removeprefix("torch."),
                              quantize=quantize, compiled=gen.compiled,
                              warmup_s=round(warm_s, 1)))
    return out, lm


def bench_transformers(cfg: DecodeBenchConfig, folder: Path, dtype: str,
                       prompts: dict[int, list[int]]) -> list[Measurement]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype).eval()
    out = []
    for n, ids in prompts.items():
        x = torch.tensor([ids])
        runs = []
        for i in range(cfg.repeats + 1):
            clock = Clock()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=cfg.new_tokens,
                               min_new_tokens=cfg.new_tokens, do_sample=False, streamer=clock,
                               pad_token_id=0)
            # put() #0 is the prompt, #1 the first new token, then one per decode step
            first, last = clock.times[1], clock.times[-1]
            if i > 0:  # the first run is warm-up
                runs.append({"ttft_ms": 1000 * (first - t0),
                             "decode_tok_s": (len(clock.times) - 2) / (last - first)})
        out.append(_summarise(f"transformers-{dtype}", n, runs, dtype=dtype))
    del model
    gc.collect()
    return out


def bench_llama_cpp(cfg: DecodeBenchConfig, gguf_path: Path, prompts: dict[int, list[int]]
                    ) -> list[Measurement] | str:
    try:
        from llama_cpp import Llama
    except ImportError:
        return "llama-cpp-python is not installed (make install EXTRAS=dev,bench)"
    llm = Llama(str(gguf_path), n_threads=cfg.threads, n_threads_batch=cfg.threads,
                n_ctx=max(prompts) + cfg.new_tokens + 8, n_batch=512, verbose=False)
    out = []
    for n, ids in prompts.items():
        runs = []
        for i in range(cfg.repeats + 1):
            # forget the previous run: llama-cpp-python would otherwise reuse the cached
            # prompt prefix and the TTFT would not include the prefill
            llm.reset()
            llm._ctx.kv_cache_clear()
            t0 = time.perf_counter()
            times = []
            for _tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
                times.append(time.perf_counter())
                if len(times) >= cfg.new_tokens:
                    break
            if i > 0:
                runs.append({"ttft_ms": 1000 * (times[0] - t0),
                             "decode_tok_s": (len(times) - 1) / (times[-1] - times[0])})
        out.append(_summarise("llama.cpp", n, runs, file=gguf_path.name, threads=cfg.threads))
    del llm
    gc.collect()
    return out


def quality(models: dict[str, Any], tokenizer: Any, n_tokens: int = 512, n_free: int = 64
            ) -> dict[str, Any]:
    """Perplexity on REFERENCE_TEXT and agreement with float32 for each loaded fleetlm model."""
    import torch

    from fleetlm.engine.generate import Generator
    from fleetlm.engine.sampling_params import SamplingParams
    from fleetlm.models.kv_cache import bucket

    ids = prompt_ids(tokenizer, n_tokens)
    x = torch.tensor([ids])
    res: dict[str, Any] = {}
    argmaxes: dict[str, torch.Tensor] = {}
    continuations: dict[str, list[list[int]]] = {}
    starts = [ids[:16], ids[100:132], ids[200:208], ids[300:364]]
    for name, lm in models.items():
        m = lm.model
        with torch.inference_mode():
            cache = m.allocate_cache(1, bucket(n_tokens))
            logits = m(x, torch.arange(n_tokens)[None], cache, torch.tensor([0]), bucket(n_tokens))[0]
        nll = torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:])
        argmaxes[name] = logits[:-1].argmax(-1)
        gen = Generator(lm, max_len=512)
        p = SamplingParams(max_tokens=n_free, temperature=0.0, ignore_eos=True)
        continuations[name] = [gen.generate(s, p).token_ids for s in starts]
        res[name] = {"perplexity": round(float(torch.exp(nll)), 4)}
    ref = "fleetlm-float32"
    if ref in models:
        for name in models:
            top1 = float((argmaxes[name] == argmaxes[ref]).float().mean())
            prefix = []
            for a, b in zip(continuations[name], continuations[ref], strict=True):
                k = next((i for i, (u, v) in enumerate(zip(a, b, strict=True)) if u != v), len(a))
                prefix.append(k / len(a))
            res[name]["top1_agreement_vs_float32"] = round(top1, 4)
            res[name]["greedy_prefix_match_vs_float32"] = round(sum(prefix) / len(prefix), 4)
    res["_setup"] = {"text_tokens": n_tokens, "free_running_tokens": n_free,
                     "free_running_prompts": len(starts)}
    return res


def run(cfg: DecodeBenchConfig, out: Path | None) -> dict[str, Any]:
    from rich.console import Console

    from fleetlm.models.loader import load_tokenizer, resolve_source
    from fleetlm.models.registry import EMBEDDED_MODELS, resolve_embedded

    cfg.check()
    console = Console(stderr=True)
    folder = resolve_source(cfg.model)
    tokenizer = load_tokenizer(folder)
    prompts = {n: prompt_ids(tokenizer, n) for n in cfg.prompt_lengths}
    results: list[Measurement] = []
    notes: dict[str, str] = {}
    loaded: dict[str, Any] = {}
    for dtype, quant in (("float32", "none"), ("bfloat16", "none"), ("auto", "int8"),
                         ("auto", "int4")):
        name = f"fleetlm-{quant if quant in ('int8', 'int4') else dtype}"
        if name in cfg.skip:
            continue
        console.log(f"measuring {name} (compile={cfg.compile})")
        ms, lm = bench_fleetlm(cfg, dtype, quant, prompts)
        results += ms
        loaded[name] = lm

    console.log("measuring quality (perplexity, agreement with float32)")
    qual = quality(loaded, tokenizer) if loaded else {}
    loaded.clear()
    gc.collect()

    for dtype in ("float32", "bfloat16"):
        if f"transformers-{dtype}" not in cfg.skip:
            console.log(f"measuring transformers-{dtype}")
            results += bench_transformers(cfg, folder, dtype, prompts)

    if "llama.cpp" not in cfg.skip:
        gguf = None
        if cfg.model in EMBEDDED_MODELS:
            gguf = resolve_embedded(cfg.model)
        elif cfg.model.endswith(".gguf"):
            gguf = Path(cfg.model)
        if gguf is None:
            notes["llama.cpp"] = "skipped: the model is not a GGUF file"
        else:
            console.log("measuring llama.cpp")
            r = bench_llama_cpp(cfg, gguf, prompts)
            if isinstance(r, str):
                notes["llama.cpp"] = r
            else:
                results += r

    ratios = compute_ratios(results, cfg.prompt_lengths)
    data = {"benchmark": "decode", "config": cfg.model_dump(), "environment": environment(),
            "results": [asdict(m) for m in results], "ratios": ratios, "quality": qual,
            "notes": notes}
    print_table(results, ratios, qual, notes)
    write_json(data, out)
    return data


def compute_ratios(results: list[Measurement], lengths: list[int]) -> dict[str, Any]:
    ratios: dict[str, Any] = {}
    for n in lengths:
        at = {m.system: m for m in results if m.prompt_tokens == n}
        ours = {k: v for k, v in at.items() if k.startswith("fleetlm-")}
        if not ours:
            continue
        best = max(ours.values(), key=lambda m: m.decode_tok_s)
        r: dict[str, Any] = {"best_fleetlm": best.system, "best_decode_tok_s": round(best.decode_tok_s, 1)}
        for base, target in (("transformers-float32", 5.0), ("transformers-bfloat16", None),
                             ("llama.cpp", 0.8)):
            if base in at:
                ratio = best.decode_tok_s / at[base].decode_tok_s
                r[f"decode_vs_{base}"] = round(ratio, 2)
                if target is not None:
                    r[f"decode_vs_{base}_target"] = target
                    r[f"decode_vs_{base}_met"] = ratio >= target
        ratios[f"prompt_{n}"] = r
    return ratios


def print_table(results: list[Measurement], ratios: dict[str, Any], qual: dict[str, Any],
                notes: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="fleetlm bench decode (single stream, medians)")
    for col in ("system", "prompt tok", "TTFT ms", "decode tok/s", "detail"):
        t.add_column(col)
    for m in results:
        detail = ", ".join(f"{k}={v}" for k, v in m.detail.items())
        t.add_row(m.system, str(m.prompt_tokens), f"{m.ttft_ms:.1f}", f"{m.decode_tok_s:.1f}", detail)
    c = Console()
    c.print(t)
    for k, r in ratios.items():
        c.print(f"{k}: " + ", ".join(f"{a}={b}" for a, b in r.items()))
    for k, v in qual.items():
        if not k.startswith("_"):
            c.print(f"quality {k}: " + ", ".join(f"{a}={b}" for a, b in v.items()))
    for k, v in notes.items():
        c.print(f"note {k}: {v}")
