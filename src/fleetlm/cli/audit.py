"""``fleetlm audit``: the audit log of the state store (:mod:`fleetlm.state.audit`), newest
events first selected, printed oldest first; ``--since`` is read by
:func:`fleetlm.router.report.parse_since`, as for ``fleetlm report savings``."""

from __future__ import annotations

from typing import Annotated

import typer

from fleetlm.cli.options import SinceOpt, StateDbOpt, fail, show
from fleetlm.errors import FleetLMError

app = typer.Typer()


@app.command("audit")
def audit(
    since: SinceOpt = None,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's events.")] = None,
    action: Annotated[str | None, typer.Option(
        "--action", help="Only this action, or a prefix: adapter. (adapter.add, "
                         "adapter.delete, ...), key, tenant.set, auth.refused.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="The newest N events.")] = 100,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    state_db: StateDbOpt = None,
) -> None:
    """Who changed adapters, keys and tenants, and which requests were refused."""
    from fleetlm.router.report import parse_since
    from fleetlm.state import AuditLog, open_state
    from fleetlm.state.listing import audit_json, audit_table

    try:
        since_ts = parse_since(since) if since is not None else None
        with open_state(state_db) as db:
            events = AuditLog(db).query(since=since_ts, tenant=tenant, action=action,
                                        limit=limit)
    except (FleetLMError, ValueError) as e:
        fail(e)
    if json_out:
        typer.echo(audit_json(events))
    elif events:
        show(audit_table(events))
    else:
        typer.echo("no audit events" + (f" since {since}" if since else ""), err=True)
