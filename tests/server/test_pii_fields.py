"""Every field that leaves is redacted, every field that returns is restored.

Fast tests (no model): the upstream body is an allow-list built from the validated request;
a corpus request carrying a name, an e-mail address, a phone number and an IBAN in every
free-text field goes through a stand-in redactor and none of the values is left; non-text
parts are refused or dropped; the answer, whole or streamed in pieces of 1 to 3 characters
(placeholders cut across chunks, inside tool-call arguments too), comes back restored.

Slow tests (the real detector and a live server, ``always-large`` routes over a stub upstream
that records every body and echoes back the placeholders it received, in content, tool calls
and a legacy function call, streamed in 3-character fragments): no raw value reaches the
stub, every value comes back; a non-text part is refused (400 naming it) or dropped; a
detector error or too much text sends nothing upstream.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fleetlm.privacy.mapping import PLACEHOLDER_RE, PiiMapping
from fleetlm.privacy.restore import restore
from fleetlm.server import pii_fields
from fleetlm.server.errors import APIError
from fleetlm.server.pii_fields import (
    AnswerRestorer,
    PiiInputTooLarge,
    free_texts,
    redact_body,
    restore_answer,
)
from fleetlm.server.protocol import ChatCompletionRequest
from fleetlm.server.upstream_body import upstream_body

NAME, EMAIL, PHONE = "John Smith", "john.smith@example.com", "(415) 555-2671"
IBAN = "DE89 3704 0044 0532 0130 00"
VALUES = {NAME: ("PERSON", "<PERSON_1>"), EMAIL: ("EMAIL_ADDRESS", "<EMAIL_ADDRESS_1>"),
          PHONE: ("PHONE_NUMBER", "<PHONE_NUMBER_1>"), IBAN: ("IBAN_CODE", "<IBAN_CODE_1>")}
# what must never reach an upstream: the values and distinctive pieces of them
LEAKS = (NAME, EMAIL, PHONE, IBAN, "Smith", "555-2671", "0532 0130")


def corpus(model: str = "r", *, stream: bool = False, schema: bool = True) -> dict[str, Any]:
    """A chat request with the four values in every free-text field fleetlm forwards."""
    args = json.dumps({"customer": NAME, "contact": {"email": EMAIL, "phones": [PHONE]},
                       "iban": IBAN, "count": 2})
    body: dict[str, Any] = {
        "model": model, "stream": stream, "max_tokens": 8, "temperature": 0,
        "user": f"{NAME} <{EMAIL}>",
        "metadata": {"customer": NAME, "contact": EMAIL, "phone": PHONE},
        "stop": [f"Goodbye {NAME}"],
        "tools": [{"type": "function", "function": {
            "name": "lookup_account", "description": f"Look up the account of {NAME}, {IBAN}",
            "parameters": {"type": "object", "description": f"A query about {EMAIL}",
                           "properties": {
                               "iban": {"type": "string", "description": f"e.g. {IBAN}",
                                        "enum": [IBAN, "other"]},
                               "phone": {"type": "string", "default": PHONE,
                                         "examples": [PHONE], "title": f"Phone of {NAME}"},
                               # a property named like an annotation is still a schema
                               "title": {"type": "string", "description": f"Mr {NAME}"}},
                           "required": ["iban"]}}}],
        "functions": [{"name": "notify", "description": f"Text {NAME} at {PHONE}",
                       "parameters": {"type": "object", "properties": {
                           "to": {"type": "string", "title": f"Recipient {EMAIL}"}}}}],
        "tool_choice": "auto",
        "messages": [
            {"role": "system", "content": f"You help {NAME} ({EMAIL}) with the bank account."},
            {"role": "user", "name": NAME, "content": [
                {"type": "text", "text": f"Hi, I am {NAME}, e-mail {EMAIL}, phone {PHONE}, "
                                         f"IBAN {IBAN}."}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "lookup_account", "arguments": args}}]},
            {"role": "tool", "tool_call_id": "call_1",
             "content": json.dumps({"owner": NAME, "iban": IBAN, "phone": PHONE})},
            {"role": "assistant", "content": f"I found the account of {NAME}.",
             "function_call": {"name": "notify", "arguments": f"not json: call {PHONE}"}},
            {"role": "function", "name": "notify", "content": f"Sent to {PHONE} for {NAME}"},
            {"role": "assistant", "refusal": f"I cannot share {IBAN}",
             "content": [{"type": "refusal", "refusal": f"Not for {NAME}"}]},
            {"role": "developer", "content": f"Confirm with {EMAIL}"},
            {"role": "user", "content": f"Please send it to {EMAIL}, {NAME}."},
        ],
    }
    if schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "answer", "description": f"The answer for {NAME}", "schema": {
                "type": "object", "properties": {"who": {"type": "string",
                                                         "description": f"Usually {NAME}"}}}}}
    return body


# every free-text field of the corpus: the paths redact_body must report as changed
FIELDS = {
    "messages.0.content", "messages.1.content.0.text", "messages.3.content",
    "messages.4.content", "messages.5.content", "messages.6.content.0.refusal",
    "messages.7.content", "messages.8.content", "messages.1.name",
    "messages.2.tool_calls.0.function.arguments.customer",
    "messages.2.tool_calls.0.function.arguments.contact.email",
    "messages.2.tool_calls.0.function.arguments.contact.phones.0",
    "messages.2.tool_calls.0.function.arguments.iban", "messages.4.function_call.arguments",
    "messages.6.refusal", "user", "metadata.customer", "metadata.contact", "metadata.phone",
    "stop.0", "tools.0.function.description", "tools.0.function.parameters.description",
    "tools.0.function.parameters.properties.iban.description",
    "tools.0.function.parameters.properties.iban.enum.0",
    "tools.0.function.parameters.properties.phone.default",
    "tools.0.function.parameters.properties.phone.examples.0",
    "tools.0.function.parameters.properties.phone.title",
    "tools.0.function.parameters.properties.title.description", "functions.0.description",
    "functions.0.parameters.properties.to.title", "response_format.json_schema.description",
    "response_format.json_schema.schema.properties.who.description",
}


def fake_redact(text: str) -> str:
    """The detector's stand-in: the four values, exactly."""
    for value, (_, ph) in VALUES.items():
        text = text.replace(value, ph)
    return text


