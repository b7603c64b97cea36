"""``fleetlm serve``: the model and every adapter in the store over an OpenAI-compatible
HTTP API, optionally behind the routes of a config file.

Wiring only: the options become :class:`fleetlm.server.run.ServeSettings`;
:func:`fleetlm.server.run.build` loads and assembles, :func:`fleetlm.server.run.run` serves
until a signal stops it. With ``--ray`` the ``--ray-*``/replica options also become
:class:`fleetlm.cluster.settings.ClusterSettings` and :func:`fleetlm.cluster.deploy.run`
serves the same API from a Ray Serve application (docs/scale-out.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fleetlm.cli.options import (
    AdaptersDirArg,
    DTypeArg,
    DTypeOpt,
    ModelOpt,
    QuantArg,
    QuantOpt,
    fail,
)
from fleetlm.errors import FleetLMError

if TYPE_CHECKING:
    from fleetlm.server.run import ServeSettings

app = typer.Typer()


@app.command()
def serve(
    model: ModelOpt = "smollm2-135m",
    adapters_dir: AdaptersDirArg = None,
    adapters_url: Annotated[str | None, typer.Option(help="Adapters in an object store (s3://bucket/prefix, gs://..., file:///...; fsspec, with the protocol's package installed): each process serves local copies kept in --adapters-dir (default: under the cache), refreshed within --adapters-refresh-s of a change (docs/scale-out.md).")] = None,
    adapters_refresh_s: Annotated[float, typer.Option(help="With --adapters-url: seconds a local copy is served without asking the remote whether it changed; 0 asks on every request for the adapter (never stale, one listing each).")] = 5.0,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    dtype: DTypeArg = DTypeOpt.auto,
    quantize: QuantArg = QuantOpt.auto,
    compile: Annotated[bool, typer.Option(help="torch.compile the decode step (built at start, cached on disk; docs/engine.md).")] = True,
    prefix_cache_mb: Annotated[float, typer.Option(help="MiB of keys and values of shared prompt prefixes, reused by later requests (0: off).")] = 256.0,
    speculative_tokens: Annotated[int, typer.Option(help="Draft tokens checked per step for greedy requests, from prompt lookup (0: off; docs/engine.md).")] = 0,
    draft_model: Annotated[str | None, typer.Option(help="A small model with the served model's tokenizer (embedded name, folder or .gguf) that proposes the draft tokens where prompt lookup finds none; needs --speculative-tokens.")] = None,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together (KV cache rows).")] = 32,
    max_len: Annotated[int, typer.Option(help="Prompt + generated tokens per sequence.")] = 2048,
    max_hot_adapters: Annotated[int, typer.Option(help="Adapters held in the engine's LoRA slots.")] = 32,
    max_overtakes: Annotated[int, typer.Option(help="When more requests wait than the batch has room for, later requests for adapters already in the batch may go first, so steps read fewer adapters; no request is passed by more than this many (0: arrival order; docs/engine.md).")] = 64,
    max_lora_rank: Annotated[int, typer.Option(help="Largest adapter rank accepted.")] = 16,
    lora_dtype: Annotated[str, typer.Option(help="The hot adapters' dtype: bfloat16 halves their memory under a float32 model (the delta is then computed in bfloat16); int8 halves it again (a scale per row/column); auto picks bfloat16 where the CPU has native bfloat16, else the model's dtype (docs/engine.md).")] = "auto",
    config: Annotated[Path | None, typer.Option(help="Routes config (YAML): route names become models that answer with the small model or escalate to a large upstream (docs/router.md).")] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body in MiB; larger ones are refused with 413 (docs/limits.md).")] = 4.0,
    max_upload_mb: Annotated[float, typer.Option(help="Largest adapter upload (its files) in MiB; larger ones are refused with 413.")] = 512.0,
    state_db: Annotated[str | None, typer.Option(help="State store (keys, tenants, audit log, cost ledger): a SQLite path or a postgresql:// URL; default $FLEETLM_STATE_DB, else $FLEETLM_HOME/state.db (docs/security.md).")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Serve from a Ray Serve application: an ingress and autoscaled engine replicas, requests routed to a replica that holds their adapter (docs/scale-out.md).")] = False,
    ray_address: Annotated[str | None, typer.Option(help="With --ray: an existing cluster (auto, ray://HOST:10001); default: start a local one.")] = None,
    min_replicas: Annotated[int, typer.Option(help="With --ray: fewest engine replicas (0: none while idle; the first request waits for one).")] = 1,
    max_replicas: Annotated[int, typer.Option(help="With --ray: most engine replicas.")] = 1,
    replica_threads: Annotated[int, typer.Option(help="With --ray: CPUs (torch threads) per engine replica.")] = 1,
    ingress_replicas: Annotated[int, typer.Option(help="With --ray: HTTP ingress replicas (more than one needs a shared --state-db, e.g. PostgreSQL).")] = 1,
    stream_interval: Annotated[int, typer.Option(help="With --ray: tokens an engine replica sends the ingress per message after the first (fewer messages, less CPU; clients still get one chunk per token, in bursts).")] = 1,
    adapter_affinity: Annotated[bool, typer.Option(help="With --ray: send requests for an adapter to a replica that holds it (Serve's model multiplexing); --no-adapter-affinity routes them like any request.")] = True,
    target_ongoing_requests: Annotated[float, typer.Option(help="With --ray: requests in flight per replica the autoscaler aims for.")] = 16.0,
    downscale_delay_s: Annotated[float, typer.Option(help="With --ray: seconds below target before a replica is removed.")] = 120.0,
    downscale_to_zero_delay_s: Annotated[float, typer.Option(help="With --ray and --min-replicas 0: idle seconds before the last replica goes.")] = 300.0,
) -> None:
    """Serve the model (and every adapter in the store) over an OpenAI-compatible HTTP API."""
    from pydantic import ValidationError

    from fleetlm.config import format_errors, problems_error
    from fleetlm.server.run import ServeSettings, build, run

    try:
        settings = ServeSettings(model=model, adapters_dir=adapters_dir,
                                 adapters_url=adapters_url,
                                 adapters_refresh_s=adapters_refresh_s, host=host, port=port,
                                 dtype=dtype.value, quantize=quantize.value, compile=compile,
                                 prefix_cache_mb=prefix_cache_mb,
                                 speculative_tokens=speculative_tokens,
                                 draft_model=draft_model, max_batch=max_batch, max_len=max_len,
                                 max_hot_adapters=max_hot_adapters, max_overtakes=max_overtakes,
                                 max_lora_rank=max_lora_rank,
                                 lora_dtype=lora_dtype, config=config, max_body_mb=max_body_mb,
                                 max_upload_mb=max_upload_mb, state_db=state_db)
    except ValidationError as e:  # each line names its option: --max-body-mb: ...
        fail(problems_error(None, "options", option_lines(format_errors(e, "fleetlm serve --help"))))
    if ray:
        _serve_ray(settings, ray_address=ray_address, min_replicas=min_replicas,
                   max_replicas=max_replicas, replica_threads=replica_threads,
                   ingress_replicas=ingress_replicas, stream_interval=stream_interval,
                   adapter_affinity=adapter_affinity,
                   target_ongoing_requests=target_ongoing_requests,
                   downscale_delay_s=downscale_delay_s,
                   downscale_to_zero_delay_s=downscale_to_zero_delay_s)
        return
    try:
        served = build(settings, say=lambda line: typer.echo(line, err=True))
        source = f"{adapters_url} (copies in {served.adapters_root})" if adapters_url \
            else str(served.adapters_root)
        typer.echo(f"fleetlm: serving {served.name!r} with adapters from {source} "
                   f"on http://{host}:{port}/v1", err=True)
        run(served)
    except FleetLMError as e:
        fail(e)
        return
    typer.echo("fleetlm: stopped", err=True)


def _serve_ray(settings: ServeSettings, ray_address: str | None, **replicas: Any) -> None:
    from pydantic import ValidationError

    from fleetlm.cluster.deploy import run
    from fleetlm.cluster.settings import ClusterSettings
    from fleetlm.config import format_errors, problems_error

    try:
        cluster = ClusterSettings(address=ray_address, **replicas)
    except ValidationError as e:
        fail(problems_error(None, "options", option_lines(format_errors(e, "fleetlm serve --help"))))
    try:
        run(settings, cluster, say=lambda line: typer.echo(line, err=True))
    except FleetLMError as e:
        fail(e)
        return
    typer.echo("fleetlm: stopped", err=True)


def option_lines(lines: list[str]) -> list[str]:
    """Settings errors as option errors: ``max_body_mb: ...`` -> ``--max-body-mb: ...``; a
    check across options (no single field) keeps its message, which names them."""
    out = []
    for line in lines:
        field, _, rest = line.partition(":")
        out.append(rest.strip() if field.strip() == "(top level)"
                   else "--" + field.replace("_", "-") + ":" + rest)
    return out
