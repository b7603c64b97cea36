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

from fleetlm.errors import ConfigError, FleetLMError

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
    config: Annotated[Path | None, typer.Option(help="Routes config (YAML): route names become models that answer with the small model or escalate to a large upstream (docs/router.md).")] = None,
) -> None:
    """Serve the model (and every adapter in the store) over an OpenAI-compatible HTTP API."""
    try:
        import uvicorn

        from fleetlm.adapters import AdapterStore
        from fleetlm.engine.engine import Engine, EngineConfig
        from fleetlm.models.loader import load_model
        from fleetlm.paths import default_adapters_dir
        from fleetlm.server.app import create_app

        routes_cfg = None
        if config is not None:
            from fleetlm.router.config import load_routes

            routes_cfg = load_routes(config)  # before the model: a bad file fails at once
        lm = load_model(model, dtype=dtype.value, quantize=quantize.value)
        root = adapters_dir or default_adapters_dir()
        store = AdapterStore(root, lm.config, dtype=lm.model.dtype, max_rank=max_lora_rank)
        engine = Engine(lm, EngineConfig(max_running=max_batch, max_len=max_len,
                                         max_hot_adapters=max_hot_adapters,
                                         max_lora_rank=max_lora_rank), store=store)
        name = model if "/" not in model and not model.endswith(".gguf") else lm.name
        router = None
        if routes_cfg is not None:
            from fleetlm.server.routing import Router

            router = Router.for_server(routes_cfg, name, store)
            for warning in router.upstreams.missing_keys():
                typer.echo(f"fleetlm: warning: {warning}", err=True)
            typer.echo(f"fleetlm: routes {', '.join(router.routes)}; ledger {router.ledger.path}",
                       err=True)
        typer.echo(f"fleetlm: serving {name!r} with adapters from {root} on http://{host}:{port}/v1",
                   err=True)
        server = uvicorn.Server(uvicorn.Config(create_app(engine, name, router), host=host, port=port,
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
            if router is not None:
                router.ledger.close()  # every row recorded so far is committed
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
    data: Annotated[str, typer.Option(help="routellm-mmlu or routellm-gsm8k (../shared/data/routellm), or clinc150 (../shared/data/clinc150, runs the tuned adapter).")] = "routellm-mmlu",
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here (and a PNG beside it).")] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds.")] = 5,
    limit: Annotated[int | None, typer.Option(help="Use only N prompts (a quick look): the first N for routellm-*, N stratified over the labels for clinc150.")] = None,
    adapter: Annotated[str, typer.Option(help="clinc150: the published adapter that is the small model.")] = "clinc150",
    embedding: Annotated[list[str] | None, typer.Option(help="routellm-*: the classifier's prompt embedding, repeatable: all-MiniLM-L6-v2, all-MiniLM-L6-v2:static, base:smollm2-135m (the base model's hidden states) or a local Hugging Face folder. (default: both MiniLM variants)")] = None,
) -> None:
    """Routers (classifier, random; confidence on clinc150) on recorded RouteLLM outcomes or
    on the CLINC150 adapter: APGR, CPT(50/80/95%), and the router's overhead per request."""
    from fleetlm.bench.route import run_clinc150, run_routellm

    sets = {"routellm-mmlu": "mmlu", "routellm-gsm8k": "gsm8k"}
    if data not in (*sets, "clinc150"):
        _fail(FleetLMError(f"--data {data!r}: one of {', '.join(sets)}, clinc150"))
    try:
        if data == "clinc150":
            run_clinc150(adapter, folds=folds, out=out, limit=limit,
                         log=lambda m: typer.echo(m, err=True))
        else:
            from fleetlm.router.classifier import MINILM_ID, MINILM_STATIC_ID

            run_routellm(sets[data], folds=folds, out=out, limit=limit,
                         embedding_models=embedding or (MINILM_ID, MINILM_STATIC_ID),
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
                                                   "(default: ../shared/data/pii/ beside the repo).")] = None,
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
    "--adapters-dir", help="Adapter store folder (default: $FLEETLM_HOME/adapters, else "
                           "$XDG_DATA_HOME/fleetlm/adapters or ~/.local/share/fleetlm/adapters).")]
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
                                                            "(default: the folder's name).")] = None,
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


