"""The typed routes config of ``fleetlm serve --config FILE``.

    upstreams:                   # any OpenAI-compatible endpoint
      big:
        base_url: https://api.example.com/v1
        api_key_env: BIG_API_KEY # the variable's NAME; the key is read when a call is made
        model: some-large-model
        price_per_1m_input: 2.50
        price_per_1m_output: 10.00
        timeout_s: 30
        circuit_failures: 5      # then skipped for circuit_cooldown_s (30), then one probe
        max_tokens: 4096         # a client asking for more is refused (400)
    routes:
      support:                   # clients send model="support"
        small: smollm2-135m:banking77
        large: [big]             # fallback chain, tried in order
        policy: confidence       # confidence | classifier | rules | always-small | always-large | random
        threshold: 0.80          # or the JSON file written by `fleetlm route calibrate`
        pii: redact              # redact | block | off
    local_cost_per_hour: 0.40

Every model rejects unknown keys, a key given twice in one mapping (a route or upstream
defined twice) is refused (:mod:`fleetlm.config` reads the YAML and formats the problems),
and :func:`load_routes` reports every problem at once, each as
``dotted.field.path: what is wrong and how to fix it``. Relative paths (threshold
files, classifier files, the ledger) are taken from the YAML file's folder. Cross-field
rules: each route's ``large`` names upstreams that exist; a policy's own options
(``rules``, ``classifier``, ``seed``, ``labels``...) only appear with that policy;
``threshold`` is required by the score policies (confidence, classifier) and refused by
those that decide without one (rules, always-*).

Score convention (see policies.py): higher = the small model is more likely good enough;
the small model keeps the request iff ``score >= threshold``.

This module knows nothing about HTTP, models or the ledger; it only describes routes.
Reading the config reads the threshold file (so a bad file fails at start-up) but never
the API keys, which are looked up by the upstream client at call time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from fleetlm.config import Problems, StrictModel, format_errors, load_yaml, problems_error
from fleetlm.errors import ConfigError

# The model-name rule of the whole API (adapter names, route names): DESIGN.md.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# An environment variable name; a pasted key ("sk-...") does not match, on purpose.
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

PolicyName = Literal["confidence", "classifier", "rules", "always-small", "always-large",
                     "random"]
PiiMode = Literal["redact", "block", "off"]
Decision = Literal["small", "large"]

# Policies whose scores need a calibrated threshold; the rest either fix their own
# (random: 0.5 by default) or decide without one (rules, always-*: scores are 0 or 1).
_NEEDS_THRESHOLD = ("confidence", "classifier")
_NO_THRESHOLD = ("rules", "always-small", "always-large")
# Used for the policies that score only 0.0 / 1.0, and for random when none is given.
DEFAULT_THRESHOLD = 0.5

DOCS = "docs/router.md"  # every key, named in the unknown-key error

# Which per-policy options belong to which policy (every other policy refuses them).
_POLICY_OPTIONS: dict[str, tuple[str, ...]] = {
    "rules": ("rules", "rules_default"),
    "classifier": ("classifier",),
    "random": ("seed",),
    "confidence": ("labels", "aggregate", "buffer_tokens"),
}


class UpstreamConfig(StrictModel):
    """One OpenAI-compatible endpoint (``base_url`` ends before ``/chat/completions``)."""

    base_url: str
    model: str = Field(min_length=1)  # replaces the request's `model` when sent upstream
    # The NAME of the environment variable holding the API key; None = no Authorization.
    api_key_env: str | None = None
    price_per_1m_input: float = Field(0.0, ge=0)  # USD per million prompt tokens
    price_per_1m_output: float = Field(0.0, ge=0)  # USD per million completion tokens
    # Per attempt: connect + full answer (non-streaming), or connect + first content chunk
    # (streaming). A timed-out upstream is not retried: the chain moves on.
    timeout_s: float = Field(30.0, gt=0)
    # Streaming: the longest silence between two chunks once content flows; None = timeout_s.
    stream_gap_s: float | None = Field(None, gt=0)
    # Attempts on 429 / 5xx / connection errors before the chain moves on (1 = no retry).
    max_attempts: int = Field(3, ge=1, le=10)
    # Wait before retry k (0-based): backoff_s * 2**k, jittered to 50-100%, at most
    # max_backoff_s. A Retry-After above max_backoff_s is not waited for: the chain moves on.
    backoff_s: float = Field(0.5, ge=0)
    max_backoff_s: float = Field(8.0, ge=0)
    # Circuit breaker: after this many consecutive failed calls (each after its retries) the
    # upstream is skipped at once (the chain moves on) for circuit_cooldown_s; then one call
    # probes it: success closes the circuit, failure opens it for another cool-down.
    # 0 = never skip.
    circuit_failures: int = Field(5, ge=0)
    circuit_cooldown_s: float = Field(30.0, gt=0)
    # The largest max_tokens (or max_completion_tokens) a client may ask of this upstream; a
    # request over it is refused with 400 before anything is sent. None = no cap.
    max_tokens: int | None = Field(4096, ge=1)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip()
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL; give the API root, e.g. "
                             "https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
        if v.rstrip("/").endswith("/chat/completions"):
            raise ValueError("give the API root (ending in /v1), not the /chat/completions URL")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not ENV_NAME_RE.fullmatch(v):
            raise ValueError("must be the NAME of an environment variable (e.g. BIG_API_KEY), "
                             "never the key itself; export the key under that name")
        return v

    @property
    def gap_s(self) -> float:
        return self.stream_gap_s if self.stream_gap_s is not None else self.timeout_s


class Threshold(StrictModel):
    """A route's threshold: the number, and the calibration file it came from (if any)."""

    value: float = Field(ge=0.0, le=1.0)
    source: Path | None = None


