"""Regular expressions that come from an adapter's files, run in bounded time.

PEFT lets ``adapter_config.json`` carry regexes (``target_modules`` as a string,
``exclude_modules``, ``layers_pattern``, the keys of ``rank_pattern`` / ``alpha_pattern``)
and matches them with Python's ``re``, whose backtracking makes a pattern such as
``(([a-z_.0-9])+)+Z`` take exponential time on a module name: one uploaded file would
freeze the process. Every such pattern is compiled here with RE2 (``google-re2``), whose
matching time is linear in the text and the pattern, and is capped in length. RE2 has no
lookaround and no backreferences; a pattern that needs them is refused with the reason.

Matching semantics are those of ``re`` for the patterns PEFT writes (leftmost-first,
``.*?`` lazy, ``(?P<name>...)`` groups, ``$`` at the end of the text: module names hold no
newline). Our own fixed patterns keep using ``re``. This module knows nothing of PEFT's
keys or of adapters; :mod:`fleetlm.adapters.peft_format` says which patterns are whose.
"""

from __future__ import annotations

from typing import Any

MAX_PATTERN_CHARS = 1000
MAX_PATTERNS = 1000  # keys of one rank_pattern / alpha_pattern, entries of layers_pattern

_WHY_RE2 = ("adapter patterns run on RE2, which matches in linear time and so has no "
            "lookaround and no backreferences; rewrite it without them, or list the "
            "module names instead")


class PatternError(ValueError):
    """A user pattern that will not be run; the message says why (it reads after the
    pattern's name: ``target_modules '...' <message>``)."""


def compile_user_regex(pattern: Any, template: str = "{}") -> Any:
    """``template`` with ``pattern`` in place of its ``{}`` (how PEFT embeds it), compiled
    by RE2: an object with ``match``/``fullmatch``/``search`` like ``re.Pattern``. Raises
    PatternError for a non-string, a pattern over MAX_PATTERN_CHARS, or one RE2 refuses."""
    import re2  # google-re2; imported here so importing the adapters stays cheap

    if not isinstance(pattern, str):
        raise PatternError(f"must be a string, not {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"is {len(pattern)} characters long; the limit is "
                           f"{MAX_PATTERN_CHARS}")
    full = template.format(pattern)
    try:
        return re2.compile(full, _options())
    except re2.error as e:
        reason = e.args[0] if e.args else ""
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        if "too large" in reason or "too big" in reason:
            raise PatternError(f"compiles to too large a program ({reason}); simplify it "
                               "(fewer or smaller counted repetitions)") from None
        if _python_accepts(full):
            raise PatternError(f"cannot be run safely (RE2: {reason}): {_WHY_RE2}") from None
        raise PatternError(f"is not a valid regular expression ({reason})") from None


def _options() -> Any:
    import re2

    options = re2.Options()
    options.log_errors = False  # the error is raised to the caller, not logged to stderr
    return options


def _python_accepts(pattern: str) -> bool:
    """Whether ``re`` compiles it (compiling never backtracks; only matching does)."""
    import re

    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True
