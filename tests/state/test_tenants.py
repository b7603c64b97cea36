"""Tenants on SQLite and PostgreSQL: create, get, list, set (merged, re-validated, None
clears), glob (not regex) patterns, and errors that name the field."""

from __future__ import annotations

import pytest

from fleetlm.state import StateDB, StateError, TenantPolicy, TenantStore
from fleetlm.state.tenants import changes_from_options, policy_from


def test_create_get_list(db: StateDB) -> None:
    store = TenantStore(db)
    t = store.create("acme", TenantPolicy(models=["smollm2-*"], rpm=600, budget_daily_usd=5))
    assert t.policy.rpm == 600 and t.created == t.updated
    assert store.get("acme") == t
    store.create("b.team-2")
    assert [x.name for x in store.list()] == ["acme", "b.team-2"]
    assert store.get("b.team-2").policy == TenantPolicy()  # type: ignore[union-attr]
    assert store.get("nope") is None
    with pytest.raises(StateError, match="tenant acme already exists; change it with "
                                         "`fleetlm tenants set acme"):
        store.create("acme")


@pytest.mark.parametrize("bad", ["", "Acme", "-a", "a b", "a/b", "x" * 65, "é"])
def test_bad_names(bad: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fleetlm.state import open_state

    with open_state(tmp_path / "s.db") as db, pytest.raises(StateError, match="tenant name"):
        TenantStore(db).create(bad)


def test_set_merges_and_clears(db: StateDB) -> None:
    store = TenantStore(db)
    store.create("acme", TenantPolicy(rpm=10, tpm=1000, models=["a*"]))
    t = store.set("acme", rpm=20, budget_monthly_usd=100.0)
    assert (t.policy.rpm, t.policy.tpm, t.policy.models) == (20, 1000, ["a*"])
    assert t.policy.budget_monthly_usd == 100.0 and t.updated >= t.created
    t = store.set("acme", tpm=None, models=None)  # None: back to the default
    assert t.policy.tpm is None and t.policy.models == ["*"] and t.policy.rpm == 20
    assert store.get("acme") == t


def test_set_errors_name_the_field(db: StateDB) -> None:
    store = TenantStore(db)
    store.create("acme")
    with pytest.raises(StateError, match="no tenant 'nope'; create it: fleetlm tenants create"):
        store.set("nope", rpm=1)
    with pytest.raises(StateError, match="tenant acme: unknown field\\(s\\) rmp; the fields "
                                         "are models, adapters"):
        store.set("acme", rmp=1)
    with pytest.raises(StateError) as e:
        store.set("acme", rpm=0, budget_daily_usd=-1, models=["x"] * 65)
    msg = str(e.value)  # every problem, each under its field
    assert "rpm: Input should be greater than or equal to 1" in msg
    assert "budget_daily_usd: Input should be greater than or equal to 0" in msg
    assert "models: Value error, at most 64 patterns" in msg or "models: at most 64" in msg
    assert store.get("acme").policy == TenantPolicy()  # type: ignore[union-attr]


def test_policy_validation() -> None:
    for bad in ({"models": [""]}, {"routes": ["x" * 257]}, {"adapters": ["a\nb"]},
                {"max_tokens": 0}, {"max_n": 0}, {"tpm": 0}, {"budget_monthly_usd": -0.01}):
        with pytest.raises(StateError, match=next(iter(bad))):
            policy_from(bad)
    assert policy_from({"models": []}).models == []  # allowed: nothing may be called


def test_patterns_are_globs_not_regexes() -> None:
    p = TenantPolicy(models=["smollm2-*", "qwen?.5"], adapters=["team-a/*", "shared"],
                     routes=["support"])
    assert p.allows_model("smollm2-135m") and p.allows_model("qwen2.5")
    assert not p.allows_model("xsmollm2-135m") and not p.allows_model("qwen2x5")
    assert not p.allows_model("SMOLLM2-135m")  # case-sensitive
    assert p.allows_adapter("team-a/x") and p.allows_adapter("shared")
    assert not p.allows_adapter("shared2")
    assert p.allows_route("support") and not p.allows_route("support-2")
    regexy = TenantPolicy(models=["smollm.*"])
    assert not regexy.allows_model("smollm2")  # "." is a literal dot in a glob
    assert TenantPolicy().allows_model("anything")


def test_changes_from_options() -> None:
    got = changes_from_options({"models": "a*, b*,", "rpm": 5, "tpm": None}, ["max-tokens"])
    assert got == {"models": ["a*", "b*"], "rpm": 5, "max_tokens": None}
    with pytest.raises(StateError, match="--clear rmp: not a policy field"):
        changes_from_options({}, ["rmp"])
    with pytest.raises(StateError, match="--clear rpm and --rpm both given"):
        changes_from_options({"rpm": 5}, ["rpm"])
