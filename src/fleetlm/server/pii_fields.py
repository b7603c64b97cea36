"""Which fields of an OpenAI chat exchange carry free text: redacted in the body that goes to
a large upstream, restored in the answer that comes back (whole or streamed).

    hits = redact_body(body, lambda text: redactor.redact(text, mapping)[0])
    restore_answer(response_json, mapping)             # a chat.completion, in place
    stream = AnswerRestorer(mapping)
    for chunk in chunks: stream.feed(chunk); send(chunk)   # chat.completion.chunk, in place
    last = stream.flush()                              # a final chunk, or None

Redacted, in this order (message text first: repeats of a value found there are then caught
everywhere else): every message's ``content`` (a string, or its ``text`` / ``refusal``
parts); then each message's ``name`` and ``refusal``, an assistant's
``tool_calls[].function.arguments`` and legacy ``function_call.arguments`` (JSON: each string
value inside, keys kept, the JSON kept valid; text that is not JSON is redacted as text);
``user``; ``metadata`` values; ``stop``; the ``description`` of tools and legacy functions
and the annotations of their parameter schemas (``description``, ``title``, ``default``,
``const``, ``enum`` and ``examples`` strings, at any depth), and the same in a
``response_format`` JSON schema. Not redacted: identifiers (roles, ids, function and property
names, ``tool_choice``), numbers and booleans.

Restored: ``content`` and ``refusal`` of each choice, ``tool_calls[].function.arguments`` and
``function_call.arguments`` (values JSON-escaped); streamed, per choice and per tool call
index, a placeholder cut across chunks held back until whole and flushed at the choice's
``finish_reason`` (or at the end of the stream).

This module knows OpenAI shapes and placeholders; detection is the caller's ``redact``
function, placeholders and their values are :mod:`fleetlm.privacy`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fleetlm.privacy.detect import PiiDetectionError
from fleetlm.privacy.mapping import PiiMapping
from fleetlm.privacy.restore import StreamRestorer, json_escape, restore

Redact = Callable[[str], str]  # a text -> the text with its personal data replaced

# The most characters of free text one request may have scanned: past it the request is not
# escalated (fail closed). Detection runs ~25,000 characters/s on one core, so this is ~8 s.
MAX_SCAN_CHARS = 200_000
# JSON-schema keywords whose values are prose or example values, not structure: every
# string inside them is scanned
SCHEMA_TEXT = ("description", "title", "default", "const")
SCHEMA_TEXT_LISTS = ("enum", "examples")
# keywords whose value maps names to schemas
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class PiiInputTooLarge(PiiDetectionError):
    """A request's free text is over :data:`MAX_SCAN_CHARS`: nothing was scanned or sent."""


# -- redaction ------------------------------------------------------------------------------


def free_texts(body: dict[str, Any]) -> list[str]:
    """Every free-text string :func:`redact_body` would scan, in its order (for size checks
    and tests)."""
    seen: list[str] = []

    def record(text: str) -> str:
        seen.append(text)
        return text

    _walk(body, record, [])
    return seen


def redact_body(body: dict[str, Any], redact: Redact) -> list[str]:
    """Redact every free-text field of an upstream chat body in place; the paths of the
    fields that changed (``messages.0.content``, ``user``...), in order. Raises
    :class:`PiiInputTooLarge` before scanning anything when the free text is too long;
    whatever ``redact`` raises propagates (the body must then not be sent)."""
    total = sum(len(t) for t in free_texts(body))
    if total > MAX_SCAN_CHARS:
        raise PiiInputTooLarge(f"the request has {total} characters of text to scan for "
                               f"personal data, over the limit of {MAX_SCAN_CHARS}; it was not "
                               "sent upstream")
    hits: list[str] = []
    _walk(body, redact, hits)
    return hits