# --- fleetlm route: train, calibrate and evaluate a router offline -----------------------

route_app = typer.Typer(help="The router offline: train a classifier router, calibrate a "
                             "threshold, evaluate against random and the oracle.",
                        no_args_is_help=True)
app.add_typer(route_app, name="route")
report_app = typer.Typer(help="Reports from the cost ledger.", no_args_is_help=True)
app.add_typer(report_app, name="report")


class RouterTargetOpt(StrEnum):
    large_needed = "large_needed"
    small_correct = "small_correct"


OUTCOMES_HELP = ('JSON lines, one past request each: {"prompt", "small_correct", '
                 '"large_correct"} (or RouteLLM\'s weak_correct/strong_correct).')
LedgerOpt = Annotated[Path | None, typer.Option(
    "--ledger", help="The cost ledger (SQLite); default: $FLEETLM_HOME/ledger.sqlite3, else "
                     "$XDG_DATA_HOME/fleetlm/ledger.sqlite3 or "
                     "~/.local/share/fleetlm/ledger.sqlite3.")]
SinceOpt = Annotated[str | None, typer.Option(
    "--since", help="Only requests since: a duration (7d, 12h, 30m) or an ISO date or "
                    "date-time (2026-11-01, 2026-11-01T09:00:00Z; local time without an "
                    "offset).")]
# more prompts than this are embedded in chunks behind a progress bar
_EMBED_CHUNK = 512


def _check(problems: list[str]) -> None:
    """Every problem with the options at once (each names its option and the fix)."""
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else
                          f"{len(problems)} problems:\n  " + "\n  ".join(problems))


def _embed(embedder: Any, prompts: list[str]) -> Any:
    """(n, dim) embeddings; a progress bar on stderr when the prompts fill several chunks."""
    import numpy as np

    if len(prompts) <= _EMBED_CHUNK:
        return embedder.embed(prompts)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    parts = []
    console = Console(stderr=True)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task(f"embedding ({embedder.model_id})", total=len(prompts))
        for i in range(0, len(prompts), _EMBED_CHUNK):
            parts.append(embedder.embed(prompts[i:i + _EMBED_CHUNK]))
            bar.advance(task, len(parts[-1]))
    return np.concatenate(parts)


def _sha256_file(path: Path) -> str:
    import hashlib

    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _router_scores(folder: Path, data: Path, prompts: list[str]) -> tuple[Any, Any]:
    """(router, its scores for ``prompts``); warns when ``data`` is the file it was trained on."""
    from fleetlm.router.classifier import TrainedRouter, load_embedder

    try:
        router = TrainedRouter.load(folder)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--router {folder}: {e}") from None
    router.embedder = load_embedder(router.embedding_model)
    if router.meta.get("data_sha256") == _sha256_file(data):
        typer.secho(f"warning: {folder} was trained on {data}: the figures below are in-sample "
                    "(optimistic); use prompts it has not seen", fg=typer.colors.YELLOW, err=True)
    return router, router.scores_from_embeddings(_embed(router.embedder, prompts))


