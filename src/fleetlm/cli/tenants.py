"""``fleetlm tenants create|list|set``: tenants and their policies, in the state store
(:mod:`fleetlm.state.tenants`; changed through :mod:`fleetlm.state.admin`, which writes the
audit event with actor ``cli:<os user>``). ``set`` changes only the options given."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from fleetlm.cli.options import StateDbOpt, fail, show
from fleetlm.errors import FleetLMError

app = typer.Typer(help="Tenants: what their keys may call, and their limits.",
                  no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="Tenant name: lowercase letters, digits, _ . -")]
ModelsOpt = Annotated[str | None, typer.Option(
    "--models", help="Base models allowed: comma-separated glob patterns (smollm2-*,qwen*); "
                     "default *.")]
AdaptersOpt = Annotated[str | None, typer.Option(
    "--adapters", help="Adapters allowed: comma-separated glob patterns; default *.")]
RoutesOpt = Annotated[str | None, typer.Option(
    "--routes", help="Routes allowed: comma-separated glob patterns; default *.")]
RpmOpt = Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")]
TpmOpt = Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")]
DailyOpt = Annotated[float | None, typer.Option(
    "--budget-daily-usd", help="Upstream spend per UTC day, in USD.")]
MonthlyOpt = Annotated[float | None, typer.Option(
    "--budget-monthly-usd", help="Upstream spend per UTC calendar month, in USD.")]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="Most max_tokens per request.")]
MaxNOpt = Annotated[int | None, typer.Option("--max-n", help="Most choices (n) per request.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _options(models: str | None, adapters: str | None, routes: str | None, rpm: int | None,
             tpm: int | None, daily: float | None, monthly: float | None,
             max_tokens: int | None, max_n: int | None) -> dict[str, Any]:
    return {"models": models, "adapters": adapters, "routes": routes, "rpm": rpm, "tpm": tpm,
            "budget_daily_usd": daily, "budget_monthly_usd": monthly,
            "max_tokens": max_tokens, "max_n": max_n}


@app.command("create")
def tenants_create(
    name: NameArg, models: ModelsOpt = None, adapters: AdaptersOpt = None,
    routes: RoutesOpt = None, rpm: RpmOpt = None, tpm: TpmOpt = None,
    budget_daily_usd: DailyOpt = None, budget_monthly_usd: MonthlyOpt = None,
    max_tokens: MaxTokensOpt = None, max_n: MaxNOpt = None, state_db: StateDbOpt = None,
) -> None:
    """Create a tenant (no option: every model, adapter and route, no limits)."""
    from fleetlm.state import cli_actor, open_state
    from fleetlm.state.admin import create_tenant
    from fleetlm.state.tenants import changes_from_options, policy_from

    try:
        policy = policy_from(changes_from_options(_options(
            models, adapters, routes, rpm, tpm, budget_daily_usd, budget_monthly_usd,
            max_tokens, max_n)), what=f"tenant {name}")
        with open_state(state_db) as db:
            t = create_tenant(db, name, policy, actor=cli_actor())
    except FleetLMError as e:
        fail(e)
    typer.echo(f"created tenant {t.name}: {t.policy.model_dump_json()}")


@app.command("list")
def tenants_list(json_out: JsonOpt = False, state_db: StateDbOpt = None) -> None:
    """List the tenants and their policies."""
    from fleetlm.state import TenantStore, open_state
    from fleetlm.state.listing import tenants_json, tenants_table

    try:
        with open_state(state_db) as db:
            tenants = TenantStore(db).list()
    except FleetLMError as e:
        fail(e)
    if json_out:
        typer.echo(tenants_json(tenants))
    elif tenants:
        show(tenants_table(tenants))
    else:
        typer.echo("no tenants (create one: fleetlm tenants create NAME)", err=True)


@app.command("set")
def tenants_set(
    name: NameArg, models: ModelsOpt = None, adapters: AdaptersOpt = None,
    routes: RoutesOpt = None, rpm: RpmOpt = None, tpm: TpmOpt = None,
    budget_daily_usd: DailyOpt = None, budget_monthly_usd: MonthlyOpt = None,
    max_tokens: MaxTokensOpt = None, max_n: MaxNOpt = None,
    clear: Annotated[list[str] | None, typer.Option(
        "--clear", help="Reset a field to its default (no limit; * for a pattern list), e.g. "
                        "--clear rpm --clear budget-daily-usd. Repeatable.")] = None,
    state_db: StateDbOpt = None,
) -> None:
    """Change a tenant's policy: only the options given change."""
    from fleetlm.state import StateError, cli_actor, open_state
    from fleetlm.state.admin import set_tenant
    from fleetlm.state.tenants import changes_from_options

    try:
        changes = changes_from_options(_options(
            models, adapters, routes, rpm, tpm, budget_daily_usd, budget_monthly_usd,
            max_tokens, max_n), clear or [])
        if not changes:
            raise StateError("nothing to change: give an option (--rpm 60) or --clear FIELD")
        with open_state(state_db) as db:
            t = set_tenant(db, name, changes, actor=cli_actor())
    except FleetLMError as e:
        fail(e)
    typer.echo(f"tenant {t.name}: {t.policy.model_dump_json()}")
