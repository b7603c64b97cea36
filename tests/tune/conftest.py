"""Fixtures of the tune tests: config builders and an OpenAI-compatible teacher stub.

The stub is a plain ``http.server`` on loopback that answers POST /v1/chat/completions
with whatever a test's ``reply(body, index)`` returns (content, status, delay, usage).
It exists to test parsing, budgets, retries and timeouts; the end-to-end test uses a
real fleetlm server as teacher.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fleetlm.tune.config import TuneConfig, parse_config


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., TuneConfig]:
    """make_cfg(task_type, data_path, task={...}, data={...}, prepare={...}, ...)."""

    def make(task_type: str = "classification", path: Path | str = "train.csv",
             **sections: Any) -> TuneConfig:
        raw: dict[str, Any] = {"name": "t",
                               "task": {"type": task_type, **sections.pop("task", {})},
                               "data": {"path": str(path), **sections.pop("data", {})},
                               **sections}
        return parse_config(raw, base_dir=tmp_path)

    return make


@dataclass
class Reply:
    content: str = ""
    status: int = 200
    delay_s: float = 0.0
    usage: dict[str, int] | None = field(
        default_factory=lambda: {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
    headers: dict[str, str] = field(default_factory=dict)


class StubTeacher:
    def __init__(self, reply: Callable[[dict[str, Any], int], Reply | str]):
        self.reply = reply
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
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
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                    return
                r = stub.reply(body, index)
                r = Reply(content=r) if isinstance(r, str) else r
                time.sleep(r.delay_s)
                if r.status != 200:
                    self._send(r.status, {"error": {"message": "stub error"}}, r.headers)
                    return
                out: dict[str, Any] = {
                    "id": f"c{index}", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": r.content}}]}
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

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up (timeout test) closes its socket mid-reply

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def teacher_stub() -> Iterator[Callable[[Callable[[dict[str, Any], int], Reply | str]],
                                         StubTeacher]]:
    stubs: list[StubTeacher] = []

    def start(reply: Callable[[dict[str, Any], int], Reply | str]) -> StubTeacher:
        stubs.append(StubTeacher(reply))
        return stubs[-1]

    yield start
    for s in stubs:
        s.close()
