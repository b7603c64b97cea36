"""The ``fleetlm`` command line. Each command builds typed settings and hands them on;
heavy imports (torch, transformers) happen inside the commands, never at import."""

from __future__ import annotations

import signal
import sys
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

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
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter from the store (runs through the engine).")] = None,
    adapters_dir: Annotated[Path | None, typer.Option(help="The adapter store (default: the user data folder).")] = None,
    max_lora_rank: Annotated[int, typer.Option(help="Largest adapter rank accepted.")] = 64,
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
        if adapter is not None:
            events = _engine_stream(lm, list(ids), params, adapter, adapters_dir, max_lora_rank)
        else:
            gen = Generator(lm, compile=compile)
            if compile:  # compile the kv buckets this prompt will touch before timing it
                from rich.console import Console

                with Console(stderr=True).status("Compiling the decode step (first run of a shape)..."):
                    gen.warmup_request(len(ids), max_tokens)
            events = gen.stream(list(ids), params)
        t0 = time.perf_counter()
        first = None
        n = 0
        reason = None
        for ev in events:
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
                f"[{lm.name}{':' + adapter if adapter else ''} "
                f"{str(lm.dtype).removeprefix('torch.')} quantize={lm.quantize}] "
                f"prompt {len(ids)} tok, generated {n} tok, finish={reason}, "
                f"ttft {1000 * (first - t0):.0f} ms, decode {rate:.1f} tok/s",
                err=True,
            )
    except FleetLMError as e:
        _fail(e)


@app.command()
def serve(
    model: ModelOpt = "smollm2-135m",
    adapters_dir: Annotated[Path | None, typer.Option(help="The adapter store (default: the user data folder).")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    dtype: DTypeArg = DTypeOpt.auto,
    quantize: QuantArg = QuantOpt.none,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together (KV cache rows).")] = 32,
    max_len: Annotated[int, typer.Option(help="Prompt + generated tokens per sequence.")] = 2048,
    max_hot_adapters: Annotated[int, typer.Option(help="Adapters held in the engine's LoRA slots.")] = 32,
    max_lora_rank: Annotated[int, typer.Option(help="Largest adapter rank accepted.")] = 16,
    config: Annotated[Path | None, typer.Option(help="Routes config (YAML; not supported yet).")] = None,
) -> None:
    """Serve the model (and every adapter in the store) over an OpenAI-compatible HTTP API."""
    try:
        if config is not None:
            raise FleetLMError("--config: routes are not supported yet (the router is a later milestone)")
        import uvicorn

        from fleetlm.adapters import AdapterStore
        from fleetlm.engine.engine import Engine, EngineConfig
        from fleetlm.models.loader import load_model
        from fleetlm.paths import default_adapters_dir
        from fleetlm.server.app import create_app

        lm = load_model(model, dtype=dtype.value, quantize=quantize.value)
        root = adapters_dir or default_adapters_dir()
        store = AdapterStore(root, lm.config, dtype=lm.model.dtype, max_rank=max_lora_rank)
        engine = Engine(lm, EngineConfig(max_running=max_batch, max_len=max_len,
                                         max_hot_adapters=max_hot_adapters,
                                         max_lora_rank=max_lora_rank), store=store)
        name = model if "/" not in model and not model.endswith(".gguf") else lm.name
        typer.echo(f"fleetlm: serving {name!r} with adapters from {root} on http://{host}:{port}/v1",
                   err=True)
        server = uvicorn.Server(uvicorn.Config(create_app(engine, name), host=host, port=port,
                                               log_level="warning", timeout_graceful_shutdown=30))
        # The engine runs on this (main) thread and HTTP on a second one: torch's OpenMP
        # pool is much slower when forked from a second thread (see Engine.run). SIGTERM or
        # Ctrl-C: uvicorn stops accepting, lets requests in flight finish (30 s at most),
        # and its thread ends; a second Ctrl-C stops at once.
        def on_signal(sig: int, _frame: Any) -> None:
            if server.should_exit and sig == signal.SIGINT:
                server.force_exit = True
            server.should_exit = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        http = threading.Thread(target=server.run, name="fleetlm-http", daemon=True)
        http.start()
        try:
            engine.run(until=lambda: not http.is_alive())
        finally:
            engine.shutdown(timeout=30)
        if not server.started:
            raise FleetLMError(f"--host {host} --port {port}: the HTTP server did not start "
                               "(is the port in use? see the message above)")
        typer.echo("fleetlm: stopped", err=True)
    except FleetLMError as e:
        _fail(e)


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="The tune config (YAML); see examples/banking77.yaml.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue training from the last checkpoint.")] = False,
    serve_url: Annotated[str | None, typer.Option(help="A running `fleetlm serve` to load the adapter into.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Run folder (default: the config's output_dir or runs/NAME).")] = None,
    device: Annotated[str, typer.Option(help="cpu, or cuda when a GPU is there.")] = "cpu",
) -> None:
    """Raw data to a served adapter: prepare, synthesise, filter, LoRA-tune, evaluate, publish."""
    from fleetlm.tune.config import load_config
    from fleetlm.tune.pipeline import Pipeline

    try:
        cfg = load_config(config)
        if output_dir is not None:
            cfg = cfg.model_copy(update={"output_dir": output_dir})
        result = Pipeline(cfg, resume=resume, serve_url=serve_url, device=device).run()
    except FleetLMError as e:
        _fail(e)
        return
    m = result.summary.get("metrics", {})
    for name, r in m.items():
        typer.echo(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "rows"))
    typer.echo(f"adapter: {result.adapter_dir}\nrun folder: {result.run_dir} "
               f"({result.summary['wall_seconds']:.0f} s)")


@bench_app.command("tune")
def bench_tune(
    config: Annotated[Path, typer.Option("--config", help="A tune config, e.g. examples/banking77.yaml.")],
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps per throughput run.")] = 30,
    skip_pipeline: Annotated[bool, typer.Option("--skip-pipeline", help="Only the throughput comparison.")] = False,
    skip_trainer: Annotated[bool, typer.Option("--skip-trainer", help="No transformers Trainer baseline.")] = False,
) -> None:
    """`fleetlm tune CONFIG` end to end, and its training loop against transformers' Trainer."""
    from fleetlm.bench.tune import TuneBenchConfig, run

    if steps < 3:
        _fail(FleetLMError(f"--steps={steps}: at least 3 (the first two are warm-up)"))
    try:
        run(TuneBenchConfig(config=config, steps=steps, skip_pipeline=skip_pipeline,
                            skip_trainer=skip_trainer), out)
    except FleetLMError as e:
        _fail(e)


@bench_app.command("route")
def bench_route(
    data: Annotated[str, typer.Option(help="routellm-mmlu or routellm-gsm8k (../shared/data/routellm).")] = "routellm-mmlu",
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here (and a PNG beside it).")] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds.")] = 5,
    limit: Annotated[int | None, typer.Option(help="Use only the first N prompts (a quick look).")] = None,
) -> None:
    """Cross-validated classifier router against random on RouteLLM's recorded outcomes:
    APGR and CPT(50/80/95%), and the router's overhead per request."""
    from fleetlm.bench.route import run_routellm

    sets = {"routellm-mmlu": "mmlu", "routellm-gsm8k": "gsm8k"}
    if data not in sets:
        _fail(FleetLMError(f"--data {data!r}: one of {', '.join(sets)} (clinc150 comes with the "
                           "router's confidence policy)"))
    try:
        run_routellm(sets[data], folds=folds, out=out, limit=limit,
                     log=lambda m: typer.echo(m, err=True))
    except FleetLMError as e:
        _fail(e)


@bench_app.command("serve")
def bench_serve(
    model: ModelOpt = "smollm2-135m",
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    dtype: DTypeArg = DTypeOpt.auto,
    num_requests: Annotated[int, typer.Option(help="Most requests per configuration.")] = 128,
    concurrency: Annotated[str, typer.Option(help="Comma-separated client counts.")] = "1,32",
    prompt_tokens: Annotated[int, typer.Option(help="Tokens per prompt.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per request.")] = 64,
    time_budget_s: Annotated[float, typer.Option(help="Seconds per configuration.")] = 300.0,
    skip_llama_cpp: Annotated[bool, typer.Option("--skip-llama-cpp", help="No llama-cpp-python server baseline.")] = False,
) -> None:
    """The HTTP server's overhead: the same workload in-process and over loopback HTTP, and
    llama-cpp-python's OpenAI server on the same GGUF (when installed: EXTRAS=dev,bench)."""
    from fleetlm.bench.serve import ServeBenchConfig, run

    try:
        try:
            levels = [int(x) for x in concurrency.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"--concurrency {concurrency!r}: comma-separated integers") from None
        run(ServeBenchConfig(model=model, dtype=dtype.value, num_requests=num_requests,
                             concurrency=levels, prompt_tokens=prompt_tokens,
                             max_new_tokens=max_new_tokens, time_budget_s=time_budget_s,
                             llama_cpp=not skip_llama_cpp), out)
    except (FleetLMError, ValueError) as e:
        _fail(e)