class RuleConfig(StrictModel):
    """One rule of the ``rules`` policy: every condition given must hold; the first rule
    that matches sends the request to ``route``. Mirrors policies.Rule."""

    route: Decision
    regex: str | None = None  # re.search on the prompt; flags inline, e.g. (?i)
    keywords: list[str] = Field(default_factory=list)  # any of them, case-insensitive
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=0)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"regex {v!r} does not compile: {e}") from None
        return v

    @field_validator("keywords")
    @classmethod
    def _keywords(cls, v: list[str]) -> list[str]:
        if any(not k.strip() for k in v):
            raise ValueError("keywords must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _some_condition(self) -> RuleConfig:
        if self.regex is None and not self.keywords and self.min_chars is None \
                and self.max_chars is None:
            raise ValueError("a rule needs at least one of regex, keywords, min_chars, max_chars")
        return self


def _base_dir(info: ValidationInfo) -> Path:
    ctx = info.context or {}
    return Path(ctx.get("base_dir", "."))


def _resolve(base: Path, p: str | Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else base / path


def read_threshold_file(path: Path, policy: str | None = None) -> float:
    """The ``threshold`` of a JSON file written by ``fleetlm route calibrate``. When the file
    also names a ``policy``, it must be the route's (thresholds do not transfer)."""
    if not path.is_file():
        raise ValueError(f"threshold file {path} does not exist; write one with "
                         "`fleetlm route calibrate`, or give a number in [0, 1]")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"threshold file {path} is not JSON ({e}); it should be the file "
                         "`fleetlm route calibrate` writes") from None
    value = data.get("threshold") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold file {path} has no number in [0, 1] under \"threshold\" "
                         f"(got {value!r}); re-run `fleetlm route calibrate`")
    file_policy = data.get("policy")
    if policy is not None and isinstance(file_policy, str) and file_policy != policy:
        raise ValueError(f"threshold file {path} was calibrated for policy {file_policy!r}, "
                         f"this route uses {policy!r}; calibrate this policy or change it")
    return float(value)


