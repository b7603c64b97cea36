"""Per-request sampling settings, validated with errors that name the field.

The one place a request's sampling settings are checked: the engine validates each
request's :class:`SamplingParams` when it is submitted, and the error carries the first bad
field as ``ConfigError.param`` (the HTTP layer reports it as the OpenAI error's ``param``).

Plain data: no torch here, so the scheduler and the server can use it freely. It knows
nothing of HTTP, tokenizers or grammars (whether a schema compiles is the constraint's job).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetlm.errors import ConfigError

# "choice" is fleetlm's extension: {"type": "choice", "choices": ["a", "b"]}, output exactly one
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "choice")
MAX_CHOICES = 4096
# Stop strings are searched for after every token on the engine's thread, at a cost that
# grows with their number and, for the held-back partial match, their length squared: these
# bound it (16 x 256 characters: well under a millisecond per token in the worst case).
# OpenAI allows 4 strings; 16 leaves room for templates' end markers, and 256 characters is
# far longer than any end marker or delimiter line.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


# temperatures under this are greedy decoding (the limit of sampling as T -> 0)
GREEDY_BELOW = 1e-6


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    min_p: float = 0.0  # 0 -> off
    repetition_penalty: float = 1.0  # HF-style, over prompt and output tokens; 1 -> off
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the output
    stop_token_ids: list[int] = field(default_factory=list)  # added to the model's eos ids
    ignore_eos: bool = False
    logprobs: int | None = None  # None -> off; k -> chosen token's logprob + top-k alternatives
    # None -> off; k -> every prompt token's logprob (given the tokens before it) + top-k;
    # with it, max_tokens may be 0: score the prompt, generate nothing
    prompt_logprobs: int | None = None
    # OpenAI shape: {"type": "json_object"} or {"type": "json_schema", "json_schema":
    # {"name": ..., "schema": {...}, "strict": ...}}; None or {"type": "text"} -> free text
    response_format: dict[str, Any] | None = None

    @property
    def constrained(self) -> bool:
        """Output must follow a grammar (a token mask per step)."""
        return self.response_format is not None and self.response_format.get("type") != "text"

    @property
    def greedy(self) -> bool:
        # a temperature this small samples the top token anyway, and one that is 0 in float32
        # (below ~1e-45) would divide by zero in the sampler
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise one ConfigError listing every invalid field (``param``: the first of them);
        return self for chaining."""
        if isinstance(self.stop, str):  # OpenAI allows a single string
            self.stop = [self.stop]
        problems = self._problems(vocab_size)
        if problems:
            raise ConfigError("invalid sampling parameters: " + "; ".join(p for _, p in problems),
                              param=problems[0][0])
        return self

    def _problems(self, vocab_size: int | None) -> list[tuple[str, str]]:
        """(field, problem) for every invalid field."""
        problems: list[tuple[str, str]] = []

        def bad(name: str, problem: str) -> None:
            problems.append((name, problem))

        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            bad("max_tokens", f"max_tokens={self.max_tokens}: must be >= 1 (0 only to score a "
                "prompt without generating, as echo does)")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad("prompt_logprobs", f"prompt_logprobs={self.prompt_logprobs}: must be in [0, 20]")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", f"temperature={self.temperature}: must be in [0, 100]")
        if self.top_k < 0:
            bad("top_k", f"top_k={self.top_k}: must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"top_p={self.top_p}: must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"min_p={self.min_p}: must be in [0, 1]")
        if self.repetition_penalty <= 0.0:
            bad("repetition_penalty", f"repetition_penalty={self.repetition_penalty}: must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                bad(name, f"{name}={v}: must be in [-2, 2]")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            # torch's generator takes a 64-bit seed; a larger one raised ValueError (a 500)
            bad("seed", f"seed={self.seed}: must be a 64-bit integer, in [-2^63, 2^64)")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", f"logprobs={self.logprobs}: must be in [0, 20]")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            bad("stop", "stop: every stop string must be a non-empty string")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        long = [i for i, s in enumerate(self.stop) if isinstance(s, str) and len(s) > MAX_STOP_CHARS]
        if long:
            bad("stop", f"stop: each stop string may be at most {MAX_STOP_CHARS} characters; "
                f"{', '.join(f'stop[{i}] has {len(self.stop[i])}' for i in long[:4])}"
                f"{' ...' if len(long) > 4 else ''}; send shorter stop strings")
        for problem in _response_format_problems(self.response_format):
            bad("response_format", problem)
        if vocab_size is not None:
            ids = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if ids:
                bad("stop_token_ids", f"stop_token_ids={ids}: outside the vocabulary [0, {vocab_size})")
        return problems


def _response_format_problems(rf: object) -> list[str]:
    """Shape checks only; whether the schema itself compiles is the constraint's job."""
    if rf is None:
        return []
    if not isinstance(rf, dict) or rf.get("type") not in RESPONSE_FORMAT_TYPES:
        kind = rf.get("type") if isinstance(rf, dict) else rf
        return [f"response_format: type {kind!r} is not one of {', '.join(RESPONSE_FORMAT_TYPES)}"]
    if rf["type"] == "choice":
        choices = rf.get("choices")
        if (not isinstance(choices, list) or not choices
                or any(not isinstance(c, str) or c == "" for c in choices)):
            return ["response_format: type 'choice' needs 'choices', a non-empty list of "
                    "non-empty strings"]
        if len(choices) > MAX_CHOICES:
            return [f"response_format: at most {MAX_CHOICES} choices, got {len(choices)}"]
        return []
    if rf["type"] != "json_schema":
        return []
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        return ["response_format: type 'json_schema' needs a 'json_schema' object "
                "({\"name\": ..., \"schema\": {...}})"]
    if "schema" in spec and not isinstance(spec["schema"], dict):
        return ["response_format: json_schema.schema must be a JSON object (a JSON schema)"]
    return []
