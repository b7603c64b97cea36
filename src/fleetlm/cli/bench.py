"""``fleetlm bench ...``: the benchmarks of :mod:`fleetlm.bench`, each a config in and a
table plus JSON out. The only commands that import ``fleetlm.bench``; this module reads the
options, splits comma-separated lists and turns errors into exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleetlm.cli.options import DTypeArg, DTypeOpt, ModelOpt, QuantArg, QuantOpt, fail
from fleetlm.errors import FleetLMError

app = typer.Typer(help="Benchmarks: each prints a table and writes JSON with --out.",
                  no_args_is_help=True)

OutOpt = Annotated[Path | None, typer.Option(help="Write the results as JSON here.")]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@app.command("tune")
def bench_tune(
    config: Annotated[Path, typer.Option("--config", help="A tune config, e.g. examples/banking77.yaml.")],
    out: OutOpt = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps per throughput run.")] = 30,
    skip_pipeline: Annotated[bool, typer.Option("--skip-pipeline", help="Only the throughput comparison.")] = False,
    skip_trainer: Annotated[bool, typer.Option("--skip-trainer", help="No transformers Trainer baseline.")] = False,
) -> None:
    """`fleetlm tune CONFIG` end to end, and its training loop against transformers' Trainer."""
    from fleetlm.bench.tune import TuneBenchConfig, run

    if steps < 3:
        fail(FleetLMError(f"--steps={steps}: at least 3 (the first two are warm-up)"))
    try:
        run(TuneBenchConfig(config=config, steps=steps, skip_pipeline=skip_pipeline,
                            skip_trainer=skip_trainer), out)
    except FleetLMError as e:
        fail(e)


@app.command("route")
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
    from fleetlm.bench.route import ROUTELLM_SETS, run_clinc150, run_routellm

    if data not in (*ROUTELLM_SETS, "clinc150"):
        fail(FleetLMError(f"--data {data!r}: one of {', '.join(ROUTELLM_SETS)}, clinc150"))
    try:
        if data == "clinc150":
            run_clinc150(adapter, folds=folds, out=out, limit=limit,
                         log=lambda m: typer.echo(m, err=True))
        else:
            from fleetlm.router.classifier import MINILM_ID, MINILM_STATIC_ID

            run_routellm(ROUTELLM_SETS[data], folds=folds, out=out, limit=limit,
                         embedding_models=embedding or (MINILM_ID, MINILM_STATIC_ID),
                         log=lambda m: typer.echo(m, err=True))
    except FleetLMError as e:
        fail(e)


@app.command("serve")
def bench_serve(
    model: ModelOpt = "smollm2-135m",
    out: OutOpt = None,
    dtype: DTypeArg = DTypeOpt.auto,
    quantize: QuantArg = QuantOpt.auto,
    compile: Annotated[bool, typer.Option(help="Compiled decode steps, as `fleetlm serve` (its default).")] = True,
    num_requests: Annotated[int, typer.Option(help="Most requests per configuration.")] = 128,
    concurrency: Annotated[str, typer.Option(help="Comma-separated client counts.")] = "1,32",
    prompt_tokens: Annotated[int, typer.Option(help="Tokens per prompt.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per request.")] = 64,
    time_budget_s: Annotated[float, typer.Option(help="Seconds per configuration.")] = 300.0,
    skip_llama_cpp: Annotated[bool, typer.Option("--skip-llama-cpp", help="No llama-cpp-python server baseline.")] = False,
    llama_server: Annotated[Path | None, typer.Option(help="A llama-server binary (default: "
                                                           "$FLEETLM_LLAMA_SERVER, PATH, or "
                                                           "`make llama-server`'s build).")] = None,
    llama_server_slots: Annotated[int, typer.Option(help="llama-server --parallel.")] = 32,
    skip_llama_server: Annotated[bool, typer.Option("--skip-llama-server", help="No llama-server baseline.")] = False,
) -> None:
    """The HTTP server's overhead: the same workload in-process and over loopback HTTP;
    llama.cpp's own batching server (llama-server, same GGUF, same threads, 32 slots) when a
    binary is found; and llama-cpp-python's OpenAI server (when installed: EXTRAS=dev,bench)."""
    from fleetlm.bench.serve import ServeBenchConfig, run

    try:
        try:
            levels = [int(x) for x in concurrency.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"--concurrency {concurrency!r}: comma-separated integers") from None
        run(ServeBenchConfig(model=model, dtype=dtype.value, quantize=quantize.value,
                             compile=compile, num_requests=num_requests,
                             concurrency=levels, prompt_tokens=prompt_tokens,
                             max_new_tokens=max_new_tokens, time_budget_s=time_budget_s,
                             llama_cpp=not skip_llama_cpp, llama_server=llama_server,
                             llama_server_slots=llama_server_slots,
                             skip_llama_server=skip_llama_server), out)
    except (FleetLMError, ValueError) as e:
        fail(e)