@route_app.command("train")
def route_train(
    data: Annotated[Path, typer.Option("--data", help=OUTCOMES_HELP + " The ledger cannot "
                                       "train a router: it stores no prompts.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for router.json; a route's "
                                      "`classifier:` key names this folder.")],
    embedding: Annotated[str, typer.Option(
        help="all-MiniLM-L6-v2:static (its token embeddings, ~0.2 ms a request), "
             "all-MiniLM-L6-v2 (the full sentence model, ~20 ms), base:MODEL, or a local "
             "Hugging Face folder.")] = "all-MiniLM-L6-v2:static",
    target: Annotated[RouterTargetOpt, typer.Option(
        help="large_needed: learn when only the large model is right (RouteLLM); "
             "small_correct: learn when the small one is.")] = RouterTargetOpt.large_needed,
    c: Annotated[float, typer.Option("--C", help="Inverse regularisation strength of the "
                                     "logistic regression (larger = fits the data closer).")] = 1.0,
    folds: Annotated[int, typer.Option(help="Cross-validation folds for the held-out "
                                       "figures (0 = skip).")] = 5,
    seed: Annotated[int, typer.Option(help="Shuffles the folds; seeds the random baseline.")] = 0,
) -> None:
    """Learn a classifier router from past outcomes and save it (router.json in --out)."""
    try:
        problems = []
        if not c > 0:
            problems.append(f"--C {c}: must be > 0")
        if folds == 1 or folds < 0:
            problems.append(f"--folds {folds}: 0 (skip) or at least 2")
        if out.exists() and not out.is_dir():
            problems.append(f"--out {out}: is a file; give a folder (router.json goes inside)")
        _check(problems)

        from fleetlm.bench.route import cross_val_scores
        from fleetlm.router.calibrate import load_outcomes, outcome_arrays
        from fleetlm.router.classifier import fit_router, labels, load_embedder, router_file
        from fleetlm.router.evaluate import evaluate_scores, format_report
        from fleetlm.router.policies import RandomPolicy, RouteContext

        prompts, small, large = outcome_arrays(load_outcomes(data))
        n = len(prompts)
        y = labels(small, large, target.value)
        typer.echo(f"{data}: {n} rows; small model right on {small.mean():.1%}, large model "
                   f"on {large.mean():.1%}")
        typer.echo(f"  only large right {int((~small & large).sum())}, only small right "
                   f"{int((small & ~large).sum())}, both {int((small & large).sum())}, "
                   f"neither {int((~small & ~large).sum())}")
        typer.echo(f"  label {target.value}: {int(y.sum())} positive ({y.mean():.1%}), "
                   f"{n - int(y.sum())} negative")

        embedder = load_embedder(embedding)
        t0 = time.perf_counter()
        x = _embed(embedder, prompts)
        dt = time.perf_counter() - t0
        typer.echo(f"embedded {n} prompts with {embedder.model_id} in {dt:.1f} s "
                   f"({1000 * dt / n:.2f} ms a prompt, in batches)")
        router = fit_router(x, small, large, embedder.model_id, target=target.value, C=c,
                            embedder=embedder)

        reports = [evaluate_scores("in-sample (optimistic)", router.scores_from_embeddings(x),
                                   small, large)]
        minority = int(min(y.sum(), n - y.sum()))
        if folds and minority < folds:
            typer.echo(f"cross-validation skipped: {minority} row(s) of the rarer label, "
                       f"--folds {folds} needs at least {folds}")
        elif folds:
            cv = cross_val_scores(x, small, large, folds, seed, target.value, c, embedder.model_id)
            reports.append(evaluate_scores(f"{folds}-fold cross-validated", cv, small, large))
        rnd = RandomPolicy(seed)
        reports.append(evaluate_scores("random", [rnd.score(RouteContext(p)) for p in prompts],
                                       small, large))
        typer.echo(format_report(reports))

        router.meta.update({
            "data": str(data), "data_sha256": _sha256_file(data), "seed": seed,
            "in_sample": reports[0].as_dict(points=None) | {"curve": None},
            "cross_validated": (reports[1].as_dict(points=None) | {"curve": None, "folds": folds}
                                if len(reports) == 3 else None),
        })
        router.save(out)
    except (FleetLMError, ValueError, FileNotFoundError, ImportError) as e:
        _fail(e)
        return
    honest = reports[1] if len(reports) == 3 else None
    if honest is not None and honest.apgr < 0.55:
        typer.secho(f"warning: held-out APGR {honest.apgr:.3f} is close to random (0.5): "
                    "this router barely beats a coin on unseen prompts; more or cleaner data "
                    "may help", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"saved {router_file(out)}\nuse it in a route: policy: classifier, "
               f"classifier: {out}, threshold: the file of\n  fleetlm route calibrate "
               f"--router {out} --data HELD_OUT.jsonl --target-escalation 0.2 "
               f"--out {out / 'threshold.json'}")


