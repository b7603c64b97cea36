"""The JSON body an escalated chat request sends to a large upstream, built from the
validated request: an allow-list of the OpenAI chat fields, never the client's raw body.

    body, dropped = upstream_body(req, non_text="refuse")   # APIError 400 on an image part

Only the fields in :data:`FORWARDED` that the client set go up, each as validated (``"n":
"2"`` goes up as 2): fleetlm's own fields (``ignore_eos``, a ``{"type": "choice"}``
``response_format``) and any field fleetlm does not declare stay behind. Messages keep
``role``, ``content``, ``name``, ``tool_calls``, ``tool_call_id``, ``function_call`` and
``refusal``; tools keep ``type`` and ``function`` (``name``, ``description``, ``parameters``,
``strict``); ``tool_choice`` and ``function_call`` keep a function's name; ``response_format``
keeps ``type`` and a ``json_schema``'s ``name``, ``description``, ``schema``, ``strict``. The
upstream client sets ``model``.

Content parts: ``text`` (and an assistant's ``refusal``) parts are rebuilt from their text;
with personal-data handling on (``non_text`` given) every other part (``image_url``,
``input_audio``, ``file``, anything unknown) cannot be scanned, so it is refused (400 naming
the part) or dropped, never sent; with it off (``non_text=None``) parts go as sent.

Redacting the free text of the body is :mod:`fleetlm.server.pii_fields`. This module knows
OpenAI request shapes; it knows nothing of detection, routes or upstreams.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from fleetlm.server.errors import INVALID_REQUEST, APIError
from fleetlm.server.protocol import ChatCompletionRequest, ChatMessage, FunctionDefinition

# top-level OpenAI chat fields that may go upstream (when the client set them); "messages"
# and the tool fields are rebuilt below
FORWARDED = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
             "seed", "stream", "stream_options", "presence_penalty", "frequency_penalty",
             "logprobs", "top_logprobs", "logit_bias", "response_format", "user", "metadata",
             "tool_choice", "parallel_tool_calls", "function_call")
TEXT_PARTS = {"text": "text", "refusal": "refusal"}  # part type -> the key holding its text
NonText = Literal["refuse", "drop"]


def upstream_body(req: ChatCompletionRequest, messages: list[ChatMessage] | None = None, *,
                  non_text: NonText | None = None) -> tuple[dict[str, Any], list[str]]:
    """The body for the upstream (``messages`` replace the request's, e.g. a task route's),
    and the paths of the content parts dropped (``messages.0.content.1``). ``non_text``:
    what to do with parts that are not text (None: send them as they are)."""
    body: dict[str, Any] = {}
    for name in FORWARDED:
        value = getattr(req, name)
        if name in req.model_fields_set and value is not None:
            body[name] = value.model_dump(exclude_none=True) if hasattr(value, "model_dump") \
                else value
    if "response_format" in body:
        rf = _response_format(body.pop("response_format"))
        if rf is not None:  # None: fleetlm's own {"type": "choice"}; the messages say what
            body["response_format"] = rf
    for name in ("tool_choice", "function_call"):
        if name in body:
            body[name] = _choice(name, body[name])
    if req.tools is not None:
        body["tools"] = [_tool(i, t.type, t.function) for i, t in enumerate(req.tools)]
    if req.functions is not None:
        body["functions"] = [_function(f) for f in req.functions]
    dropped: list[str] = []
    body["messages"] = [_message(i, m, non_text, dropped)
                        for i, m in enumerate(messages if messages is not None else req.messages)]
    # a copy: redacting the body in place must not touch the request (a fallback answers it)
    return copy.deepcopy(body), dropped


def _message(i: int, m: ChatMessage, non_text: NonText | None, dropped: list[str]
             ) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role}
    if isinstance(m.content, list):
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(m.content):
            kind = part.get("type")
            key = TEXT_PARTS.get(kind) if isinstance(kind, str) else None
            if key is not None and isinstance(part.get(key), str):
                parts.append({"type": kind, key: part[key]})
            elif non_text is None:
                parts.append(part)
            elif non_text == "drop":
                dropped.append(f"messages.{i}.content.{j}")
            else:
                raise APIError(400, f"messages.{i}.content.{j}: a {kind!r} part cannot be "
                                    "scanned for personal data, and this route sends the "
                                    "request to a large upstream with personal data removed; "
                                    "send text only, use a route with pii: off, or set "
                                    "non_text_parts: drop on the route", INVALID_REQUEST,
                               f"messages.{i}.content.{j}", "non_text_part")
        out["content"] = parts or ""  # every part dropped: an empty text, not an empty list
    elif m.content is not None or "content" in m.model_fields_set:
        out["content"] = m.content
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls is not None:
        out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
            "name": c.function.name, "arguments": c.function.arguments}} for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.function_call is not None:
        out["function_call"] = {"name": m.function_call.name,
                                "arguments": m.function_call.arguments}
    if m.refusal is not None:
        out["refusal"] = m.refusal
    return out


def _function(f: FunctionDefinition) -> dict[str, Any]:
    return f.model_dump(exclude_none=True)


def _tool(i: int, kind: str, fn: FunctionDefinition | None) -> dict[str, Any]:
    if kind != "function" or fn is None:
        raise APIError(400, f"tools.{i}: only function tools ({{\"type\": \"function\", "
                            "\"function\": {\"name\", ...}}) can be sent to a large upstream; "
                            f"got type {kind!r}" + ("" if fn else " without a function"),
                       INVALID_REQUEST, f"tools.{i}")
    return {"type": "function", "function": _function(fn)}


def _response_format(rf: dict[str, Any]) -> dict[str, Any] | None:
    """``{"type"}``, with a ``json_schema`` object's ``name``, ``description``, ``schema`` and
    ``strict``; None for fleetlm's own ``choice`` (SamplingParams checked the shape)."""
    kind = rf.get("type")
    if kind == "choice":
        return None
    out: dict[str, Any] = {"type": kind}
    js = rf.get("json_schema")
    if kind == "json_schema" and isinstance(js, dict):
        out["json_schema"] = {k: js[k] for k in ("name", "description", "schema", "strict")
                              if k in js}
    return out


_CHOICES = {"tool_choice": ("none", "auto", "required"), "function_call": ("none", "auto")}


def _choice(name: str, value: str | dict[str, Any]) -> str | dict[str, Any]:
    """A ``tool_choice`` / ``function_call``: one of its words, or a function object rebuilt
    (only the function's name goes)."""
    if isinstance(value, str) and value in _CHOICES[name]:
        return value
    fn = value.get("function") if isinstance(value, dict) and name == "tool_choice" else value
    fn_name = fn.get("name") if isinstance(fn, dict) else None
    if isinstance(fn_name, str) and (name == "function_call" or
                                     isinstance(value, dict) and value.get("type") == "function"):
        return {"type": "function", "function": {"name": fn_name}} if name == "tool_choice" \
            else {"name": fn_name}
    shape = ('{"type": "function", "function": {"name": ...}}' if name == "tool_choice"
             else '{"name": ...}')
    words = " or ".join(f'"{w}"' for w in _CHOICES[name])
    raise APIError(400, f"{name}: give {words}, or {shape}", INVALID_REQUEST, name)