@app.command("decode")
def bench_decode(
    model: ModelOpt = "smollm2-135m",
    out: OutOpt = None,
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per measurement.")] = 128,
    repeats: Annotated[int, typer.Option(help="Measurements per configuration (median is reported).")] = 3,
    prompt_lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths.")] = "16,512",
    skip: Annotated[str, typer.Option(help="Comma-separated systems to skip: fleetlm-float32, "
                                            "fleetlm-bfloat16, fleetlm-int8, fleetlm-int4, transformers, llama.cpp")] = "",
    compile: Annotated[bool, typer.Option("--compile/--no-compile",
                                          help="torch.compile fleetlm's decode step.")] = True,
) -> None:
    """Single-stream decode tok/s and TTFT: fleetlm vs transformers vs llama.cpp."""
    from fleetlm.bench.decode import DecodeBenchConfig, run

    try:
        cfg = DecodeBenchConfig(
            model=model, new_tokens=new_tokens, repeats=repeats,
            prompt_lengths=[int(x) for x in prompt_lengths.split(",") if x.strip()],
            skip=_names(skip), compile=compile,
        )
        run(cfg, out)
    except (FleetLMError, ValueError) as e:
        fail(e)


@app.command("prefix")
def bench_prefix(
    model: ModelOpt = "smollm2-135m",
    out: OutOpt = None,
    dtype: DTypeArg = DTypeOpt.auto,
    quantize: QuantArg = QuantOpt.auto,
    compile: Annotated[bool, typer.Option(help="Compiled decode steps, as `fleetlm serve` (its default).")] = True,
    prefix_tokens: Annotated[int, typer.Option(help="Tokens every prompt shares.")] = 500,
    suffix_tokens: Annotated[int, typer.Option(help="Tokens of each prompt's own ending.")] = 16,
    requests: Annotated[int, typer.Option(help="Timed requests per run.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per request (compared between runs).")] = 16,
) -> None:
    """Time to first token with a shared prompt prefix: prefix caching off, then on."""
    from fleetlm.bench.prefix import PrefixBenchConfig, run

    try:
        run(PrefixBenchConfig(model=model, dtype=dtype.value, quantize=quantize.value,
                              compile=compile, prefix_tokens=prefix_tokens,
                              suffix_tokens=suffix_tokens, requests=requests,
                              max_new_tokens=max_new_tokens), out)
    except (FleetLMError, ValueError) as e:
        fail(e)