def _engine_stream(lm: Any, ids: list[int], params: Any, adapter: str,
                   adapters_dir: Path | None, max_lora_rank: int) -> Any:
    """One request through the batching engine (the path that applies adapters)."""
    from fleetlm.adapters import AdapterStore
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.paths import default_adapters_dir

    store = AdapterStore(adapters_dir or default_adapters_dir(), lm.config, dtype=lm.model.dtype,
                         max_rank=max_lora_rank)
    engine = Engine(lm, EngineConfig(max_running=1, max_len=len(ids) + params.max_tokens + 1,
                                     max_hot_adapters=1, max_lora_rank=max_lora_rank), store=store)
    events: list[Any] = []
    engine.submit(ids, params, adapter=adapter, callback=events.append)
    while True:
        busy = engine.step()
        while events:
            ev = events.pop(0)
            if ev.error is not None:
                raise ev.error
            if ev.token_id is not None or ev.finish_reason is not None:
                yield ev
        if not busy:
            return


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


@bench_app.command("adapters")
def bench_adapters(
    model: ModelOpt = "smollm2-135m",
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    dtype: DTypeArg = DTypeOpt.auto,
    quantize: QuantArg = QuantOpt.none,
    num_requests: Annotated[int, typer.Option(help="Requests per configuration.")] = 256,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (closed loop).")] = 32,
    prompt_tokens: Annotated[int, typer.Option(help="Tokens per prompt.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per request.")] = 64,
    adapter_counts: Annotated[str, typer.Option(help="Comma-separated numbers of distinct adapters.")] = "1,8,64,256",
    popularities: Annotated[str, typer.Option(help="Comma-separated: uniform, zipf.")] = "uniform,zipf",
    max_hot_adapters: Annotated[int, typer.Option(help="Adapter slots in the engine.")] = 64,
    baseline_budget_s: Annotated[float, typer.Option(help="Most seconds of generation per transformers baseline.")] = 180.0,
    switching_requests: Annotated[int, typer.Option(help="Requests served by the PEFT switching baseline.")] = 16,
    mixed_requests: Annotated[int, typer.Option(help="Requests served by the PEFT mixed-batch baseline.")] = 64,
    continuous_requests: Annotated[int, typer.Option(help="Requests served by transformers' continuous batching.")] = 128,
    skip: Annotated[str, typer.Option(help="Comma-separated baselines to skip: peft-switching, "
                                           "peft-mixed, hf-continuous")] = "",
    adapters_dir: Annotated[Path | None, typer.Option(help="Where the random adapters are cached.")] = None,
) -> None:
    """Many adapters in one batch: fleetlm's engine vs transformers + PEFT baselines."""
    from fleetlm.bench.adapters import AdaptersBenchConfig, run

    def ints(text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"{text!r}: comma-separated integers expected") from None

    try:
        cfg = AdaptersBenchConfig(
            model=model, dtype=dtype.value, quantize=quantize.value, num_requests=num_requests,
            concurrency=concurrency, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens,
            adapter_counts=ints(adapter_counts),
            popularities=[x.strip() for x in popularities.split(",") if x.strip()],
            max_hot_adapters=max_hot_adapters, baseline_budget_s=baseline_budget_s,
            switching_requests=switching_requests, mixed_requests=mixed_requests,
            continuous_requests=continuous_requests,
            skip=[x.strip() for x in skip.split(",") if x.strip()], adapters_dir=adapters_dir)
        run(cfg, out)
    except (FleetLMError, ValueError) as e:
        _fail(e)


@bench_app.command("pii")
def bench_pii(
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N sentences.")] = None,
    data: Annotated[Path | None, typer.Option(help="presidio's synth_dataset_v2_train.json "
                                                   "[default: ../shared/data/pii/ beside the repo].")] = None,
) -> None:
    """PII detection precision, recall and F2 per entity type on a labelled dataset."""
    from fleetlm.bench.pii import PiiBenchConfig, run

    try:
        run(PiiBenchConfig(data=data, limit=limit), out)
    except (FleetLMError, ValueError) as e:
        _fail(e)


# --- fleetlm adapters: the adapter store -------------------------------------------------

adapters_app = typer.Typer(help="The adapter store: list, add and remove PEFT LoRA adapters.",
                           no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")

AdaptersDirOpt = Annotated[Path | None, typer.Option(
    "--adapters-dir", help="Adapter store folder [default: $FLEETLM_HOME/adapters, else "
                           "$XDG_DATA_HOME/fleetlm/adapters or ~/.local/share/fleetlm/adapters].")]
AdapterModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="Base model the adapters must fit (only its config is read).")]
MaxRankOpt = Annotated[int, typer.Option("--max-lora-rank", help="Largest LoRA rank accepted.")]


