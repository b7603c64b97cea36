"""``fleetlm adapters list|add|remove``: the adapter store from the command line. The store
is :class:`fleetlm.adapters.store.AdapterStore`, opened and described by
:mod:`fleetlm.adapters.listing`; this module reads the options and prints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fleetlm.cli.options import fail
from fleetlm.errors import FleetLMError

app = typer.Typer(help="The adapter store: list, add and remove PEFT LoRA adapters.",
                  no_args_is_help=True)

AdaptersDirOpt = Annotated[Path | None, typer.Option(
    "--adapters-dir", help="Adapter store folder (default: $FLEETLM_HOME/adapters, else "
                           "$XDG_DATA_HOME/fleetlm/adapters or ~/.local/share/fleetlm/adapters).")]
AdapterModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="Base model the adapters must fit (only its config is read).")]
MaxRankOpt = Annotated[int, typer.Option("--max-lora-rank", help="Largest LoRA rank accepted.")]
AdaptersUrlOpt = Annotated[str | None, typer.Option(
    "--adapters-url", help="Adapters in an object store (s3://bucket/prefix, any fsspec URL; "
                           "--adapters-dir then holds the local copies; docs/scale-out.md).")]


@app.command("list")
def adapters_list(
    adapters_dir: AdaptersDirOpt = None,
    adapters_url: AdaptersUrlOpt = None,
    model: AdapterModelOpt = "smollm2-135m",
    max_lora_rank: MaxRankOpt = 64,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the adapters in the store (folders that fail validation are reported on stderr)."""
    from fleetlm.adapters.listing import listing_json, listing_table, open_store

    try:
        store = open_store(adapters_dir, model, max_lora_rank, adapters_url)
        good, bad = store.scan()
    except FleetLMError as e:
        fail(e)
    if json_out:
        typer.echo(listing_json(store.root, good, bad))
    elif good:
        from rich.console import Console

        # piped output is not cut to 80 columns: names and paths stay whole for grep
        Console(width=None if sys.stdout.isatty() else 200).print(listing_table(store.root, good))
    elif not bad:
        typer.echo(f"no adapters in {store.root} (add one with: fleetlm adapters add PATH)")
    for err in bad:
        typer.secho(f"warning: skipped invalid {err}", fg=typer.colors.YELLOW, err=True)


@app.command("add")
def adapters_add(
    path: Annotated[Path, typer.Argument(help="PEFT adapter folder (adapter_config.json + "
                                              "adapter_model.safetensors).")],
    name: Annotated[str | None, typer.Option("--name", help="Store it under this name "
                                                            "(default: the folder's name).")] = None,
    adapters_dir: AdaptersDirOpt = None,
    adapters_url: AdaptersUrlOpt = None,
    model: AdapterModelOpt = "smollm2-135m",
    max_lora_rank: MaxRankOpt = 64,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an adapter of that name.")] = False,
) -> None:
    """Validate an adapter against the base model and copy it into the store."""
    from fleetlm.adapters.listing import describe, open_store

    try:
        store = open_store(adapters_dir, model, max_lora_rank, adapters_url)
        info = store.add(path, name, overwrite=overwrite)
    except FleetLMError as e:
        fail(e)
    typer.echo(f"added {describe(info)}")


@app.command("remove")
def adapters_remove(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    adapters_dir: AdaptersDirOpt = None,
    adapters_url: AdaptersUrlOpt = None,
) -> None:
    """Delete an adapter from the store."""
    from fleetlm.adapters.listing import open_store

    try:
        store = open_store(adapters_dir, None, url=adapters_url)
        store.remove(name)
    except FleetLMError as e:
        fail(e)
    typer.echo(f"removed adapter {name!r} from {adapters_url or store.root}")