class RouteConfig(StrictModel):
    """One route: what clients send as ``model``, and how it picks small or large."""

    # "base", "base:adapter" or an adapter name, as a client would send it
    small: str
    # upstream names tried in order; empty only with policy always-small
    large: list[str] = Field(default_factory=list)
    policy: PolicyName = "confidence"
    # a number in [0, 1] or the path of a `fleetlm route calibrate` JSON file
    threshold: Threshold | None = None
    pii: PiiMode = "redact"
    # entity types to redact/block, or a preset ("default", "strict"); None = "default"
    pii_entities: list[str] | str | None = None
    # values never redacted on this route though detected (exact, case-insensitive)
    pii_allow: list[str] | None = None
    # what finds names, places, ...: the learned recognizer, spaCy's NER, or both (PiiConfig.ner)
    pii_ner: Literal["learned", "spacy", "both"] | None = None
    # pii redact|block: content parts that are not text (image_url, input_audio, file) cannot
    # be scanned, so an escalated request carrying one is refused (400 naming the part) or
    # sent without them (drop); never sent unscanned
    non_text_parts: Literal["refuse", "drop"] = "refuse"
    # when every large upstream failed: answer with the small model (flagged) or an error
    on_large_failure: Literal["fallback", "error"] = "fallback"
    # when the caller's tenant has spent its daily or monthly budget for escalations: answer
    # with the small model (flagged over_budget) or refuse with 402 (docs/security.md)
    over_budget: Literal["small", "error"] = "small"
    # the whole large chain's time limit, retries included; None = the upstreams' own limits
    deadline_s: float | None = Field(None, gt=0)

    # "adapter": prompt the small adapter as it was tuned (its fleetlm_task.json, a
    # classification task): the client's last user message is the text, the answer one of
    # the task's labels; an escalated request asks the large model the same task with the
    # labels listed
    task: Literal["adapter"] | None = None

    # -- per-policy options (each allowed only with its policy) --
    rules: list[RuleConfig] | None = None  # rules: ordered, first match decides
    rules_default: Decision = "small"  # rules: when no rule matches
    # classifier: the folder `fleetlm route train --out` wrote (or its router.json)
    classifier: Path | None = None
    seed: int = 0  # random
    labels: list[str] | None = None  # confidence: the answer is one of these labels
    aggregate: Literal["mean", "min"] = "mean"  # confidence: over token probabilities
    buffer_tokens: int | None = Field(None, ge=1)  # confidence: tokens scored when streaming

    @field_validator("small")
    @classmethod
    def _small(cls, v: str) -> str:
        parts = v.split(":")
        if len(parts) > 2 or not all(MODEL_NAME_RE.fullmatch(p) for p in parts):
            raise ValueError(f"{v!r} is not a model name; give the base model's name, an "
                             "adapter name or base:adapter (names are [A-Za-z0-9._-]{1,64})")
        return v

    @field_validator("large")
    @classmethod
    def _no_repeats(cls, v: list[str]) -> list[str]:
        dupes = sorted({n for n in v if v.count(n) > 1})
        if dupes:
            raise ValueError(f"{dupes} listed more than once; each upstream is tried once")
        return v

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or isinstance(v, Threshold):
            return v
        if isinstance(v, bool) or isinstance(v, dict | list):
            raise ValueError("give a number in [0, 1] or the path of a JSON file written by "
                             "`fleetlm route calibrate`")
        if isinstance(v, int | float):
            if math.isnan(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{v} is outside [0, 1]")
            return Threshold(value=float(v))
        path = _resolve(_base_dir(info), str(v))
        return Threshold(value=read_threshold_file(path, info.data.get("policy")), source=path)

    @field_validator("pii", mode="before")
    @classmethod
    def _pii_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @field_validator("pii_entities", "pii_allow")
    @classmethod
    def _pii_option(cls, v: list[str] | str | None, info: ValidationInfo
                    ) -> list[str] | str | None:
        if v is not None:
            from fleetlm.privacy.config import PiiConfig

            key = {"pii_entities": "entities", "pii_allow": "allow_list"}[str(info.field_name)]
            try:
                PiiConfig(**{key: v if isinstance(v, str) else tuple(v)})
            except ValidationError as e:  # its message names the bad entries
                raise ValueError("; ".join(
                    str(err["msg"]).removeprefix("Value error, ").removeprefix(f"{key}: ")
                    for err in e.errors())) from None
        return v

    @field_validator("classifier", mode="before")
    @classmethod
    def _classifier_path(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, str | Path):
            from fleetlm.router.classifier import router_file

            path = _resolve(_base_dir(info), v)
            if not path.exists():
                raise ValueError(f"{path} does not exist; train one with `fleetlm route train "
                                 "--data FILE --out FOLDER` and give the FOLDER")
            if not router_file(path).is_file():
                raise ValueError(f"{path} holds no {router_file(path).name}; give the folder "
                                 "`fleetlm route train --out` wrote")
            return path
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if len(v) < 2:
                raise ValueError("give at least two labels (or leave labels out)")
            dupes = sorted({x for x in v if v.count(x) > 1})
            if dupes:
                raise ValueError(f"{dupes} listed more than once")
        return v

    @model_validator(mode="after")
    def _per_policy(self) -> RouteConfig:
        problems: list[tuple[str, str]] = []
        mine = _POLICY_OPTIONS.get(self.policy, ())
        for policy, options in _POLICY_OPTIONS.items():
            for opt in options:
                if opt in self.model_fields_set and opt not in mine:
                    problems.append((opt, f"only used by policy {policy}, this route's policy is "
                                          f"{self.policy}; remove it or set policy: {policy}"))
        if self.policy == "rules" and not self.rules:
            problems.append(("rules", "policy rules needs a non-empty list of rules "
                                      "(each with route: small|large and a condition)"))
        if self.policy == "classifier" and self.classifier is None:
            problems.append(("classifier", "policy classifier needs the path of a trained "
                                           "router file (`fleetlm route train`)"))
        if self.policy in _NEEDS_THRESHOLD and self.threshold is None:
            problems.append(("threshold", f"policy {self.policy} needs a threshold: a number in "
                                          "[0, 1] or the JSON file of `fleetlm route calibrate`"))
        if self.policy in _NO_THRESHOLD and self.threshold is not None:
            problems.append(("threshold", f"policy {self.policy} decides without a threshold; "
                                          "remove it"))
        if not self.large and self.policy != "always-small":
            problems.append(("large", f"policy {self.policy} can escalate, so name at least one "
                                      "upstream (or use policy always-small)"))
        if self.task is not None and self.labels is not None:
            problems.append(("labels", "with task: adapter the labels are the adapter's own "
                                       "(its fleetlm_task.json); remove labels"))
        for name in ("pii_entities", "pii_allow", "pii_ner"):
            if getattr(self, name) is not None and self.pii == "off":
                problems.append((name, f"pii is off, so {name} is unused; remove it or set "
                                       "pii: redact|block"))
        if "non_text_parts" in self.model_fields_set and self.pii == "off":
            problems.append(("non_text_parts", "pii is off, so non_text_parts is unused (parts "
                                               "go upstream as sent); remove it or set pii: "
                                               "redact|block"))
        if problems:
            raise Problems(problems)
        return self

    @property
    def threshold_value(self) -> float:
        """The threshold to hand to ``policies.decide``. Rules and always-* score only 0.0 or
        1.0, so any threshold in (0, 1] gives the same decisions: 0.5 is used."""
        return self.threshold.value if self.threshold is not None else DEFAULT_THRESHOLD

    def pii_config(self) -> Any:
        """A :class:`fleetlm.privacy.PiiConfig` for this route (None when pii is off)."""
        if self.pii == "off":
            return None
        from fleetlm.privacy.config import PiiConfig

        options: dict[str, Any] = {}
        if self.pii_entities is not None:
            options["entities"] = (self.pii_entities if isinstance(self.pii_entities, str)
                                   else tuple(self.pii_entities))
        if self.pii_allow is not None:
            options["allow_list"] = tuple(self.pii_allow)
        if self.pii_ner is not None:
            options["ner"] = self.pii_ner
        return PiiConfig(**options)


class RoutesConfig(StrictModel):
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    routes: dict[str, RouteConfig]
    # USD per hour of the machine serving the small model: the ledger's local cost
    local_cost_per_hour: float = Field(0.0, ge=0)
    # None = the state store (--state-db / $FLEETLM_STATE_DB, else data_home()/state.db);
    # a path = a ledger file of its own
    ledger_path: Path | None = None

    @field_validator("ledger_path", mode="before")
    @classmethod
    def _ledger_path(cls, v: Any, info: ValidationInfo) -> Any:
        return _resolve(_base_dir(info), v) if isinstance(v, str | Path) else v

    @model_validator(mode="after")
    def _cross(self) -> RoutesConfig:
        problems = _cross_problems(self.upstreams, {n: r.large for n, r in self.routes.items()})
        if not self.routes:
            problems.append(("routes", "give at least one route"))
        if problems:
            raise Problems(problems)
        return self

    def first_large(self, route: str) -> UpstreamConfig | None:
        """The upstream whose prices make the all-large baseline of ``route``."""
        large = self.routes[route].large
        return self.upstreams[large[0]] if large else None

    def check_model_names(self, taken: Iterable[str]) -> None:
        """Raise ConfigError when a route has the name of a served model or adapter."""
        taken = set(taken)
        clash = sorted(n for n in self.routes if n in taken)
        if clash:
            raise ConfigError("routes: " + ", ".join(clash) + " also name a served model or "
                              "adapter; a client could not say which it means. Rename the route.")


def _cross_problems(upstreams: Iterable[Any], larges: dict[Any, Any]) -> list[tuple[str, str]]:
    """Name problems across sections; works on validated models and on raw YAML alike."""
    problems: list[tuple[str, str]] = []
    ups = [u for u in upstreams if isinstance(u, str)]
    for name in upstreams:
        if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
            problems.append((f"upstreams.{name}", "upstream names are [A-Za-z0-9._-]{1,64}"))
    for name in larges:
        if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name) \
                or name.startswith("."):
            problems.append((f"routes.{name}", "route names are what clients send as model: "
                                               "[A-Za-z0-9._-]{1,64}, not starting with '.'"))
    for route, large in larges.items():
        if not isinstance(large, list):
            continue
        for i, up in enumerate(large):
            if isinstance(up, str) and up not in ups:
                known = ", ".join(sorted(ups)) or "none are defined"
                problems.append((f"routes.{route}.large.{i}",
                                 f"no upstream named {up!r} (upstreams: {known}); add it under "
                                 "upstreams or fix the name"))
    return problems