@route_app.command("calibrate")
def route_calibrate(
    out: Annotated[Path, typer.Option("--out", help="The threshold file to write (JSON); a "
                                      "route's `threshold:` key names it.")],
    target_escalation: Annotated[float | None, typer.Option(
        help="Share of requests to escalate to the large model, in [0, 1] (e.g. 0.2).")] = None,
    target_quality: Annotated[float | None, typer.Option(
        help="Hybrid accuracy to reach with the least escalation, in (0, 1]; needs "
             "outcomes (--data).")] = None,
    relative_to_large: Annotated[bool, typer.Option(
        "--relative-to-large", help="--target-quality is a fraction of the always-large "
                                    "accuracy (0.95 = keep 95% of its quality).")] = False,
    data: Annotated[Path | None, typer.Option("--data", help=OUTCOMES_HELP + " Scores from "
                                              "--router, else a score on every row.")] = None,
    router: Annotated[Path | None, typer.Option(
        "--router", help="A trained router folder (`fleetlm route train --out`): scores the "
                         "--data prompts, for policy classifier.")] = None,
    policy: Annotated[str | None, typer.Option(
        "--policy", help="The policy that produced the recorded scores (confidence, "
                         "classifier, ...); the file records it, and a route of another "
                         "policy refuses the file.")] = None,
    scores_key: Annotated[str, typer.Option(
        "--scores-key", help="The field holding each --data row's score (without --router).")
    ] = "score",
    route: Annotated[str | None, typer.Option(
        "--route", help="Calibrate on the scores the ledger recorded for this route, instead "
                        "of --data (with --target-escalation).")] = None,
    ledger: LedgerOpt = None,
    since: SinceOpt = None,
) -> None:
    """Choose a route's threshold from data: a target share escalated or a target quality."""
    try:
        from fleetlm.router.policies import POLICY_NAMES

        problems = []
        if target_escalation is None and target_quality is None:
            problems.append("give one target: --target-escalation SHARE (e.g. 0.2) or "
                            "--target-quality ACCURACY (e.g. 0.95)")
        elif target_escalation is not None and target_quality is not None:
            problems.append("--target-escalation and --target-quality: give one, not both")
        if target_escalation is not None and not 0.0 <= target_escalation <= 1.0:
            problems.append(f"--target-escalation {target_escalation}: a share in [0, 1]")
        if target_quality is not None and not 0.0 < target_quality <= 1.0:
            problems.append(f"--target-quality {target_quality}: an accuracy in (0, 1]")
        if relative_to_large and target_quality is None:
            problems.append("--relative-to-large applies to --target-quality only; drop it")
        if data is None and route is None:
            problems.append("give the sample: --data FILE (outcomes) or --route NAME (the "
                            "scores the ledger recorded for that route)")
        elif data is not None and route is not None:
            problems.append("--data and --route: give one sample, not both")
        if route is None and (ledger is not None or since is not None):
            problems.append("--ledger and --since read the ledger: add --route NAME")
        if route is not None:
            if target_quality is not None:
                problems.append("--target-quality needs outcomes (was each answer right?), "
                                "which the ledger does not record; use --target-escalation, "
                                "or --data with an outcomes file")
            if router is not None:
                problems.append("--router scores prompts, which the ledger does not store; "
                                "its recorded scores are used as they are: drop --router")
        if policy is not None and policy not in POLICY_NAMES:
            problems.append(f"--policy {policy!r}: one of {', '.join(POLICY_NAMES)}")
        if router is not None and policy not in (None, "classifier"):
            problems.append(f"--policy {policy}: a trained router's scores are the classifier "
                            "policy's; drop --policy")
        if data is not None and router is None and policy is None:
            problems.append(f"--policy: name the policy whose scores --data holds in "
                            f"{scores_key!r} (e.g. confidence), or pass --router FOLDER")
        _check(problems)
        if route is not None:
            cal, policy_used, source, acc_levels = _calibrate_on_ledger(
                route, ledger, since, policy, target_escalation or 0.0)
        else:
            assert data is not None
            cal, policy_used, source, acc_levels = _calibrate_on_outcomes(
                data, router, policy, scores_key, target_escalation, target_quality,
                relative_to_large)
        from fleetlm.router.calibrate import calibration_meta, write_threshold

        extra: dict[str, Any] = {"route": route} if route is not None else {}
        if router is not None:
            extra["router"] = str(router)
        if acc_levels is not None:
            extra["acc_small"], extra["acc_large"] = acc_levels
        written = write_threshold(out, cal.threshold,
                                  calibration_meta(cal, policy_used, source, extra))
    except (FleetLMError, ValueError, FileNotFoundError, ImportError) as e:
        _fail(e)
        return
    goal = (f"target {target_escalation:.1%}" if target_escalation is not None else
            "least escalation reaching the quality target")
    typer.echo(f"threshold {cal.threshold:.4f} for policy {policy_used} (n={cal.n}, {source})")
    typer.echo(f"  escalates {cal.share_escalated:.1%} of the sample ({goal})")
    if cal.accuracy is not None and acc_levels is not None:
        if "accuracy_goal" in cal.target:
            typer.echo(f"  quality goal {cal.target['accuracy_goal']:.1%}"
                       + (f" ({target_quality:.0%} of always-large)" if relative_to_large else ""))
        typer.echo(f"  hybrid accuracy {cal.accuracy:.1%} (always-small {acc_levels[0]:.1%}, "
                   f"always-large {acc_levels[1]:.1%})")
    typer.echo(f"wrote {written}; a route with policy: {policy_used} takes it as "
               f"threshold: {written}")