def mapping_of_values() -> PiiMapping:
    m = PiiMapping()
    for value, (kind, ph) in VALUES.items():
        assert m.placeholder_for(value, kind) == ph
    return m


def body_of(raw: dict[str, Any], non_text: Any = None) -> dict[str, Any]:
    body, _ = upstream_body(ChatCompletionRequest.model_validate(raw), non_text=non_text)
    return body


# -- the body: an allow-list ------------------------------------------------------------------


def test_the_upstream_body_is_built_from_declared_fields_only():
    raw = {**corpus(), "ignore_eos": True, "made_up": {"secret": NAME}, "store": True,
           "n": "2", "audio": {"voice": NAME}}
    raw["messages"][0]["extra"] = NAME
    raw["tools"][0]["function"]["x-note"] = NAME
    raw["tools"][0]["x-note"] = NAME
    body = body_of(raw)
    assert "ignore_eos" not in body and "made_up" not in body and "store" not in body
    assert "audio" not in body and "model" not in body  # the upstream client sets model
    assert body["n"] == 2 and body["max_tokens"] == 8 and body["tool_choice"] == "auto"
    assert "extra" not in body["messages"][0]
    assert body["tools"][0] == {"type": "function", "function": {
        k: raw["tools"][0]["function"][k] for k in ("name", "description", "parameters")}}
    assert "top_p" not in body and "seed" not in body  # what the client did not set stays out
    assert body["messages"][2] == {"role": "assistant", "content": None,
                                   "tool_calls": raw["messages"][2]["tool_calls"]}
    assert body["messages"][3]["tool_call_id"] == "call_1"
    choice = body_of({**corpus(), "response_format": {"type": "choice", "choices": ["a", "b"]}})
    assert "response_format" not in choice  # fleetlm's own