def _walk(body: dict[str, Any], redact: Redact, hits: list[str]) -> None:
    def text(holder: Any, key: Any, path: str) -> None:
        value = holder[key]
        if isinstance(value, str) and value:
            new = redact(value)
            if new != value:
                holder[key] = new
                hits.append(path)

    messages = body.get("messages") or []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str):
            text(m, "content", f"messages.{i}.content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                for key in ("text", "refusal"):
                    if isinstance(part, dict) and part.get("type") == key and key in part:
                        text(part, key, f"messages.{i}.content.{j}.{key}")
    for i, m in enumerate(messages):
        for key in ("name", "refusal"):
            if key in m:
                text(m, key, f"messages.{i}.{key}")
        for k, call in enumerate(m.get("tool_calls") or []):
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                _json_text(call["function"], redact, f"messages.{i}.tool_calls.{k}.function",
                           hits)
        if isinstance(m.get("function_call"), dict):
            _json_text(m["function_call"], redact, f"messages.{i}.function_call", hits)
    if "user" in body:
        text(body, "user", "user")
    for key in body.get("metadata") or {}:
        text(body["metadata"], key, f"metadata.{key}")
    stop = body.get("stop")
    if isinstance(stop, str):
        text(body, "stop", "stop")
    elif isinstance(stop, list):
        for k in range(len(stop)):
            text(stop, k, f"stop.{k}")
    for i, tool in enumerate(body.get("tools") or []):
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            _function(tool["function"], text, f"tools.{i}.function")
    for i, fn in enumerate(body.get("functions") or []):
        if isinstance(fn, dict):
            _function(fn, text, f"functions.{i}")
    rf = body.get("response_format")
    schema = rf.get("json_schema") if isinstance(rf, dict) else None
    if isinstance(schema, dict):
        _function(schema, text, "response_format.json_schema", params="schema")


def _function(fn: dict[str, Any], text: Callable[[Any, Any, str], None], path: str,
              params: str = "parameters") -> None:
    if "description" in fn:
        text(fn, "description", f"{path}.description")
    if isinstance(fn.get(params), dict | list):
        _schema(fn[params], text, f"{path}.{params}")


def _schema(node: Any, text: Callable[[Any, Any, str], None], path: str) -> None:
    """The prose of a JSON schema: annotation strings, at any depth (property names kept)."""
    pairs: list[tuple[Any, Any]] = list(node.items()) if isinstance(node, dict) \
        else list(enumerate(node))
    for key, value in pairs:
        where = f"{path}.{key}"
        if isinstance(node, dict) and key in SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():  # name -> schema: a property named "title" is
                if isinstance(sub, dict | list):  # a schema, not an annotation
                    _schema(sub, text, f"{where}.{name}")
        elif isinstance(node, dict) and key in (*SCHEMA_TEXT, *SCHEMA_TEXT_LISTS):
            _values(node, key, text, where)  # prose, or example values: every string
        elif isinstance(value, dict | list):
            _schema(value, text, where)


def _values(holder: Any, key: Any, text: Callable[[Any, Any, str], None], path: str) -> None:
    """Every string inside ``holder[key]`` (a JSON value: an enum, an object default...)."""
    value = holder[key]
    if isinstance(value, str):
        text(holder, key, path)
    elif isinstance(value, dict | list):
        for k in list(value.keys() if isinstance(value, dict) else range(len(value))):
            _values(value, k, text, f"{path}.{k}")


def _json_text(fn: dict[str, Any], redact: Redact, path: str, hits: list[str]) -> None:
    """A function call's ``arguments``: a JSON text whose string values are redacted one by
    one (keys kept, re-serialised only when something changed), else redacted as text."""
    raw = fn.get("arguments")
    if not isinstance(raw, str) or not raw:
        return
    where = f"{path}.arguments"
    try:
        parsed = json.loads(raw)
    except ValueError:
        new = redact(raw)
        if new != raw:
            fn["arguments"] = new
            hits.append(where)
        return
    before = len(hits)

    def walk(node: Any, at: str) -> Any:
        if isinstance(node, str):
            new = redact(node) if node else node
            if new != node:
                hits.append(at)
            return new
        if isinstance(node, dict):
            return {k: walk(v, f"{at}.{k}") for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{at}.{k}") for k, v in enumerate(node)]
        return node

    parsed = walk(parsed, where)
    if len(hits) > before:
        fn["arguments"] = json.dumps(parsed, ensure_ascii=False)


# -- restoring ------------------------------------------------------------------------------


def restore_answer(data: dict[str, Any], mapping: PiiMapping) -> None:
    """A chat.completion with the mapping's placeholders restored, in place: each choice's
    ``content`` (a string or text parts), ``refusal``, tool-call and function-call
    arguments (JSON-escaped)."""
    for choice in data.get("choices") or []:
        msg = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(msg, dict):
            continue
        for key in ("content", "refusal"):
            if isinstance(msg.get(key), str):
                msg[key] = restore(msg[key], mapping)
        if isinstance(msg.get("content"), list):
            for part in msg["content"]:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part["text"] = restore(part["text"], mapping)
        for fn in _calls(msg):
            fn["arguments"] = restore(fn["arguments"], mapping, json_escape)


def _calls(msg: dict[str, Any]) -> list[dict[str, Any]]:
    """The function objects with string ``arguments`` of a message or delta."""
    fns = [call.get("function") for call in msg.get("tool_calls") or []
           if isinstance(call, dict)]
    fns.append(msg.get("function_call"))
    return [fn for fn in fns if isinstance(fn, dict) and isinstance(fn.get("arguments"), str)]


class AnswerRestorer:
    """Restores a streamed chat answer chunk by chunk, in place: one
    :class:`~fleetlm.privacy.restore.StreamRestorer` per choice for ``delta.content``, one
    for ``delta.refusal``, one per tool call index for ``delta.tool_calls[].function.arguments``
    and one for ``delta.function_call.arguments``. What a restorer holds back (a possible
    placeholder start) is sent at its choice's ``finish_reason``, or by :meth:`flush`."""

    def __init__(self, mapping: PiiMapping) -> None:
        self.mapping = mapping
        # (choice index, field, tool call index or -1) -> its restorer
        self._open: dict[tuple[int, str, int], StreamRestorer] = {}

    def _restorer(self, key: tuple[int, str, int]) -> StreamRestorer:
        r = self._open.get(key)
        if r is None:
            encode = json_escape if key[1] in ("tool_calls", "function_call") else None
            r = self._open[key] = StreamRestorer(self.mapping, encode)
        return r

    def feed(self, chunk: dict[str, Any]) -> None:
        """Restore one chunk in place (a held-back tail leaves its text shorter)."""
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            i = choice.get("index", 0)
            i = i if isinstance(i, int) else 0
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for key in ("content", "refusal"):
                    if isinstance(delta.get(key), str):
                        delta[key] = self._restorer((i, key, -1)).feed(delta[key])
                for call in delta.get("tool_calls") or []:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        k = call.get("index", 0)
                        k = k if isinstance(k, int) else 0
                        fn["arguments"] = self._restorer((i, "tool_calls", k)).feed(
                            fn["arguments"])
                fc = delta.get("function_call")
                if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
                    fc["arguments"] = self._restorer((i, "function_call", -1)).feed(
                        fc["arguments"])
            if choice.get("finish_reason") is not None:
                if not isinstance(delta, dict):
                    delta = choice["delta"] = {}
                self._tails(i, delta)

    def _tails(self, choice: int, delta: dict[str, Any]) -> bool:
        """Append choice ``choice``'s held-back text to ``delta``; whether there was any."""
        any_tail = False
        for key in sorted(k for k in self._open if k[0] == choice):
            tail = self._open.pop(key).flush()
            if not tail:
                continue
            any_tail = True
            _, field, k = key
            if field in ("content", "refusal"):
                delta[field] = (delta.get(field) or "") + tail
            elif field == "function_call":
                fc = delta.setdefault("function_call", {})
                fc["arguments"] = (fc.get("arguments") or "") + tail
            else:
                calls = delta.setdefault("tool_calls", [])
                call = next((c for c in calls if isinstance(c, dict) and c.get("index") == k),
                            None)
                if call is None:
                    calls.append({"index": k, "function": {"arguments": tail}})
                else:
                    fn = call.setdefault("function", {})
                    fn["arguments"] = (fn.get("arguments") or "") + tail
        return any_tail

    def flush(self) -> dict[str, Any] | None:
        """At the end of the stream: a last chunk with what is still held back (choices that
        ended without a ``finish_reason``), as it came; None when nothing is."""
        choices = []
        for i in sorted({k[0] for k in self._open}):
            delta: dict[str, Any] = {}
            if self._tails(i, delta):
                choices.append({"index": i, "delta": delta, "finish_reason": None})
        return {"object": "chat.completion.chunk", "choices": choices} if choices else None
