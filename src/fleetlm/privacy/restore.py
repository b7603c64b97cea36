"""Placeholders back to values: whole texts (:func:`restore`) and token streams
(:class:`StreamRestorer`), e.g. a remote model's answer streamed back to the user.

Only placeholders that the request's mapping knows are replaced; anything else that
looks like one (``<FOO_9>``, a placeholder of another request) passes through as it is.
The stream restorer emits text as soon as it can no longer become a known placeholder:
since a placeholder contains no ``<`` after its first character, an unfinished one can
only start at the last ``<`` of what has arrived, so that suffix -- and only while it is
still a prefix of a known placeholder -- is all it ever holds back.

``encode`` writes each value in the syntax of the text it is put into: a placeholder inside
a JSON string (a tool call's arguments) gets the value JSON-escaped (:func:`json_escape`), so
a value with a quote, a backslash or a line break keeps the arguments valid JSON.

This module knows nothing about detection; it reads a :class:`PiiMapping`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from fleetlm.privacy.mapping import PLACEHOLDER_RE, PiiMapping

Encode = Callable[[str], str]  # a value -> how it is written where the placeholder stood


def json_escape(value: str) -> str:
    """``value`` as the inside of a JSON string literal (no quotes around it)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def restore(text: str, mapping: PiiMapping, encode: Encode | None = None) -> str:
    """``text`` with every placeholder of ``mapping`` replaced by its value (written by
    ``encode``, e.g. :func:`json_escape`, when given)."""
    if "<" not in text:
        return text

    def sub(m: re.Match[str]) -> str:
        value = mapping.value_of(m.group(0))
        if value is None:
            return m.group(0)
        return value if encode is None else encode(value)

    return PLACEHOLDER_RE.sub(sub, text)


class StreamRestorer:
    """Restores placeholders in a stream of chunks that may cut one anywhere
    (``"<PER"``, ``"SON_1> said"``). ``"".join(feed(c) for c in chunks) + flush()``
    equals ``restore("".join(chunks), mapping)``.

    One restorer per stream; it reads the mapping on every chunk, so the mapping must
    not gain placeholders while a stream is being restored.
    """

    __slots__ = ("_encode", "_mapping", "_pending")

    def __init__(self, mapping: PiiMapping, encode: Encode | None = None) -> None:
        self._mapping = mapping
        self._encode = encode
        self._pending = ""  # the held-back tail: "" or "<" + a proper prefix of a placeholder

    def feed(self, chunk: str) -> str:
        """The restored text that can be emitted now; holds back a possible placeholder start."""
        buf = self._pending + chunk
        cut = len(buf)
        i = buf.rfind("<")
        # a '>' after the last '<' closes that candidate: it is complete (restored below)
        # or not a placeholder at all; either way nothing after it needs waiting for
        if i != -1 and ">" not in buf[i:] and self._mapping.is_placeholder_prefix(buf[i:]):
            cut = i
        self._pending = buf[cut:]
        return restore(buf[:cut], self._mapping, self._encode)

    def flush(self) -> str:
        """End of stream: whatever was held back (an unfinished placeholder stays as typed)."""
        out, self._pending = self._pending, ""
        return out
