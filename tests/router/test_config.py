"""The routes config: the issue's example parses, and every mistake is named by its path."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fleetlm.errors import ConfigError
from fleetlm.router.config import RoutesConfig, load_routes, parse_routes

EXAMPLE = """
upstreams:
  big:                       # any OpenAI-compatible endpoint
    base_url: https://api.example.com/v1
    api_key_env: BIG_API_KEY
    model: some-large-model
    price_per_1m_input: 2.50
    price_per_1m_output: 10.00
    timeout_s: 30
routes:
  support:                   # clients send model="support"
    small: smollm2-135m:banking77
    large: [big]             # fallback chain
    policy: confidence
    threshold: 0.80
    pii: redact
local_cost_per_hour: 0.40
"""


def write(tmp_path: Path, text: str, name: str = "routes.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [line.strip() for line in str(excinfo.value).splitlines()[1:]]


def test_issue_example_parses_and_reads_no_key(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIG_API_KEY", raising=False)  # the key is read at call time only
    cfg = load_routes(write(tmp_path, EXAMPLE))
    big = cfg.upstreams["big"]
    assert big.base_url == "https://api.example.com/v1"
    assert big.api_key_env == "BIG_API_KEY"
    assert (big.price_per_1m_input, big.price_per_1m_output, big.timeout_s) == (2.5, 10.0, 30.0)
    r = cfg.routes["support"]
    assert (r.small, r.large, r.policy, r.pii) == ("smollm2-135m:banking77", ["big"],
                                                    "confidence", "redact")
    assert r.threshold is not None and r.threshold.source is None
    assert r.threshold_value == 0.8
    assert r.on_large_failure == "fallback"
    assert cfg.local_cost_per_hour == 0.40
    assert cfg.ledger_path is None
    assert cfg.first_large("support") is big
    assert r.pii_config().entities  # the privacy package's defaults


def test_unknown_keys_anywhere_are_named_by_path_all_at_once(tmp_path: Path) -> None:
    text = EXAMPLE.replace("    timeout_s: 30", "    timeout_s: 30\n    timout: 5")
    text = text.replace("    pii: redact", "    pii: redact\n    treshold: 0.5")
    text += "extra_top: 1\n"
    with pytest.raises(ConfigError) as e:
        load_routes(write(tmp_path, text))
    lines = problems(e)
    assert str(tmp_path / "routes.yaml") in str(e.value)
    assert any(line.startswith("upstreams.big.timout: unknown key") for line in lines)
    assert any(line.startswith("routes.support.treshold: unknown key") for line in lines)
    assert any(line.startswith("extra_top: unknown key") for line in lines)
    assert "3 problem(s)" in str(e.value)


def test_unknown_key_in_a_rule(tmp_path: Path) -> None:
    raw = {"upstreams": {}, "routes": {"r": {
        "small": "m", "policy": "always-small",
        "rules": [{"route": "large", "regx": "x"}]}}}
    with pytest.raises(ConfigError) as e:
        parse_routes(raw)
    assert any(line.startswith("routes.r.rules.0.regx: unknown key") for line in problems(e))


def test_large_naming_a_missing_upstream(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_routes(write(tmp_path, EXAMPLE.replace("large: [big]", "large: [big, bgi]")))
    (line,) = problems(e)
    assert line.startswith("routes.support.large.1: no upstream named 'bgi'")
    assert "big" in line  # lists the upstreams that exist


def test_cross_check_reported_together_with_field_errors() -> None:
    raw = {"upstreams": {"big": {"base_url": "ftp://x", "model": "m"}},
           "routes": {"s": {"small": "m", "large": ["nope"], "threshold": 0.5}}}
    with pytest.raises(ConfigError) as e:
        parse_routes(raw)
    lines = problems(e)
    assert any(line.startswith("upstreams.big.base_url:") for line in lines)
    assert any(line.startswith("routes.s.large.0: no upstream named 'nope'") for line in lines)


def test_threshold_file_relative_to_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "t.json").write_text(json.dumps(
        {"format": "fleetlm-threshold/1", "threshold": 0.37, "policy": "confidence"}))
    cfg = load_routes(write(tmp_path / "conf", EXAMPLE.replace("threshold: 0.80",
                                                               "threshold: t.json")))
    t = cfg.routes["support"].threshold
    assert t is not None and t.value == 0.37 and t.source == tmp_path / "conf" / "t.json"


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ("{not json", "is not JSON"),
    (json.dumps({"threshold": 1.5}), "no number in [0, 1]"),
    (json.dumps({"threshold": 0.4, "policy": "classifier"}), "calibrated for policy 'classifier'"),
])
def test_bad_threshold_files(tmp_path: Path, content: str | None, needle: str) -> None:
    if content is not None:
        (tmp_path / "t.json").write_text(content)
    with pytest.raises(ConfigError) as e:
        load_routes(write(tmp_path, EXAMPLE.replace("threshold: 0.80", "threshold: t.json")))
    (line,) = problems(e)
    assert line.startswith("routes.support.threshold:") and needle in line


def test_threshold_out_of_range_and_required() -> None:
    base = {"upstreams": {"big": {"base_url": "http://h/v1", "model": "m"}}}
    with pytest.raises(ConfigError, match=r"routes.s.threshold: 1.2 is outside \[0, 1\]"):
        parse_routes({**base, "routes": {"s": {"small": "m", "large": ["big"],
                                               "threshold": 1.2}}})
    with pytest.raises(ConfigError, match="routes.s.threshold: policy confidence needs a threshold"):
        parse_routes({**base, "routes": {"s": {"small": "m", "large": ["big"]}}})
    with pytest.raises(ConfigError, match="routes.s.threshold: policy always-large decides "
                                          "without a threshold"):
        parse_routes({**base, "routes": {"s": {"small": "m", "large": ["big"],
                                               "policy": "always-large", "threshold": 0.5}}})


def test_per_policy_options() -> None:
    up = {"big": {"base_url": "http://h/v1", "model": "m"}}

    def route(**kw: object) -> RoutesConfig:
        return parse_routes({"upstreams": up, "routes": {"s": {"small": "m", **kw}}})

    # rules: regex / keywords / length -> decision; threshold not needed
    cfg = route(large=["big"], policy="rules", rules_default="large", rules=[
        {"regex": "(?i)refund", "route": "large"}, {"max_chars": 200, "route": "small"}])
    r = cfg.routes["s"]
    assert r.rules is not None and r.rules[0].regex == "(?i)refund"
    assert r.threshold_value == 0.5  # 0/1 scores: any threshold in (0, 1] decides the same
    # always-small needs no upstream; random gets its seed
    assert route(policy="always-small").routes["s"].large == []
    assert route(large=["big"], policy="random", seed=7).routes["s"].seed == 7
    assert route(large=["big"], threshold=0.5, labels=["a", "b"]).routes["s"].labels == ["a", "b"]

    cases: list[tuple[dict[str, Any], str]] = [
        (dict(large=["big"], threshold=0.5, rules=[{"max_chars": 3, "route": "small"}]),
         "routes.s.rules: only used by policy rules"),
        (dict(large=["big"], policy="rules"), "routes.s.rules: policy rules needs"),
        (dict(large=["big"], policy="rules", rules=[{"route": "small"}]),
         "routes.s.rules.0: a rule needs at least one of"),
        (dict(large=["big"], policy="rules", rules=[{"regex": "(", "route": "small"}]),
         "routes.s.rules.0.regex: regex '(' does not compile"),
        (dict(large=["big"], policy="classifier", threshold=0.5),
         "routes.s.classifier: policy classifier needs"),
        (dict(large=["big"], policy="random", labels=["a", "b"]),
         "routes.s.labels: only used by policy confidence"),
        (dict(threshold=0.5), "routes.s.large: policy confidence can escalate"),
        (dict(large=["big", "big"], threshold=0.5), "routes.s.large: ['big'] listed more"),
        (dict(small="a:b:c", large=["big"], threshold=0.5), "routes.s.small: 'a:b:c' is not"),
        (dict(large=["big"], threshold=0.5, pii="off", pii_entities=["PERSON"]),
         "routes.s.pii_entities: pii is off"),
        (dict(large=["big"], threshold=0.5, pii_entities=["person"]),
         "routes.s.pii_entities:"),
        (dict(large=["big"], threshold=0.5, pii_entities="lenient"), "routes.s.pii_entities:"),
        (dict(large=["big"], threshold=0.5, pii="off", pii_allow=["Acme"]),
         "routes.s.pii_allow: pii is off"),
        (dict(large=["big"], threshold=0.5, pii="off", pii_ner="learned"),
         "routes.s.pii_ner: pii is off"),
        (dict(large=["big"], threshold=0.5, pii_ner="bert"), "routes.s.pii_ner:"),
        (dict(large=["big"], threshold=0.5, pii_allow=[" "]), "routes.s.pii_allow:"),
        (dict(large=["big"], threshold=0.5, policy="smart"), "routes.s.policy:"),
    ]
    for kw, message in cases:
        with pytest.raises(ConfigError) as e:
            route(**dict(kw))
        assert any(line.startswith(message) for line in problems(e)), (kw, str(e.value))


def test_pii_options_reach_the_route_pii_config() -> None:
    from fleetlm.privacy.config import STRICT_ENTITIES, PiiConfig

    up = {"big": {"base_url": "http://h/v1", "model": "m"}}

    def route(**kw: object) -> RoutesConfig:
        return parse_routes({"upstreams": up, "routes": {"s": {"small": "m", **kw}}})

    cfg = route(large=["big"], threshold=0.5, pii_entities="strict", pii_allow=["Acme Ltd"],
                pii_ner="both").routes["s"].pii_config()
    assert cfg.entities == STRICT_ENTITIES and cfg.allow_list == ("Acme Ltd",)
    assert cfg.ner == "both"
    assert route(large=["big"], threshold=0.5).routes["s"].pii_config() == PiiConfig()
    assert route(large=["big"], threshold=0.5, pii="off").routes["s"].pii_config() is None


def test_classifier_path_resolved_and_checked(tmp_path: Path) -> None:
    (tmp_path / "router.json").write_text("{}")
    up = {"big": {"base_url": "http://h/v1", "model": "m"}}
    raw = {"upstreams": up, "routes": {"s": {"small": "m", "large": ["big"],
                                             "policy": "classifier", "threshold": 0.5,
                                             "classifier": "router.json"}}}
    assert parse_routes(raw, base_dir=tmp_path).routes["s"].classifier == tmp_path / "router.json"
    with pytest.raises(ConfigError, match=r"routes.s.classifier: .*does not exist"):
        parse_routes(raw, base_dir=tmp_path / "elsewhere")


def test_names_and_api_key_env(tmp_path: Path) -> None:
    raw = {"upstreams": {"big": {"base_url": "http://h/v1", "model": "m",
                                 "api_key_env": "sk-live-123"},
                         "bad name": {"base_url": "http://h/v1", "model": "m"}},
           "routes": {"sup port": {"small": "m", "policy": "always-small"},
                      ".hidden": {"small": "m", "policy": "always-small"}}}
    with pytest.raises(ConfigError) as e:
        parse_routes(raw)
    lines = problems(e)
    assert any(line.startswith("upstreams.big.api_key_env: must be the NAME") for line in lines)
    assert any(line.startswith("upstreams.bad name: upstream names") for line in lines)
    assert any(line.startswith("routes.sup port: route names") for line in lines)
    assert any(line.startswith("routes..hidden: route names") for line in lines)


def test_duplicate_yaml_keys_refused(tmp_path: Path) -> None:
    text = EXAMPLE + "routes:\n  other:\n    small: m\n    policy: always-small\n"
    with pytest.raises(ConfigError, match="'routes' is given twice"):
        load_routes(write(tmp_path, text))



def test_a_route_or_upstream_defined_twice_is_refused(tmp_path: Path) -> None:
    """Nested mappings too: PyYAML would keep the second ``support`` silently."""
    twice = EXAMPLE.replace("local_cost_per_hour", "  support:\n    small: other\n"
                            "    policy: always-small\nlocal_cost_per_hour")
    path = write(tmp_path, twice, "twice.yaml")
    with pytest.raises(ConfigError, match=r"key 'support' is given twice in one mapping; keep one"
                       ) as e:
        load_routes(path)
    assert str(e.value).startswith(f"{path}: not valid YAML") and "line 17, column 3" in str(e.value)
    up_twice = EXAMPLE.replace("routes:\n", "  big:\n    base_url: http://h/v1\n    model: m\n"
                               "routes:\n")
    with pytest.raises(ConfigError, match="'big' is given twice"):
        load_routes(write(tmp_path, up_twice, "ups.yaml"))
    with pytest.raises(ConfigError, match="'threshold' is given twice"):
        load_routes(write(tmp_path, EXAMPLE.replace("pii: redact", "threshold: 0.5"), "th.yaml"))


def test_bad_yaml_and_a_missing_file_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "routes.yaml"
    with pytest.raises(ConfigError, match=f"--config: routes config {missing} does not exist"):
        load_routes(missing)
    bad = write(tmp_path, "routes:\n  r: {small: m\n", "bad.yaml")
    with pytest.raises(ConfigError) as e:
        load_routes(bad)
    assert str(e.value).startswith(f"{bad}: not valid YAML: ")

def test_paths_and_file_errors(tmp_path: Path) -> None:
    cfg = load_routes(write(tmp_path, EXAMPLE + "ledger_path: data/ledger.sqlite3\n"))
    assert cfg.ledger_path == tmp_path / "data" / "ledger.sqlite3"
    with pytest.raises(ConfigError, match="does not exist"):
        load_routes(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_routes(write(tmp_path, "routes: [\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_routes(write(tmp_path, "- a\n", "list.yaml"))
    with pytest.raises(ConfigError, match="routes: required key is missing"):
        load_routes(write(tmp_path, "upstreams: {}\n", "noroutes.yaml"))
    with pytest.raises(ConfigError, match="routes: give at least one route"):
        load_routes(write(tmp_path, "routes: {}\n", "empty.yaml"))


def test_route_names_must_not_shadow_served_models(tmp_path: Path) -> None:
    cfg = load_routes(write(tmp_path, EXAMPLE))
    cfg.check_model_names(["smollm2-135m", "banking77"])
    with pytest.raises(ConfigError, match="support also name a served model"):
        cfg.check_model_names(["smollm2-135m", "support"])


def test_a_bare_yaml_off_turns_pii_off(tmp_path):
    from fleetlm.router.config import load_routes

    p = tmp_path / "routes.yaml"
    p.write_text("routes:\n  r:\n    small: base\n    policy: always-small\n    pii: off\n")
    assert load_routes(p).routes["r"].pii == "off"


def test_the_example_routes_file_is_valid():
    from pathlib import Path

    from fleetlm.router.config import load_routes

    example = Path(__file__).resolve().parents[2] / "examples" / "routes.yaml"
    cfg = load_routes(example)
    assert set(cfg.routes) == {"assistant", "intents"}
    assert cfg.routes["assistant"].threshold_value == 0.60
    assert cfg.upstreams["openai"].api_key_env == "OPENAI_API_KEY"


def test_task_adapter_takes_its_labels_from_the_adapter():
    from fleetlm.errors import ConfigError
    from fleetlm.router.config import parse_routes

    raw = {"upstreams": {"big": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}},
           "routes": {"r": {"small": "base:sentiment", "large": ["big"], "task": "adapter",
                            "threshold": 0.5, "labels": ["a", "b"]}}}
    with pytest.raises(ConfigError, match=r"routes\.r\.labels: with task: adapter the labels"):
        parse_routes(raw)
    del raw["routes"]["r"]["labels"]
    assert parse_routes(raw).routes["r"].task == "adapter"