def test_tool_choice_and_function_call_are_rebuilt_or_refused():
    named = body_of({**corpus(), "tool_choice": {"type": "function", "extra": NAME,
                                                 "function": {"name": "f", "why": NAME}},
                     "function_call": {"name": "g", "arguments": NAME}})
    assert named["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert named["function_call"] == {"name": "g"}
    for field, value in (("tool_choice", "sometimes"), ("tool_choice", {"type": "web"}),
                         ("function_call", "required")):
        with pytest.raises(APIError) as e:
            body_of({**corpus(), field: value})
        assert e.value.status == 400 and e.value.param == field
    with pytest.raises(APIError) as e:
        body_of({**corpus(), "tools": [{"type": "custom", "custom": {"name": "x"}}]})
    assert e.value.param == "tools.0"


NON_TEXT = [{"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            {"type": "file", "file": {"file_data": "AAAA", "filename": "id.pdf"}}]


def test_non_text_parts_are_refused_dropped_or_sent_as_they_are_without_pii():
    raw = {"model": "r", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": NON_TEXT}]}
    with pytest.raises(APIError) as e:
        body_of(raw, "refuse")
    assert e.value.status == 400 and e.value.param == "messages.1.content.1"
    assert e.value.code == "non_text_part" and "non_text_parts: drop" in e.value.message
    req = ChatCompletionRequest.model_validate(raw)
    body, dropped = upstream_body(req, non_text="drop")
    assert body["messages"][1]["content"] == [NON_TEXT[0]]
    assert dropped == ["messages.1.content.1", "messages.1.content.2", "messages.1.content.3"]
    only_image = {"model": "r", "messages": [{"role": "user", "content": NON_TEXT[1:2]}]}
    assert body_of(only_image, "drop")["messages"][0]["content"] == ""
    assert body_of(raw)["messages"][1]["content"] == NON_TEXT  # pii: off


# -- redaction: every free-text field ----------------------------------------------------------


def test_every_free_text_field_is_redacted():
    body = body_of(corpus())
    seen: list[str] = []

    def redact(text: str) -> str:
        seen.append(text)
        return fake_redact(text)

    hits = redact_body(body, redact)
    sent = json.dumps(body, ensure_ascii=False)
    for leak in LEAKS:
        assert leak not in sent, leak
    assert set(hits) == FIELDS
    assert seen == free_texts(body_of(corpus()))
    # message text first (the detector's best context), then the other fields
    assert seen[0].startswith("You help") and seen[7].startswith("Please send")
    assert seen[8] == NAME  # messages.1.name
    args = json.loads(body["messages"][2]["tool_calls"][0]["function"]["arguments"])
    assert args == {"customer": "<PERSON_1>", "iban": "<IBAN_CODE_1>", "count": 2,
                    "contact": {"email": "<EMAIL_ADDRESS_1>", "phones": ["<PHONE_NUMBER_1>"]}}
    assert body["messages"][4]["function_call"]["arguments"] == "not json: call <PHONE_NUMBER_1>"
    assert json.loads(body["messages"][3]["content"])["owner"] == "<PERSON_1>"
    params = body["tools"][0]["function"]["parameters"]
    assert params["required"] == ["iban"]
    assert set(params["properties"]) == {"iban", "phone", "title"}
    assert params["properties"]["title"] == {"type": "string", "description": "Mr <PERSON_1>"}
    assert params["properties"]["iban"]["enum"] == ["<IBAN_CODE_1>", "other"]
    assert body["tools"][0]["function"]["name"] == "lookup_account"  # identifiers stay


def test_arguments_without_personal_data_are_sent_byte_for_byte():
    raw = corpus()
    raw["messages"][2]["tool_calls"][0]["function"]["arguments"] = '{ "n" : 1,"x":"a" }'
    body = body_of(raw)
    redact_body(body, fake_redact)
    assert body["messages"][2]["tool_calls"][0]["function"]["arguments"] == '{ "n" : 1,"x":"a" }'


def test_too_much_text_to_scan_fails_before_anything_is_scanned(monkeypatch):
    body = body_of(corpus())
    total = sum(len(t) for t in free_texts(body))
    monkeypatch.setattr(pii_fields, "MAX_SCAN_CHARS", total - 1)
    calls: list[str] = []
    with pytest.raises(PiiInputTooLarge):
        redact_body(body, lambda t: calls.append(t) or t)  # type: ignore[func-returns-value]
    assert calls == []
    monkeypatch.setattr(pii_fields, "MAX_SCAN_CHARS", total)
    redact_body(body, fake_redact)


# -- restoring ---------------------------------------------------------------------------------


QUOTED = 'Ann "Nan" O\'Neil\\ \n2nd line'  # a value that needs escaping inside JSON


def _answer_mapping() -> PiiMapping:
    m = mapping_of_values()
    assert m.placeholder_for(QUOTED, "PERSON") == "<PERSON_2>"
    return m


def _args(*values: str) -> str:
    return json.dumps({"found": list(values), "note": f"for {' and '.join(values)} <PERSON_9>"})


def test_the_whole_answer_is_restored():
    m = _answer_mapping()
    data = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Dear <PERSON_1>, <PERSON_2>.", "refusal": "<IBAN_CODE_1>",
        "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": _args("<PERSON_2>", "<EMAIL_ADDRESS_1>")}}],
        "function_call": {"name": "g", "arguments": _args("<PHONE_NUMBER_1>")}}}]}
    restore_answer(data, m)
    msg = data["choices"][0]["message"]
    assert msg["content"] == f"Dear {NAME}, {QUOTED}." and msg["refusal"] == IBAN
    args = json.loads(msg["tool_calls"][0]["function"]["arguments"])  # still valid JSON
    assert args["found"] == [QUOTED, EMAIL]
    assert args["note"] == f"for {QUOTED} and {EMAIL} <PERSON_9>"  # unknown: left as it is
    assert json.loads(msg["function_call"]["arguments"])["found"] == [PHONE]