def _calibrate_on_outcomes(data: Path, router: Path | None, policy: str | None, scores_key: str,
                           target_escalation: float | None, target_quality: float | None,
                           relative_to_large: bool
                           ) -> tuple[Any, str, str, tuple[float, float]]:
    from fleetlm.router.calibrate import (
        load_outcomes,
        outcome_arrays,
        threshold_for_escalation,
        threshold_for_quality,
    )

    prompts, small, large = outcome_arrays(load_outcomes(data))
    if router is not None:
        scores = _router_scores(router, data, prompts)[1]
        policy = "classifier"
    else:
        scores = _file_scores(data, scores_key)
    assert policy is not None
    if target_quality is not None:
        cal = threshold_for_quality(scores, small, large, target_quality,
                                    relative_to="large" if relative_to_large else "absolute")
    else:
        assert target_escalation is not None
        cal = threshold_for_escalation(scores, target_escalation, small, large)
    return cal, policy, str(data), (float(small.mean()), float(large.mean()))


def _file_scores(data: Path, key: str) -> Any:
    from fleetlm.router.calibrate import load_scores

    try:
        return load_scores(data, key)
    except ValueError as e:
        raise ConfigError(f"{e}; give every row a {key!r} number in [0, 1], name the field "
                          "with --scores-key, or score the prompts with --router FOLDER") from None


def _open_ledger(ledger: Path | None) -> Any:
    """The ledger, read-only; a missing file is an error naming --ledger."""
    from fleetlm.router.ledger import Ledger, default_ledger_path

    path = ledger if ledger is not None else default_ledger_path()
    if not path.is_file():
        raise FleetLMError(f"--ledger {path}: no ledger there. `fleetlm serve --config` "
                           "writes one as it serves routes (ledger_path in the routes config, "
                           f"default {default_ledger_path()}); pass --ledger PATH to read "
                           "another file")
    return Ledger(path, readonly=True)