def _adapter_store(adapters_dir: Path | None, model: str | None, max_rank: int = 64) -> Any:
    from fleetlm.adapters import AdapterStore
    from fleetlm.paths import default_adapters_dir

    base = _base_model_config(model) if model is not None else None
    return AdapterStore(adapters_dir or default_adapters_dir(), base, max_rank=max_rank)


def _base_model_config(model: str) -> Any:
    """The base model's LlamaConfig without its weights: a folder's config.json, the cached
    conversion of a GGUF or embedded model (converted once, as serving would), or a hub
    repo's config.json alone."""
    import re

    from fleetlm.errors import ModelLoadError
    from fleetlm.models.loader import read_config, resolve_source
    from fleetlm.models.registry import EMBEDDED_MODELS

    local = model in EMBEDDED_MODELS or Path(model).expanduser().exists()
    if not local and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model):
        try:
            from huggingface_hub import hf_hub_download

            return read_config(Path(hf_hub_download(model, "config.json")).parent)
        except Exception as e:
            raise ModelLoadError(f"{model}: could not fetch config.json from the Hugging Face hub "
                                 f"({type(e).__name__}: {e}); pass a local model folder") from e
    return read_config(resolve_source(model))


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


@adapters_app.command("list")
def adapters_list(
    adapters_dir: AdaptersDirOpt = None,
    model: AdapterModelOpt = "smollm2-135m",
    max_lora_rank: MaxRankOpt = 64,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the adapters in the store (folders that fail validation are reported on stderr)."""
    import json

    try:
        store = _adapter_store(adapters_dir, model, max_lora_rank)
        good, bad = store.scan()
    except FleetLMError as e:
        _fail(e)
        return
    if json_out:
        typer.echo(json.dumps({
            "adapters_dir": str(store.root),
            "adapters": [{"name": a.name, "path": str(a.path), "rank": a.rank, "alpha": a.alpha,
                          "target_modules": list(a.target_modules), "base_model": a.base_model,
                          "size_bytes": a.size_bytes} for a in good],
            "invalid": [{"name": err.adapter, "error": str(err)} for err in bad],
        }, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        if good:
            table = Table(title=f"adapters in {store.root}")
            for col in ("name", "rank", "alpha", "targets", "size", "base model"):
                table.add_column(col, justify="right" if col in ("rank", "alpha", "size") else "left")
            for a in good:
                table.add_row(a.name, str(a.rank), f"{a.alpha:g}", ",".join(a.target_modules),
                              _human_bytes(a.size_bytes), a.base_model or "-")
            # piped output is not cut to 80 columns: names and paths stay whole for grep
            Console(width=None if sys.stdout.isatty() else 200).print(table)
        elif not bad:
            typer.echo(f"no adapters in {store.root} (add one with: fleetlm adapters add PATH)")
    for err in bad:
        typer.secho(f"warning: skipped invalid {err}", fg=typer.colors.YELLOW, err=True)


@adapters_app.command("add")
def adapters_add(
    path: Annotated[Path, typer.Argument(help="PEFT adapter folder (adapter_config.json + "
                                              "adapter_model.safetensors).")],
    name: Annotated[str | None, typer.Option("--name", help="Store it under this name "
                                                            "[default: the folder's name].")] = None,
    adapters_dir: AdaptersDirOpt = None,
    model: AdapterModelOpt = "smollm2-135m",
    max_lora_rank: MaxRankOpt = 64,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an adapter of that name.")] = False,
) -> None:
    """Validate an adapter against the base model and copy it into the store."""
    try:
        store = _adapter_store(adapters_dir, model, max_lora_rank)
        info = store.add(path, name, overwrite=overwrite)
    except FleetLMError as e:
        _fail(e)
        return
    typer.echo(f"added adapter {info.name!r} (rank {info.rank}, alpha {info.alpha:g}, "
               f"{','.join(info.target_modules)}, {_human_bytes(info.size_bytes)}) at {info.path}")


@adapters_app.command("remove")
def adapters_remove(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    adapters_dir: AdaptersDirOpt = None,
) -> None:
    """Delete an adapter from the store."""
    try:
        store = _adapter_store(adapters_dir, None)
        store.remove(name)
    except FleetLMError as e:
        _fail(e)
        return
    typer.echo(f"removed adapter {name!r} from {store.root}")


def main() -> None:  # pragma: no cover - console entry point
    app()