@app.command("speculative")
def bench_speculative(
    model: ModelOpt = "smollm2-135m",
    out: OutOpt = None,
    dtype: DTypeArg = DTypeOpt.auto,
    quantize: QuantArg = QuantOpt.auto,
    compile: Annotated[bool, typer.Option(help="Compiled decode steps, as `fleetlm serve` (its default).")] = True,
    speculative_tokens: Annotated[int, typer.Option(help="Draft tokens checked per step.")] = 6,
    draft_model: Annotated[str | None, typer.Option(help="Also run with this draft model (the served model's tokenizer) proposing where prompt lookup finds nothing.")] = None,
    passage_words: Annotated[int, typer.Option(help="Words of the passage to copy.")] = 80,
    requests: Annotated[int, typer.Option(help="Timed requests per run.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Most greedy tokens per request.")] = 96,
) -> None:
    """Single-stream decode of an extraction-style request with and without prompt-lookup
    speculative decoding (and with a draft model, if given); the tokens must be identical."""
    from fleetlm.bench.speculative import SpecBenchConfig, run

    try:
        run(SpecBenchConfig(model=model, dtype=dtype.value, quantize=quantize.value,
                            compile=compile, speculative_tokens=speculative_tokens,
                            draft_model=draft_model, passage_words=passage_words, requests=requests,
                            max_new_tokens=max_new_tokens), out)
    except (FleetLMError, ValueError) as e:
        fail(e)


@app.command("adapters")
def bench_adapters(
    model: ModelOpt = "smollm2-135m",
    out: OutOpt = None,
    dtype: DTypeArg = DTypeOpt.auto,
    quantize: QuantArg = QuantOpt.auto,
    compile: Annotated[bool, typer.Option(help="Compiled decode steps, as `fleetlm serve` (its default).")] = True,
    num_requests: Annotated[int, typer.Option(help="Requests per configuration.")] = 256,
    concurrency: Annotated[int, typer.Option(help="Requests in flight (closed loop).")] = 32,
    prompt_tokens: Annotated[int, typer.Option(help="Tokens per prompt.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per request.")] = 64,
    adapter_counts: Annotated[str, typer.Option(help="Comma-separated numbers of distinct adapters.")] = "1,8,64,256",
    popularities: Annotated[str, typer.Option(help="Comma-separated: uniform, zipf.")] = "uniform,zipf",
    max_hot_adapters: Annotated[int, typer.Option(help="Adapter slots in the engine.")] = 64,
    max_batch: Annotated[int | None, typer.Option(help="The engine's batch (default: --concurrency); smaller, a queue forms.")] = None,
    max_overtakes: Annotated[int, typer.Option(help="As fleetlm serve: later requests admitted ahead of a waiting one to group adapters (0: arrival order).")] = 64,
    repeat: Annotated[int, typer.Option(help="Rounds of (no adapters, each adapter setting), interleaved; medians reported.")] = 1,
    lora_dtype: Annotated[str, typer.Option(help="The hot adapters' dtype, as fleetlm serve: auto, float32, bfloat16 or int8.")] = "auto",
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
            model=model, dtype=dtype.value, quantize=quantize.value, compile=compile,
            num_requests=num_requests,
            concurrency=concurrency, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens,
            adapter_counts=ints(adapter_counts), popularities=_names(popularities),
            max_hot_adapters=max_hot_adapters, lora_dtype=lora_dtype,
            max_batch=max_batch, max_overtakes=max_overtakes, repeat=repeat,
            baseline_budget_s=baseline_budget_s,
            switching_requests=switching_requests, mixed_requests=mixed_requests,
            continuous_requests=continuous_requests, skip=_names(skip),
            adapters_dir=adapters_dir)
        run(cfg, out)
    except (FleetLMError, ValueError) as e:
        fail(e)


@app.command("pii")
def bench_pii(
    out: OutOpt = None,
    data: Annotated[list[str] | None, typer.Option(
        help="A data set, repeatable: synthetic-val, support-v1 (the two defaults), "
             "synthetic-train, synthetic-all, or the path of a file in presidio's "
             "synthetic-set format (scored whole).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N examples of each set.")] = None,
    latency_messages: Annotated[int, typer.Option(help="100-word messages timed per set.")] = 200,
    chat_requests: Annotated[int, typer.Option(help="Chat-request round trips (redact + restore) timed per set.")] = 200,
    pii_config: Annotated[Path | None, typer.Option(help="A YAML file of PiiConfig keys (default: PiiConfig()).")] = None,
) -> None:
    """PII detection per data set: precision, recall and F2 per entity type, the share of
    personal data left in the clear, detection latency per 100-word message, and the
    redact + restore cost of an escalated request."""
    from fleetlm.bench.pii import DEFAULT_SETS, PiiBenchConfig, load_pii_config, run

    try:
        pii = load_pii_config(pii_config) if pii_config is not None else None
        cfg = PiiBenchConfig(data=data or list(DEFAULT_SETS), limit=limit,
                             latency_messages=latency_messages, chat_requests=chat_requests,
                             **({"pii": pii} if pii is not None else {}))
        run(cfg, out)
    except (FleetLMError, ValueError) as e:
        fail(e)


