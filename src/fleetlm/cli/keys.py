"""``fleetlm keys create|list|revoke``: the server's API keys, in the state store
(:mod:`fleetlm.state.keys`; created and revoked through :mod:`fleetlm.state.admin`, which
writes the audit event with actor ``cli:<os user>``).

``create`` prints the secret alone on stdout, once (``KEY=$(fleetlm keys create ...)``), and
what it made on stderr; only the secret's hash is stored.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from fleetlm.cli.options import StateDbOpt, fail, show
from fleetlm.errors import FleetLMError

app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)


class RoleOpt(StrEnum):
    admin = "admin"
    user = "user"


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant the key acts for "
                                                         "(fleetlm tenants create NAME).")],
    role: Annotated[RoleOpt, typer.Option("--role", help="admin: also manages adapters, keys "
                                                         "and tenants; user: calls models.")],
    name: Annotated[str, typer.Option("--name", help="A label for people (who holds it).")] = "",
    expires: Annotated[str | None, typer.Option(
        "--expires", help="When it stops working: a duration from now (30d, 12h) or an ISO "
                          "date or date-time (2027-01-31, local time without an offset). "
                          "Default: never.")] = None,
    state_db: StateDbOpt = None,
) -> None:
    """Create a key and print it ONCE on stdout; only its hash is stored."""
    from fleetlm.state import cli_actor, open_state
    from fleetlm.state.admin import create_key
    from fleetlm.state.keys import parse_expires
    from fleetlm.state.listing import when

    try:
        until = parse_expires(expires) if expires is not None else None
        with open_state(state_db) as db:
            secret, key = create_key(db, tenant, role.value, name=name, expires=until,
                                     actor=cli_actor())
    except FleetLMError as e:
        fail(e)
    typer.echo(secret)
    typer.echo(f"created {key.id} (tenant {key.tenant}, role {key.role}, expires "
               f"{when(key.expires) or 'never'}): the key above is shown once; only its hash "
               "is stored", err=True)


@app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's keys.")] = None,
    json_out: JsonOpt = False,
    state_db: StateDbOpt = None,
) -> None:
    """List the keys: id, prefix, tenant, role, name, created, expires, status."""
    from fleetlm.state import KeyStore, open_state
    from fleetlm.state.listing import keys_json, keys_table

    try:
        with open_state(state_db) as db:
            keys = KeyStore(db).list(tenant)
    except FleetLMError as e:
        fail(e)
    if json_out:
        typer.echo(keys_json(keys))
    elif keys:
        show(keys_table(keys))
    else:
        typer.echo("no API keys" + (f" for tenant {tenant}" if tenant else "")
                   + " (create one: fleetlm keys create --tenant T --role user)", err=True)


@app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...), from `fleetlm keys list`.")],
    state_db: StateDbOpt = None,
) -> None:
    """Revoke a key: it is refused from now on (a running server notices at its next lookup)."""
    from fleetlm.state import cli_actor, open_state
    from fleetlm.state.admin import revoke_key
    from fleetlm.state.listing import when

    try:
        with open_state(state_db) as db:
            key = revoke_key(db, key_id, actor=cli_actor())
    except FleetLMError as e:
        fail(e)
    typer.echo(f"revoked {key.id} (tenant {key.tenant}) at {when(key.revoked)}")