def parse_routes(raw: Any, *, base_dir: Path = Path("."), source: str | None = None
                 ) -> RoutesConfig:
    """Validate a parsed YAML/JSON mapping; relative paths are taken from ``base_dir``.
    ``source`` (the file) starts the error message."""
    if not isinstance(raw, dict):
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}the routes config must be a mapping with upstreams: and "
                          f"routes:, got {type(raw).__name__}")
    try:
        return RoutesConfig.model_validate(raw, context={"base_dir": Path(base_dir)})
    except ValidationError as e:
        lines = format_errors(e, DOCS)
    # The cross-section checks only run once every field is valid; run them on the raw
    # mapping too so one pass reports every problem.
    ups, routes = raw.get("upstreams", {}), raw.get("routes")
    if isinstance(ups, dict) and isinstance(routes, dict):
        larges = {n: (r.get("large") if isinstance(r, dict) else None) for n, r in routes.items()}
        for p, m in _cross_problems(ups, larges):
            line = f"{p}: {m}"
            if line not in lines:
                lines.append(line)
    raise problems_error(source, "routes config", lines)


def load_routes(path: Path | str) -> RoutesConfig:
    """Read ``path`` (YAML) into a :class:`RoutesConfig`; a key given twice in one mapping
    (a route or upstream defined twice) is an error."""
    path = Path(path)
    raw = load_yaml(path, missing=f"--config: routes config {path} does not exist; pass the "
                    "path of a YAML file with upstreams: and routes:")
    return parse_routes(raw, base_dir=path.parent, source=str(path))