@app.command("fuzz")
def bench_fuzz(
    out: OutOpt = None,
    cases: Annotated[int, typer.Option(help="Generated requests in all (schema-valid and schema-violating), over every operation.")] = 2000,
    seed: Annotated[int, typer.Option(help="Hypothesis seed: the same seed generates the same requests.")] = 0,
    model: Annotated[str, typer.Option("--model", "-m", help="tiny (smollm2-135m's tokenizer and chat template on random 2-layer weights: the HTTP edge is fuzzed, not the weights) or any model `fleetlm serve` takes.")] = "tiny",
    max_len: Annotated[int, typer.Option(help="The engine's prompt + generated tokens per sequence.")] = 128,
    keys: Annotated[bool, typer.Option("--keys/--no-keys", help="Serve with a state store and send an admin key with every case (the gateway on every request's path).")] = False,
) -> None:
    """Schemathesis against the server's own OpenAPI document: no 5xx, answers as declared
    and OpenAI-shaped, the server healthy afterwards (needs the dev extra)."""
    try:
        import schemathesis  # noqa: F401
    except ImportError:
        fail(FleetLMError("bench fuzz needs schemathesis: pip install -e '.[dev]' (or make install)"))
    from fleetlm.bench.fuzz import FuzzBenchConfig, run

    try:
        run(FuzzBenchConfig(model=model, cases=cases, seed=seed, max_len=max_len, keys=keys),
            out)
    except (FleetLMError, ValueError) as e:
        fail(e)


@app.command("soak")
def bench_soak(
    out: OutOpt = None,
    minutes: Annotated[float | None, typer.Option(help="Length of the whole run (warm-up 10%, then without and with hostile clients, 45% each).")] = None,
    seconds: Annotated[float | None, typer.Option(help="The same in seconds (short checks); instead of --minutes.")] = None,
    clients: Annotated[int, typer.Option(help="Well-behaved closed-loop clients, in every phase.")] = 4,
    hostile: Annotated[float, typer.Option(help="Hostile clients per well-behaved one, added in the hostile phase (rounded up).")] = 0.1,
    model: ModelOpt = "smollm2-135m",
    dtype: DTypeArg = DTypeOpt.auto,
    adapters: Annotated[int, typer.Option(help="Random adapters in the server's store.")] = 3,
    max_tokens: Annotated[int, typer.Option(help="Tokens per well-behaved request.")] = 24,
    deadline_s: Annotated[float, typer.Option(help="A request with no answer after this long is hung.")] = 120.0,
    compile: Annotated[bool, typer.Option(help="The server's --compile/--no-compile (its default: compiled decode steps).")] = True,
) -> None:
    """A real server under load for minutes, with and without hostile clients: RSS growth,
    lost and hung requests, TTFT with and without, throughput (targets pass/fail)."""
    from pydantic import ValidationError

    from fleetlm.bench.soak import SoakBenchConfig, run

    if (minutes is None) == (seconds is None):
        fail(FleetLMError("give the length as --minutes N or --seconds N (one of them)"))
    length = seconds if seconds is not None else 60 * (minutes or 0)
    try:
        run(SoakBenchConfig(model=model, dtype=dtype.value, seconds=length,
                            clients=clients, hostile=hostile, adapters=adapters,
                            max_tokens=max_tokens, deadline_s=deadline_s, compile=compile),
            out)
    except ValidationError as e:
        fail(FleetLMError("; ".join(f"--{'-'.join(str(x) for x in err['loc'])}: {err['msg']}"
                                    for err in e.errors())))
    except (FleetLMError, ValueError) as e:
        fail(e)


