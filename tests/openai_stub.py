"""A loopback stand-in for an OpenAI-compatible chat endpoint, shared by the tune tests
(the teacher) and the router tests (the upstream).

A plain ``http.server`` in a thread answers POST /v1/chat/completions with whatever a
test's ``reply(body, index)`` returns: a :class:`Reply` (status, delay, headers, the
answer in pieces, tool calls or a legacy function call, usage, and for streams a role
chunk, a gap between pieces or a connection that dies mid-answer) or a plain string (the answer). It records every
request's body, headers and arrival time. It exists to test parsing, budgets, retries,
timeouts and failover; end-to-end tests use a real fleetlm server instead.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


@dataclass
class Reply:
    """What the stub answers to one request."""

    content: str | None = None  # the whole answer (sets ``pieces`` to this one piece)
    status: int = 200
    delay_s: float = 0.0  # before the status line
    headers: dict[str, str] = field(default_factory=dict)
    pieces: tuple[str, ...] = ("Hello", " world")  # the answer (one chunk each when streaming)
    usage: dict[str, int] | None = field(default_factory=lambda: dict(USAGE))
    role_chunk: bool = True  # streaming: a role-only delta first
    die_after: int | None = None  # streaming: close the connection after this many pieces
    gap_s: float = 0.0  # streaming: pause before each piece after the first
    # tool calls after the answer's text: {"id", "name", "arguments"} each (finish_reason
    # "tool_calls"); streamed as OpenAI does: id and name first, then the arguments in pieces
    # of arg_chars characters (0: whole)
    tool_calls: tuple[dict[str, str], ...] = ()
    function_call: dict[str, str] | None = None  # legacy: {"name", "arguments"}, same way
    arg_chars: int = 0

    def __post_init__(self) -> None:
        if self.content is not None:
            self.pieces = (self.content,)


def _finish(r: Reply) -> str:
    return "tool_calls" if r.tool_calls else "function_call" if r.function_call else "stop"


def _split(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] if size > 0 else [text]


ReplyFn = Callable[[dict[str, Any], int], "Reply | str"]


class Stub:
    def __init__(self, reply: ReplyFn):
        self.reply = reply
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    index = len(stub.bodies)
                    stub.bodies.append(body)
                    stub.headers.append(dict(self.headers))
                    stub.times.append(time.monotonic())
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                    return
                got = stub.reply(body, index)
                r = Reply(content=got) if isinstance(got, str) else got
                if r.delay_s and stub.stop.wait(r.delay_s):
                    return
                if r.status != 200:
                    self._send(r.status, {"error": {"message": "stub error"}}, r.headers)
                elif body.get("stream"):
                    self._stream(body, r)
                else:
                    message: dict[str, Any] = {"role": "assistant", "content": "".join(r.pieces)}
                    if r.tool_calls:
                        message["tool_calls"] = [
                            {"id": c["id"], "type": "function",
                             "function": {"name": c["name"], "arguments": c["arguments"]}}
                            for c in r.tool_calls]
                    if r.function_call is not None:
                        message["function_call"] = dict(r.function_call)
                    out: dict[str, Any] = {
                        "id": f"c{index}", "object": "chat.completion", "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": _finish(r),
                                     "message": message}]}
                    if r.usage is not None:
                        out["usage"] = r.usage
                    self._send(200, out, r.headers)

            def _send(self, status: int, obj: Any, headers: dict[str, str]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, body: dict[str, Any], r: Reply) -> None:
                # HTTP/1.0 without Content-Length: the body ends when the connection closes
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()

                def event(delta: dict[str, Any], finish: str | None = None) -> None:
                    chunk = {"id": "s", "object": "chat.completion.chunk", "model": body["model"],
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()

                if r.role_chunk:
                    event({"role": "assistant"})
                for i, piece in enumerate(r.pieces):
                    if r.die_after is not None and i >= r.die_after:
                        return  # connection closes: no finish_reason, no [DONE]
                    if i and r.gap_s and stub.stop.wait(r.gap_s):
                        return
                    event({"content": piece})
                for k, c in enumerate(r.tool_calls):
                    event({"tool_calls": [{"index": k, "id": c["id"], "type": "function",
                                           "function": {"name": c["name"], "arguments": ""}}]})
                    for part in _split(c["arguments"], r.arg_chars):
                        event({"tool_calls": [{"index": k, "function": {"arguments": part}}]})
                if r.function_call is not None:
                    event({"function_call": {"name": r.function_call["name"], "arguments": ""}})
                    for part in _split(r.function_call["arguments"], r.arg_chars):
                        event({"function_call": {"arguments": part}})
                event({}, _finish(r))
                if r.usage is not None and (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"id": "s", "choices": [], "usage": r.usage}
                    self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up (timeout tests) closes its socket mid-reply

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def stub_starter() -> Iterator[Callable[..., Stub]]:
    """The body of a fixture: ``start(reply)`` starts a stub (``reply`` a function, one
    Reply for every request, or None for the default answer); all close afterwards."""
    stubs: list[Stub] = []

    def start(reply: ReplyFn | Reply | None = None) -> Stub:
        r = reply if reply is not None else Reply()
        stubs.append(Stub(r if callable(r) else (lambda body, i: r)))
        return stubs[-1]

    yield start
    for s in stubs:
        s.close()
