"""The ``fleetlm`` command line. Each command builds typed settings and hands them on;
heavy imports (torch, transformers) happen inside the commands, never at import."""

from __future__ import annotations

import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fleetlm.errors import FleetLMError

app = typer.Typer(
    help="fleetlm: serve, route and tune small language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: each prints a table and writes JSON with --out.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


class DTypeOpt(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class QuantOpt(StrEnum):
    none = "none"
    int8 = "int8"


ModelOpt = Annotated[str, typer.Option("--model", "-m",
                                       help="Embedded name (smollm2-135m), HF folder, .gguf file or hub id.")]
DTypeArg = Annotated[DTypeOpt, typer.Option("--dtype", help="auto picks bfloat16 where the CPU supports it.")]
QuantArg = Annotated[QuantOpt, typer.Option("--quantize", help="Weight-only int8 for the projections.")]


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (or the user message with --chat).")],
    model: ModelOpt = "smollm2-135m",
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message (with --chat).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(help="1 = off.")] = 1.0,
    min_p: Annotated[float, typer.Option(help="0 = off.")] = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")] = None,
    dtype: DTypeArg = DTypeOpt.auto,
    quantize: QuantArg = QuantOpt.none,
    compile: Annotated[bool, typer.Option("--compile/--no-compile",
                                          help="torch.compile the decode step (slow start, faster decode).")] = False,
    stats: Annotated[bool, typer.Option("--stats/--no-stats", help="Print timings to stderr.")] = True,
) -> None:
    """Generate text from one prompt, streaming tokens to the terminal (no server)."""
    from fleetlm.engine.generate import Generator
    from fleetlm.engine.sampling_params import SamplingParams
    from fleetlm.models.loader import load_model

    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            seed=seed, stop=list(stop or []),
        ).validate()
        lm = load_model(model, dtype=dtype.value, quantize=quantize.value)
        tok = lm.tokenizer
        if chat:
            if not tok.chat_template:
                raise FleetLMError(f"{model}: the tokenizer has no chat template; drop --chat")
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
        gen = Generator(lm, compile=compile)
        if compile:  # compile the kv buckets this prompt will touch before timing it
            from rich.console import Console

            with Console(stderr=True).status("Compiling the decode step (first run of a shape)..."):
                gen.warmup_request(len(ids), max_tokens)
        t0 = time.perf_counter()
        first = None
        n = 0
        reason = None
        for ev in gen.stream(list(ids), params):
            if first is None:
                first = time.perf_counter()
            n += 1
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            reason = ev.finish_reason
        t1 = time.perf_counter()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stats and first is not None:
            rate = (n - 1) / (t1 - first) if n > 1 and t1 > first else float("nan")
            typer.echo(
                f"[{lm.name} {str(lm.dtype).removeprefix('torch.')} quantize={lm.quantize}] "
                f"prompt {len(ids)} tok, generated {n} tok, finish={reason}, "
                f"ttft {1000 * (first - t0):.0f} ms, decode {rate:.1f} tok/s",
                err=True,
            )
    except FleetLMError as e:
        _fail(e)


@bench_app.command("decode")
def bench_decode(
    model: ModelOpt = "smollm2-135m",
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per measurement.")] = 128,
    repeats: Annotated[int, typer.Option(help="Measurements per configuration (median is reported).")] = 3,
    prompt_lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths.")] = "16,512",
    skip: Annotated[str, typer.Option(help="Comma-separated systems to skip: fleetlm-float32, "
                                            "fleetlm-bfloat16, fleetlm-int8, transformers, llama.cpp")] = "",
    compile: Annotated[bool, typer.Option("--compile/--no-compile",
                                          help="torch.compile fleetlm's decode step.")] = True,
) -> None:
    """Single-stream decode tok/s and TTFT: fleetlm vs transformers vs llama.cpp."""
    from fleetlm.bench.decode import DecodeBenchConfig, run

    try:
        cfg = DecodeBenchConfig(
            model=model, new_tokens=new_tokens, repeats=repeats,
            prompt_lengths=[int(x) for x in prompt_lengths.split(",") if x.strip()],
            skip=[x.strip() for x in skip.split(",") if x.strip()], compile=compile,
        )
        run(cfg, out)
    except (FleetLMError, ValueError) as e:
        _fail(e)


def main() -> None:  # pragma: no cover - console entry point
    app()