@app.command("gateway")
def bench_gateway(
    out: OutOpt = None,
    requests: Annotated[int, typer.Option(help="Requests per endpoint to each server (interleaved).")] = 1000,
    model: ModelOpt = "smollm2-135m",
) -> None:
    """What keys and tenants' limits add to a request: an open and a keyed server over one
    engine, the same requests interleaved, the difference of the medians (target <= 0.5 ms)."""
    import json

    from fleetlm.bench.gateway import run_gateway

    if requests < 10:
        fail(FleetLMError(f"--requests {requests}: send at least 10 per endpoint"))
    try:
        result = run_gateway(requests=requests, model=model, out=out)
    except (FleetLMError, ValueError) as e:
        fail(e)
        return
    typer.echo(json.dumps({k: result[k] for k in ("endpoints", "in_process", "pass")}, indent=2))


@app.command("cluster")
def bench_cluster(
    model: ModelOpt = "smollm2-135m",
    out: OutOpt = None,
    dtype: DTypeArg = DTypeOpt.auto,
    quantize: QuantArg = QuantOpt.auto,
    compile: Annotated[bool, typer.Option(help="Compiled decode steps, as `fleetlm serve` (its default).")] = True,
    concurrency: Annotated[int, typer.Option(help="Concurrent streaming clients.")] = 32,
    num_requests: Annotated[int, typer.Option(help="Requests per throughput measurement (base model).")] = 96,
    adapter_requests: Annotated[int, typer.Option(help="Requests of the adapter-routing measurements.")] = 192,
    adapters: Annotated[int, typer.Option(help="Distinct adapters (random, rank --rank).")] = 64,
    hot_per_replica: Annotated[int, typer.Option(help="Hot adapters per engine replica.")] = 16,
    replicas: Annotated[int, typer.Option(help="Engine replicas of the adapter-routing runs (one thread each).")] = 2,
    stream_interval: Annotated[int, typer.Option(help="The overhead phase also runs Ray with this many tokens per replica-to-ingress message.")] = 4,
    rounds: Annotated[int, typer.Option(help="Alternations of the overhead phase's systems (medians reported).")] = 1,
    step_s: Annotated[float, typer.Option(help="Seconds the scale-up phase's step in load lasts.")] = 90.0,
    rank: Annotated[int, typer.Option(help="LoRA rank of the generated adapters.")] = 16,
    prompt_tokens: Annotated[int, typer.Option(help="Tokens per prompt.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per request.")] = 32,
    skip: Annotated[str, typer.Option(help="Comma-separated phases to leave out: overhead, affinity, cold-start, scale-up.")] = "",
) -> None:
    """Ray Serve against one process: the Ray path's throughput loss (one replica), adapter-
    affine against random routing (hot-hit rate, throughput), cold start from zero replicas,
    and scale-up time under a step in load; each system started as `fleetlm serve [--ray]`."""
    from fleetlm.bench.cluster import ClusterBenchConfig, run

    try:
        run(ClusterBenchConfig(model=model, dtype=dtype.value, quantize=quantize.value,
                               compile=compile, concurrency=concurrency,
                               num_requests=num_requests, adapter_requests=adapter_requests,
                               adapters=adapters, hot_per_replica=hot_per_replica,
                               replicas=replicas, stream_interval=stream_interval,
                               rounds=rounds, step_s=step_s, rank=rank, prompt_tokens=prompt_tokens,
                               max_new_tokens=max_new_tokens, skip=_names(skip)), out)
    except (FleetLMError, ValueError) as e:
        fail(e)


