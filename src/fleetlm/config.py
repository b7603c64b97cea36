"""One way to read a config, for every config fleetlm has (routes, tune, bench, serve).

    StrictModel    pydantic base: unknown keys are errors, instances are frozen
    Problems       a validator's several problems at once, each under its own dotted path
    format_errors  a ValidationError as ``dotted.path: what is wrong and how to fix it`` lines
    problems_error the ConfigError that lists those lines under the file's name
    load_yaml      a YAML file; a key given twice in one mapping is an error, not a silent last-wins

This module knows pydantic and YAML; what a config means is its own package's business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from fleetlm.errors import ConfigError


class StrictModel(BaseModel):
    """A config section: a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Problems(ValueError):
    """Cross-field problems, each under a path relative to the model that raised them
    (:func:`format_errors` joins the two paths)."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))
        self.problems = problems


def format_errors(e: ValidationError, docs: str) -> list[str]:
    """One ``path: message`` line per problem; ``docs`` names the page listing every key."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        exc = (err.get("ctx") or {}).get("error")
        if isinstance(exc, Problems):
            lines += [f"{loc + '.' if loc else ''}{p}: {m}" for p, m in exc.problems]
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (check the spelling; see {docs} for every key)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{loc or '(top level)'}: {msg}")
    return lines


def problems_error(source: str | None, what: str, lines: list[str]) -> ConfigError:
    """``SOURCE: N problem(s) in the WHAT:`` and the lines, indented."""
    where = f"{source}: " if source else ""
    body = "\n".join(f"  {line}" for line in lines)
    return ConfigError(f"{where}{len(lines)} problem(s) in the {what}:\n{body}")


def load_yaml(path: Path, *, missing: str) -> Any:
    """The parsed YAML of ``path``. ``missing`` is the error when the file is not there (it
    names the flag and what to pass). Duplicate keys and bad YAML are ConfigErrors naming
    the file and the line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(missing)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_keys_loader())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e}); save the config as UTF-8") from None


def _unique_keys_loader() -> Any:
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, which would hide a route, an upstream or a setting defined twice)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping; keep one",
                    key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader
