"""fleetlm.config: the one strict base every config uses, its error lines, its YAML loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError, model_validator

from fleetlm.config import Problems, StrictModel, format_errors, load_yaml, problems_error
from fleetlm.errors import ConfigError


class _Inner(StrictModel):
    rank: int = 8


class _Outer(StrictModel):
    name: str
    inner: _Inner = _Inner()

    @model_validator(mode="after")
    def _cross(self) -> _Outer:
        if self.name == "bad":
            raise Problems([("name", "not 'bad'; pick another"), ("inner.rank", "too high")])
        return self


def _lines(raw: dict) -> list[str]:
    with pytest.raises(ValidationError) as e:
        _Outer.model_validate(raw)
    return format_errors(e.value, "docs/x.md")


def test_unknown_keys_missing_keys_and_bad_values_each_get_a_dotted_line() -> None:
    assert _lines({"inner": {"rnak": 4, "rank": "x"}}) == [
        "name: required key is missing",
        "inner.rank: Input should be a valid integer, unable to parse string as an integer",
        "inner.rnak: unknown key (check the spelling; see docs/x.md for every key)",
    ]


def test_cross_field_problems_keep_their_own_paths() -> None:
    assert _lines({"name": "bad"}) == ["name: not 'bad'; pick another", "inner.rank: too high"]


def test_problems_error_names_the_source_and_counts() -> None:
    err = problems_error("a.yaml", "tune config", ["x: one", "y: two"])
    assert isinstance(err, ConfigError)
    assert str(err) == "a.yaml: 2 problem(s) in the tune config:\n  x: one\n  y: two"


def test_strict_models_are_frozen() -> None:
    cfg = _Outer(name="a")
    with pytest.raises(ValidationError):
        cfg.name = "b"  # type: ignore[misc]


@pytest.mark.parametrize("text, where", [
    ("a: 1\na: 2\n", "line 2"),
    ("top:\n  inner:\n    k: 1\n    k: 2\n", "line 4"),
    ("items:\n  - {x: 1, x: 2}\n", "line 2"),
])
def test_load_yaml_refuses_a_key_given_twice_at_any_depth(tmp_path: Path, text: str,
                                                          where: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="is given twice in one mapping; keep one") as e:
        load_yaml(f, missing="unused")
    assert str(f) in str(e.value) and where in str(e.value)


def test_load_yaml_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_yaml(tmp_path / "none.yaml", missing="--config: no such file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_yaml(bad, missing="unused")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_yaml(latin, missing="unused")
    ok = tmp_path / "ok.yaml"
    ok.write_text("a: 1\nb: [x, y]\n")
    assert load_yaml(ok, missing="unused") == {"a": 1, "b": ["x", "y"]}


def test_every_config_of_the_project_is_strict() -> None:
    """Routes, tune, serve, bench and PII settings: one base, so a typo is an error everywhere."""
    from fleetlm.bench.adapters import AdaptersBenchConfig
    from fleetlm.bench.decode import DecodeBenchConfig
    from fleetlm.bench.pii import PiiBenchConfig
    from fleetlm.bench.serve import ServeBenchConfig
    from fleetlm.bench.tune import TuneBenchConfig
    from fleetlm.privacy.config import PiiConfig
    from fleetlm.router.config import RouteConfig, RoutesConfig, UpstreamConfig
    from fleetlm.server.run import ServeSettings
    from fleetlm.tune.config import TrainConfig, TuneConfig

    for cls in (RoutesConfig, RouteConfig, UpstreamConfig, TuneConfig, TrainConfig,
                ServeSettings, AdaptersBenchConfig, DecodeBenchConfig, PiiBenchConfig,
                ServeBenchConfig, PiiConfig):
        assert issubclass(cls, StrictModel), cls
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            cls.model_validate({"no_such_key": 1})
    assert issubclass(TuneBenchConfig, StrictModel)
    with pytest.raises(ValidationError, match="no_such_key"):
        TuneBenchConfig(config=Path("x.yaml"), no_such_key=1)  # type: ignore[call-arg]
