"""``fleetlm keys``, ``fleetlm tenants`` and ``fleetlm audit`` run in-process with typer's
CliRunner: the secret printed once and alone on stdout, listings, only given options
changed, every admin action in the audit log with actor cli:<user>, errors as exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleetlm.cli import app
from fleetlm.state import AuditLog, KeyStore, open_state

runner = CliRunner()


def run(url: str, *args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args] + ["--state-db", url])


def test_keys_tenants_and_audit(state_url: str) -> None:
    r = run(state_url, "tenants", "create", "acme", "--models", "smollm2-*,qwen*", "--rpm", 60,
            "--budget-daily-usd", 5)
    assert r.exit_code == 0, r.output
    r = run(state_url, "keys", "create", "--tenant", "acme", "--role", "user", "--name", "ci",
            "--expires", "30d")
    assert r.exit_code == 0, r.output
    secret = r.stdout.strip()
    assert r.stdout == secret + "\n" and secret.startswith("flm-")  # only the key on stdout
    assert "shown once; only its hash is stored" in r.stderr and "tenant acme" in r.stderr
    assert secret not in r.stderr

    keys = json.loads(run(state_url, "keys", "list", "--json").stdout)
    assert [(k["tenant"], k["role"], k["name"], k["status"], k["prefix"]) for k in keys] == [
        ("acme", "user", "ci", "active", secret[:8])]
    assert secret not in json.dumps(keys)
    key_id = keys[0]["id"]
    table = run(state_url, "keys", "list", "--tenant", "acme")
    assert key_id in table.stdout and secret[:8] in table.stdout and secret not in table.stdout
    assert json.loads(run(state_url, "keys", "list", "--tenant", "other", "--json").stdout) == []

    r = run(state_url, "tenants", "set", "acme", "--tpm", 1000, "--clear", "budget-daily-usd")
    assert r.exit_code == 0, r.output
    (t,) = json.loads(run(state_url, "tenants", "list", "--json").stdout)
    assert t["name"] == "acme" and t["policy"] == {
        "models": ["smollm2-*", "qwen*"], "adapters": ["*"], "routes": ["*"], "rpm": 60,
        "tpm": 1000, "budget_daily_usd": None, "budget_monthly_usd": None, "max_tokens": None,
        "max_n": None}

    r = run(state_url, "keys", "revoke", key_id)
    assert r.exit_code == 0 and f"revoked {key_id}" in r.stdout
    assert json.loads(run(state_url, "keys", "list", "--json").stdout)[0]["status"] == "revoked"

    events = json.loads(run(state_url, "audit", "--json").stdout)
    assert [(e["action"], e["outcome"]) for e in events] == [
        ("tenant.create", "ok"), ("key.create", "ok"), ("tenant.set", "ok"), ("key.revoke", "ok")]
    assert all(e["actor"].startswith("cli:") for e in events)
    assert secret not in json.dumps(events)
    keys_only = json.loads(run(state_url, "audit", "--action", "key", "--json").stdout)
    assert [e["action"] for e in keys_only] == ["key.create", "key.revoke"]
    assert len(json.loads(run(state_url, "audit", "--limit", 1, "--json").stdout)) == 1
    r = run(state_url, "audit", "--since", "1h", "--tenant", "acme")
    assert r.exit_code == 0 and "tenant.create" in r.stdout and "key.revoke" in r.stdout

    with open_state(state_url) as db:  # the database holds the hash, never the secret
        assert KeyStore(db).lookup(secret).id == key_id  # type: ignore[union-attr]
        assert len(AuditLog(db).query()) == 4


def test_errors_exit_2_and_name_the_fix(tmp_path: Path) -> None:
    url = str(tmp_path / "state.db")
    cases = [
        (("keys", "create", "--tenant", "nope", "--role", "user"),
         "no such tenant; create it first: fleetlm tenants create nope"),
        (("keys", "revoke", "key_000000000000"), "no API key 'key_000000000000'"),
        (("tenants", "create", "Bad Name"), "tenant name 'Bad Name'"),
        (("tenants", "create", "acme", "--rpm", "0"), "rpm: Input should be greater"),
        (("tenants", "set", "nope", "--rpm", "5"), "no tenant 'nope'"),
        (("tenants", "set", "nope"), "nothing to change"),
        (("tenants", "set", "nope", "--clear", "rmp"), "--clear rmp: not a policy field"),
        (("audit", "--since", "yesterday"), "--since 'yesterday'"),
    ]
    for args, msg in cases:
        r = run(url, *args)
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output and msg in r.stderr, (args, r.stderr)
    run(url, "tenants", "create", "acme")
    r = run(url, "keys", "create", "--tenant", "acme", "--role", "user", "--expires", "soon")
    assert r.exit_code == 2 and "--expires 'soon'" in r.stderr and r.stdout == ""
    r = run(url, "keys", "create", "--tenant", "acme", "--role", "root")
    assert r.exit_code == 2  # typer refuses the choice
    r = runner.invoke(app, ["keys", "list", "--state-db", "mysql://u:pw@h/db"])
    assert r.exit_code == 2 and "--state-db mysql://u:***@h/db" in r.stderr and "pw" not in r.stderr
    # the refusals that reached the store are audited too
    events = json.loads(run(url, "audit", "--json").stdout)
    assert ("key.create", "error") in [(e["action"], e["outcome"]) for e in events]


def test_the_default_store_is_under_fleetlm_home(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLEETLM_STATE_DB", raising=False)
    assert runner.invoke(app, ["tenants", "create", "acme"]).exit_code == 0
    assert (tmp_path / "home" / "state.db").is_file()
    monkeypatch.setenv("FLEETLM_STATE_DB", str(tmp_path / "other.db"))
    r = runner.invoke(app, ["tenants", "list", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == []  # another store
    r = runner.invoke(app, ["keys", "list"])
    assert r.exit_code == 0 and "no API keys" in r.stderr
