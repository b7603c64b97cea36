"""The ``fleetlm`` command line: the table of its commands, and nothing else.

    generate.py   fleetlm generate          one prompt, streamed (engine/generate, engine/oneshot)
    serve.py      fleetlm serve             the OpenAI-compatible server (server/, engine/)
    tune.py       fleetlm tune              raw data to a served adapter (tune/)
    select.py     fleetlm select            candidate bases tuned alike, compared (tune/select)
    export.py     fleetlm export            adapter merged, as HF folder and GGUF (compress/)
    distill.py    fleetlm distill           a student trained on a teacher's logits (compress/)
    prune.py      fleetlm prune             calibration-data pruning (compress/)
    bench.py      fleetlm bench ...         the benchmarks (bench/; the only importer of it)
    adapters.py   fleetlm adapters ...      the adapter store (adapters/listing)
    route.py      fleetlm route ...         train, calibrate, evaluate a router (router/)
    report.py     fleetlm report savings    the cost ledger's savings (router/report)
    keys.py       fleetlm keys ...          API keys: create (shown once), list, revoke (state/)
    tenants.py    fleetlm tenants ...       tenants and their policies: create, list, set (state/)
    audit.py      fleetlm audit             the audit log (state/audit)
    privacy.py    fleetlm privacy train     the learned PII recognizer's weights (privacy/learned)
    options.py    the options several commands share, and ``fail`` (error -> exit code 2)

Each command declares its options, calls into the package that does the work, prints, and
turns a FleetLMError into ``error: ...`` and exit code 2. Heavy imports (torch,
transformers) happen inside the commands, never at import. The CLI knows no domain logic:
routing, tuning, serving and benchmarking live in their packages.
"""

from __future__ import annotations

import typer

from fleetlm.cli import (
    adapters,
    audit,
    bench,
    distill,
    export,
    generate,
    keys,
    privacy,
    prune,
    report,
    route,
    select,
    serve,
    tenants,
    tune,
)

app = typer.Typer(
    help="fleetlm: serve, route and tune small language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# commands at the top level (a nameless sub-app adds its commands as they are)
app.add_typer(generate.app)  # fleetlm generate
app.add_typer(serve.app)  # fleetlm serve
app.add_typer(tune.app)  # fleetlm tune
app.add_typer(select.app)  # fleetlm select
app.add_typer(audit.app)  # fleetlm audit
app.add_typer(export.app)  # fleetlm export
app.add_typer(distill.app)  # fleetlm distill
app.add_typer(prune.app)  # fleetlm prune
# groups: fleetlm GROUP COMMAND
app.add_typer(bench.app, name="bench")
app.add_typer(adapters.app, name="adapters")
app.add_typer(route.app, name="route")
app.add_typer(report.app, name="report")
app.add_typer(keys.app, name="keys")
app.add_typer(tenants.app, name="tenants")
app.add_typer(privacy.app, name="privacy")


# commands that run long on the CPU: restarted with jemalloc where it is installed
# (fleetlm/allocator.py: glibc's malloc keeps what tuning frees)
LONG_RUNNING = frozenset({"tune", "select", "distill"})


def main() -> None:  # pragma: no cover - console entry point
    import sys

    if len(sys.argv) > 1 and sys.argv[1] in LONG_RUNNING:
        from fleetlm.allocator import reexec_with_jemalloc
        from fleetlm.errors import ConfigError

        try:
            reexec_with_jemalloc([sys.executable, "-m", "fleetlm", *sys.argv[1:]])
        except ConfigError as e:
            sys.exit(f"fleetlm: error: {e}")
    app()