def _pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def _stream(content: str, calls: list[str], fn_args: str, size: int) -> list[dict[str, Any]]:
    """An upstream stream as OpenAI sends one: text, then each tool call (id and name first,
    arguments in pieces), then a legacy function call, then the finish."""
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    out = [chunk({"role": "assistant"})]
    out += [chunk({"content": p}) for p in _pieces(content, size)]
    for k, args in enumerate(calls):
        out.append(chunk({"tool_calls": [{"index": k, "id": f"c{k}", "type": "function",
                                          "function": {"name": "f", "arguments": ""}}]}))
        out += [chunk({"tool_calls": [{"index": k, "function": {"arguments": p}}]})
                for p in _pieces(args, size)]
    out.append(chunk({"function_call": {"name": "g", "arguments": ""}}))
    out += [chunk({"function_call": {"arguments": p}}) for p in _pieces(fn_args, size)]
    out.append(chunk({}, "tool_calls"))
    return out


def _gather(chunks: list[dict[str, Any]]) -> tuple[str, dict[int, str], str]:
    content, calls, fn = "", {}, ""
    for ch in chunks:
        for c in ch.get("choices") or []:
            d = c.get("delta") or {}
            content += d.get("content") or ""
            for call in d.get("tool_calls") or []:
                calls[call["index"]] = calls.get(call["index"], "") + \
                    (call.get("function") or {}).get("arguments", "")
            fn += (d.get("function_call") or {}).get("arguments") or ""
    return content, calls, fn


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_the_streamed_answer_is_restored_in_content_and_tool_calls(size):
    m = _answer_mapping()
    content = "Hello <PERSON_1>, your IBAN is <IBAN_CODE_1>; <PERSON_2> <PERSON_"
    calls = [_args("<PERSON_1>", "<PERSON_2>"), _args("<EMAIL_ADDRESS_1>")]
    fn_args = _args("<PHONE_NUMBER_1>")
    chunks = _stream(content, calls, fn_args, size)
    restorer = AnswerRestorer(m)
    for ch in chunks:
        restorer.feed(ch)
    assert restorer.flush() is None  # everything came out at the finish
    got_content, got_calls, got_fn = _gather(chunks)
    assert got_content == restore(content, m)  # the unfinished "<PERSON_" as it came
    assert json.loads(got_calls[0])["found"] == [NAME, QUOTED]
    assert json.loads(got_calls[1])["found"] == [EMAIL]
    assert json.loads(got_fn)["found"] == [PHONE]
    assert not PLACEHOLDER_RE.search(got_content.replace("<PERSON_9>", ""))