@app.command("export")
def bench_export(
    model: ModelOpt = "smollm2-135m",
    out: OutOpt = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter to merge (folder or store name; default: a random one of rank --rank).")] = None,
    rank: Annotated[int, typer.Option(help="Rank of the random adapter.")] = 16,
    gguf: Annotated[str, typer.Option(help="Comma-separated GGUF types to export and check.")] = "f32,f16,q8_0,q4_0",
    prompts: Annotated[int, typer.Option(help="Prompts of the greedy-parity check.")] = 8,
    prompt_tokens: Annotated[int, typer.Option(help="Tokens per prompt.")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per request.")] = 32,
    concurrency: Annotated[int, typer.Option(help="Streams of the speed phase's second measurement.")] = 8,
    num_requests: Annotated[int, typer.Option(help="Requests of that measurement.")] = 32,
    llama_server: Annotated[Path | None, typer.Option(help="llama-server binary (default: $FLEETLM_LLAMA_SERVER, PATH, or `make llama-server`'s).")] = None,
) -> None:
    """`fleetlm export` measured: file sizes, llama.cpp's greedy parity on each GGUF type
    against fleetlm on the merged folder, and decode speed (llama-server on q8_0 against
    `fleetlm serve` on the merged folder)."""
    from fleetlm.bench.export import ExportBenchConfig, run

    try:
        run(ExportBenchConfig(model=model, adapter=adapter, rank=rank, gguf=_names(gguf),
                              prompts=prompts, prompt_tokens=prompt_tokens,
                              max_new_tokens=max_new_tokens, concurrency=concurrency,
                              num_requests=num_requests, llama_server=llama_server), out)
    except (FleetLMError, ValueError) as e:
        fail(e)


@app.command("prune")
def bench_prune(
    run: Annotated[Path, typer.Option(help="A finished `fleetlm tune` run folder (a classification task).")],
    out: OutOpt = None,
    work_dir: Annotated[Path | None, typer.Option(help="Where the merged, pruned and distilled models go (default: RUN/bench-prune).")] = None,
    mlp: Annotated[float, typer.Option(help="Fraction of MLP channels pruned (fleetlm prune --mlp).")] = 0.5,
    layers: Annotated[int, typer.Option(help="Whole layers removed (fleetlm prune --layers).")] = 2,
    kv_groups: Annotated[int, typer.Option(help="Key/value head groups removed per layer.")] = 0,
    distill_steps: Annotated[int, typer.Option(help="Distillation steps from the merged model.")] = 200,
    tune_steps: Annotated[int, typer.Option(help="Steps of the comparison: the pruned model LoRA-tuned without distillation (0: skip).")] = 200,
    batch_size: Annotated[int, typer.Option(help="Rows per distillation step.")] = 8,
    learning_rate: Annotated[float, typer.Option(help="Distillation learning rate.")] = 2e-4,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 1.0,
    eval_rows: Annotated[int, typer.Option(help="Validation rows every model answers (a sample seeded like the tune run's evaluation).")] = 300,
) -> None:
    """Merged adapter -> pruned -> distilled, against the pruned model tuned without
    distillation: parameters, accuracy, evaluation time and decode speed of each."""
    from rich.console import Console

    from fleetlm.bench.prune import PruneBenchConfig
    from fleetlm.bench.prune import run as run_bench

    console = Console(stderr=True)
    try:
        r = run_bench(PruneBenchConfig(run=run, work_dir=work_dir, mlp=mlp, layers=layers,
                                       kv_groups=kv_groups, distill_steps=distill_steps,
                                       tune_steps=tune_steps, batch_size=batch_size,
                                       learning_rate=learning_rate, temperature=temperature,
                                       eval_rows=eval_rows), out, say=console.print)
    except (FleetLMError, ValueError) as e:
        fail(e)
    ratios = r["ratios"]
    console.print(f"parameters {ratios['parameter_reduction']:.1%} fewer, accuracy drop "
                  f"{ratios['accuracy_drop_distilled']:+.3f} (distilled), decode speed-up "
                  + (f"{ratios['decode_speedup']:.2f}x" if ratios["decode_speedup"] else "-")
                  + f"; targets met: {ratios['targets_met']}")