def _calibrate_on_ledger(route: str, ledger: Path | None, since: str | None, policy: str | None,
                         target: float) -> tuple[Any, str, str, None]:
    from collections import Counter

    from fleetlm.router.calibrate import threshold_for_escalation
    from fleetlm.router.report import parse_since

    since_ts = parse_since(since) if since is not None else None
    with _open_ledger(ledger) as led:
        rows = led.query(since_ts, route=route)
        routes = sorted(led.savings(since_ts)["by_route"]) if not rows else []
    window = f" since {since}" if since is not None else ""
    if not rows:
        raise FleetLMError(f"--route {route}: no requests in {led.path}{window} (routes there: "
                           f"{', '.join(routes) or 'none'})")
    scored = [e for e in rows if e.score is not None]
    by_policy = Counter(e.policy for e in scored)
    if policy is not None:
        scored = [e for e in scored if e.policy == policy]
    if not scored:
        raise FleetLMError(f"--route {route}: none of its {len(rows)} requests{window} carries "
                           "a score" + (f" from policy {policy}" if policy else "")
                           + " (rules and always-* decide without one)")
    if policy is None:
        if len(by_policy) > 1:
            counts = ", ".join(f"{p or '(none)'} {k}" for p, k in by_policy.most_common())
            raise FleetLMError(f"--route {route}: scores from several policies ({counts}); "
                               "pick one with --policy")
        policy = next(iter(by_policy))
        if not policy:
            raise FleetLMError(f"--route {route}: the rows name no policy; give --policy")
    cal = threshold_for_escalation([e.score for e in scored], target)
    return cal, policy, f"ledger {led.path}, route {route}{window}", None


@route_app.command("eval")
def route_eval(
    data: Annotated[Path, typer.Option("--data", help=OUTCOMES_HELP + " Prompts the router "
                                       "was not trained on, for honest figures.")],
    router: Annotated[Path | None, typer.Option(
        "--router", help="A trained router folder (`fleetlm route train --out`).")] = None,
    scores_key: Annotated[str | None, typer.Option(
        "--scores-key", help="Also (or, without --router, instead) evaluate the scores in this "
                             "field of every --data row (default without --router: score).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="The PNG of accuracy against share escalated (default: --json's path "
                       "with .png, else ./route-eval.png).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON "
                                                  "here.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the random baseline.")] = 0,
) -> None:
    """RouteLLM-style report: APGR and CPT(50/80/95%) of the router against random and the
    oracle, and the accuracy-against-share-escalated plot."""
    try:
        import json

        from fleetlm.router.calibrate import load_outcomes, outcome_arrays
        from fleetlm.router.evaluate import (
            evaluate_scores,
            format_report,
            oracle_curve,
            plot_curves,
            report_from_curve,
        )
        from fleetlm.router.policies import RandomPolicy, RouteContext

        prompts, small, large = outcome_arrays(load_outcomes(data))
        reports = []
        if router is not None:
            trained, scores = _router_scores(router, data, prompts)
            reports.append(evaluate_scores(f"classifier [{trained.embedding_model}]", scores,
                                           small, large))
        if router is None or scores_key is not None:
            key = scores_key or "score"
            reports.append(evaluate_scores(f"scores [{key}]", _file_scores(data, key),
                                           small, large))
        rnd = RandomPolicy(seed)
        reports.append(evaluate_scores("random", [rnd.score(RouteContext(p)) for p in prompts],
                                       small, large))
        oracle = report_from_curve("oracle", oracle_curve(small, large), len(prompts))
        reports.append(oracle)
        plot_path = plot if plot is not None else (
            json_out.with_suffix(".png") if json_out is not None else Path("route-eval.png"))
        plot_curves({r.name: r.curve for r in reports if r is not oracle}, plot_path,
                    title=f"Routing on {data.name} ({len(prompts)} prompts)",
                    oracle=oracle.curve)
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps({
                "data": str(data), "n": len(prompts), "acc_small": oracle.acc_small,
                "acc_large": oracle.acc_large, "routers": [r.as_dict() for r in reports],
                "router": str(router) if router is not None else None, "seed": seed,
                "plot": str(plot_path)}, indent=2) + "\n", encoding="utf-8")
    except (FleetLMError, ValueError, FileNotFoundError, ImportError) as e:
        _fail(e)
        return
    typer.echo(format_report(reports))
    typer.echo(f"plot: {plot_path}" + (f"\njson: {json_out}" if json_out is not None else ""))