def test_choices_of_one_stream_are_restored_apart():
    m = mapping_of_values()
    restorer = AnswerRestorer(m)
    text = {0: "A <PERSON_1> <EMAIL_ADDRESS_1>", 1: "B <IBAN_CODE_1> <PHONE_NUMBER_1"}
    chunks = [{"choices": [{"index": i, "delta": {"content": p}, "finish_reason": None}]}
              for k in range(0, 40, 2) for i in (1, 0) if (p := text[i][k:k + 2])]
    chunks.append({"choices": [{"index": i, "delta": {}, "finish_reason": "stop"}
                               for i in (0, 1)]})
    for ch in chunks:
        restorer.feed(ch)
    got = {0: "", 1: ""}
    for ch in chunks:
        for c in ch["choices"]:
            got[c["index"]] += c["delta"].get("content") or ""
    assert got == {0: f"A {NAME} {EMAIL}", 1: f"B {IBAN} <PHONE_NUMBER_1"}


def test_a_stream_cut_before_its_finish_flushes_what_was_held():
    m = mapping_of_values()
    restorer = AnswerRestorer(m)
    chunks = _stream("Hi <PERSON_1", ['{"a": "<EMAIL_ADDRESS_1'], "<PHONE_NUMBER_1>", 4)[:-1]
    for ch in chunks:
        restorer.feed(ch)
    last = restorer.flush()
    assert last is not None and last["choices"][0]["finish_reason"] is None
    content, calls, fn = _gather([*chunks, last])
    assert content == "Hi <PERSON_1" and calls == {0: '{"a": "<EMAIL_ADDRESS_1'}
    assert fn == PHONE


# -- end to end: a live server, the real detector, a recording stub ---------------------------


def _echo_placeholders(body: dict[str, Any], _i: int) -> Any:
    """Every placeholder the stub received, back in the text, in a tool call and in a legacy
    function call, all streamed in 3-character fragments."""
    from tests.openai_stub import Reply

    found = sorted({m.group(0) for m in PLACEHOLDER_RE.finditer(json.dumps(body))})
    text = "Got " + " | ".join(found) + "."
    return Reply(pieces=tuple(_pieces(text, 3)), arg_chars=3,
                 tool_calls=({"id": "call_9", "name": "lookup_account",
                              "arguments": json.dumps({"found": found})},),
                 function_call={"name": "notify", "arguments": json.dumps({"to": found})})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tests.openai_stub import stub_starter
    from tests.server.conftest import MODEL, live_server

    starter = stub_starter()
    start = next(starter)
    stub = start(_echo_placeholders)
    large = {"small": MODEL, "large": ["stub"], "policy": "always-large"}
    routes = {"upstreams": {"stub": {"base_url": stub.base_url, "model": "stub-large",
                                     "max_attempts": 1}},
              "routes": {"redact": large, "drop": {**large, "non_text_parts": "drop"},
                         "blocky": {**large, "pii": "block"}},
              "ledger_path": str(tmp_path_factory.mktemp("pii_ledger") / "ledger.sqlite3")}
    with live_server(tmp_path_factory.mktemp("pii_fields"), with_demo=False,
                     routes=routes) as srv:
        yield {"url": srv.url, "router": srv.router, "stub": stub}
    next(starter, None)  # closes the stub


def _post(env: dict[str, Any], body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{env['url']}/v1/chat/completions", json=body, timeout=120)


def _stream_post(env: dict[str, Any], body: dict[str, Any]
                 ) -> tuple[httpx.Response, list[dict[str, Any]]]:
    chunks = []
    with httpx.stream("POST", f"{env['url']}/v1/chat/completions", json=body,
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return r, chunks


def _assert_nothing_leaked(bodies: list[dict[str, Any]]) -> None:
    sent = json.dumps(bodies, ensure_ascii=False)
    for leak in LEAKS:
        assert leak not in sent, f"{leak!r} reached the upstream"


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_no_value_reaches_the_upstream_and_every_value_comes_back(env, stream):
    stub = env["stub"]
    before = len(stub.bodies)
    body = corpus("redact", stream=stream)
    if stream:
        r, chunks = _stream_post(env, body)
        content, calls, fn = _gather(chunks)
        assert len(chunks) > 50  # 3-character fragments: placeholders cut across chunks
    else:
        r = _post(env, body)
        msg = r.json()["choices"][0]["message"]
        content, fn = msg["content"], msg["function_call"]["arguments"]
        calls = {0: msg["tool_calls"][0]["function"]["arguments"]}
    assert r.status_code == 200, r.text
    assert len(stub.bodies) == before + 1
    sent = stub.bodies[before]
    _assert_nothing_leaked([sent])
    for field in ("user", "metadata", "tools", "functions", "stop", "response_format"):
        assert field in sent  # forwarded, redacted
    assert "<PERSON_1>" in json.dumps(sent) and "<IBAN_CODE_1>" in json.dumps(sent)
    for value in (NAME, EMAIL, PHONE, IBAN):  # back to the client, everywhere
        assert value in content
        assert value in json.loads(calls[0])["found"]
        assert value in json.loads(fn)["to"]
    assert not PLACEHOLDER_RE.search(content + calls[0] + fn)


@pytest.mark.slow
def test_a_non_text_part_is_refused_or_dropped(env):
    stub = env["stub"]
    before = len(stub.bodies)
    raw = {"messages": [{"role": "user", "content": NON_TEXT[:2]}], "max_tokens": 8}
    r = _post(env, {**raw, "model": "redact"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages.0.content.1" and err["code"] == "non_text_part"
    assert len(stub.bodies) == before  # nothing went upstream
    ok = _post(env, {**raw, "model": "drop"})
    assert ok.status_code == 200 and "non_text_dropped" in ok.json()["fleetlm"]["flags"]
    assert stub.bodies[before]["messages"] == [{"role": "user", "content": [NON_TEXT[0]]}]


@pytest.mark.slow
def test_pii_block_names_the_field_with_personal_data(env):
    before = len(env["stub"].bodies)
    raw = {"model": "blocky", "messages": [{"role": "user", "content": "What is 2 + 2?"}],
           "max_tokens": 8, "metadata": {"contact": EMAIL}}
    r = _post(env, raw)
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"
    assert "metadata.contact" in r.json()["error"]["message"]
    assert EMAIL not in r.text and len(env["stub"].bodies) == before


@pytest.mark.slow
def test_detection_failing_or_too_much_text_sends_nothing(env, monkeypatch):
    stub = env["stub"]
    before = len(stub.bodies)
    body = corpus("redact", schema=False)
    monkeypatch.setattr(pii_fields, "MAX_SCAN_CHARS", 100)
    big = _post(env, body)
    assert big.status_code == 200 and big.headers["x-fleetlm-fallback"] == "pii_input_too_large"
    monkeypatch.setattr(pii_fields, "MAX_SCAN_CHARS", 200_000)

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("detector down")

    for route in ("redact", "blocky"):
        for method in ("redact", "redact_many", "iter_redact"):
            monkeypatch.setattr(env["router"].routes[route].redactor, method, broken)
    r = _post(env, body)
    assert r.status_code == 200 and r.headers["x-fleetlm-fallback"] == "pii_detection_failed"
    _, chunks = _stream_post(env, {**body, "stream": True})
    assert chunks and "error" not in chunks[-1]
    b = _post(env, {**body, "model": "blocky"})
    assert b.status_code == 503 and b.json()["error"]["code"] == "pii_detection_failed"
    assert len(stub.bodies) == before  # nothing left the machine
    assert not re.search(r"Smith|555-2671", b.text)


def test_non_text_parts_is_a_checked_route_option():
    from fleetlm.errors import ConfigError
    from fleetlm.router.config import parse_routes

    def routes(**route: Any) -> dict[str, Any]:
        return {"upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}},
                "routes": {"r": {"small": "s", "large": ["u"], "policy": "always-large",
                                 **route}}}

    assert parse_routes(routes()).routes["r"].non_text_parts == "refuse"
    assert parse_routes(routes(non_text_parts="drop")).routes["r"].non_text_parts == "drop"
    for bad, says in ((dict(non_text_parts="keep"), "routes.r.non_text_parts"),
                      (dict(non_text_parts="drop", pii="off"),
                       "routes.r.non_text_parts: pii is off")):
        with pytest.raises(ConfigError) as e:
            parse_routes(routes(**bad))
        assert says in str(e.value)