# --- fleetlm report: the cost ledger -----------------------------------------------------


def _usd(x: float) -> str:
    return f"${x:,.2f}" if abs(x) >= 100 else f"${x:.4f}"


@report_app.command("savings")
def report_savings(
    since: SinceOpt = None,
    ledger: LedgerOpt = None,
    route: Annotated[str | None, typer.Option("--route", help="Only this route.")] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Also write a PNG: cumulative cost over time, actual against the "
                       "all-large baseline.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """What routing saved: requests, decisions, tokens and cost per route, against sending
    every request to the route's first large upstream."""
    import json

    try:
        from fleetlm.router.report import parse_since, plot_cost_over_time

        since_ts = parse_since(since) if since is not None else None
        with _open_ledger(ledger) as led:
            s = led.savings(since_ts, route=route)
            series = led.cost_over_time(since_ts, route=route) if plot is not None else []
            path = led.path
        plot_path = None
        if series:
            assert plot is not None
            plot_path = plot_cost_over_time(series, plot, title="Cost over time" + (
                f": route {route}" if route else ""))
    except (FleetLMError, ValueError) as e:
        _fail(e)
        return
    where = (f" for route {route}" if route else "") + (f" since {since}" if since else "")
    if json_out:
        typer.echo(json.dumps(s | {"ledger": str(path), "route": route,
                                   "plot": str(plot_path) if plot_path else None}, indent=2))
    if s["requests"] == 0:
        typer.echo(f"no requests in {path}{where}", err=True)
        return
    if json_out:
        return
    from datetime import datetime

    from rich.console import Console
    from rich.table import Table

    span = " to ".join(datetime.fromtimestamp(s[k]).strftime("%Y-%m-%d %H:%M")
                       for k in ("first_ts", "last_ts"))
    table = Table(title=f"savings in {path}{where} ({span})")
    for col in ("route", "requests", "small", "large", "fallback", "blocked", "tokens in",
                "tokens out", "local", "upstream", "actual", "all-large", "saved", "saved %"):
        table.add_column(col, justify="left" if col == "route" else "right")

    def row(name: str, a: dict[str, Any]) -> list[str]:
        n = a["requests"]
        frac = a["saved_fraction"]
        return ([name, f"{n:,}"] + [f"{a['decisions'][d] / n:.1%}" for d in
                                    ("small", "large", "fallback", "blocked")]
                + [f"{a['prompt_tokens']:,}", f"{a['completion_tokens']:,}"]
                + [_usd(a[k]) for k in ("local_cost_usd", "upstream_cost_usd", "actual_cost_usd",
                                        "baseline_cost_usd", "saved_usd")]
                + ["n/a" if frac is None else f"{frac:.1%}"])

    for name, agg in sorted(s["by_route"].items()):
        table.add_row(*row(name, agg))
    if len(s["by_route"]) > 1:
        table.add_row(*row("total", s), style="bold")
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    notes = ["local cost charges each request the whole machine for its wall time, so under "
             "batched load the savings shown are a lower bound"]
    if s["rows_without_baseline"]:
        notes.append(f"{s['rows_without_baseline']} request(s) had no all-large baseline (no "
                     "upstream, or blocked): counted at their actual cost")
    if s["usage_estimated"]:
        notes.append(f"{s['usage_estimated']} request(s) with estimated token counts")
    if plot is not None:
        notes.append(f"plot: {plot_path}")
    typer.echo("\n".join(notes))


def main() -> None:  # pragma: no cover - console entry point
    app()
