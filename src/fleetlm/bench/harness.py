"""What ``bench fuzz`` and ``bench soak`` serve: a tiny model, an adapter store, a stub
upstream and a route over it, and an app served by uvicorn in a thread.

- :func:`tiny_model`: a random 2-layer Llama with the embedded model's tokenizer and chat
  template. Same prompts, same token ids, same validation as the real model, a hundred times
  less compute: for work that tests the server, not the weights.
- :func:`make_store`: ``n`` random rank-8 PEFT adapters ``a000 ..`` under a store's root.
- :class:`StubUpstream`: a loopback OpenAI-compatible ``/v1/chat/completions`` answering a
  fixed text (JSON or SSE) at once; a route's "large" model that costs nothing.
- :func:`routes_config`: one route, ``mixed``, whose ``random`` policy sends about half of
  its requests to the stub (PII off: no spaCy models to load).
- :func:`serve_in_thread`: uvicorn on a free loopback port in a daemon thread.

This module measures nothing and knows nothing of fuzzing or load; it only builds things
to point them at.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROUTE = "mixed"  # the route of routes_config
STUB_ANSWER = ("The", " stub", " answers", ".")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def save_tiny_llama(folder: Path, tok: Any, *, hidden_size: int = 32,
                    intermediate_size: int = 64, max_position_embeddings: int = 2048) -> Path:
    """A random 2-layer Llama (4 heads over 2 KV heads, tied head, embeddings drawn wide
    enough that the head can express a confident answer) over tokenizer ``tok``, seed 0,
    saved with ``tok`` to ``folder``; returns ``folder``."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size,
                                   intermediate_size=intermediate_size, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_position_embeddings,
                                   tie_word_embeddings=True, initializer_range=0.3,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_model(folder: Path) -> Path:
    """A random Llama (2 layers, hidden 32) with smollm2-135m's tokenizer and chat template,
    written to ``folder`` (reused when already there); returns ``folder``."""
    import transformers

    from fleetlm.models.loader import resolve_source

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    tok = transformers.AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))
    return save_tiny_llama(folder, tok)


def make_store(root: Path, base_config: Any, n: int) -> list[str]:
    """``n`` random rank-8 adapters ``a000 ..`` for ``base_config`` under ``root``; their
    names."""
    from fleetlm.adapters.random import make_random_adapter

    names = [f"a{i:03d}" for i in range(n)]
    for i, name in enumerate(names):
        make_random_adapter(root / name, base_config, rank=8, alpha=16, seed=i, std=0.05)
    return names


class StubUpstream:
    """``POST /v1/chat/completions`` on loopback answering :data:`STUB_ANSWER` (one SSE
    chunk per piece when ``stream`` is set), from a thread; anything else is a 404."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                if self.path != "/v1/chat/completions" or not isinstance(body, dict):
                    self._send(404, {"error": {"message": "not here", "type": "not_found"}})
                    return
                usage = {"prompt_tokens": 10, "completion_tokens": len(STUB_ANSWER),
                         "total_tokens": 10 + len(STUB_ANSWER)}
                if not body.get("stream"):
                    self._send(200, {"id": "stub", "object": "chat.completion", "created": 0,
                                     "model": body.get("model"), "usage": usage,
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant",
                                                              "content": "".join(STUB_ANSWER)}}]})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                deltas = [{"role": "assistant"}] + [{"content": p} for p in STUB_ANSWER] + [{}]
                for i, delta in enumerate(deltas):
                    chunk = {"id": "stub", "object": "chat.completion.chunk", "created": 0,
                             "model": body.get("model"),
                             "choices": [{"index": 0, "delta": delta,
                                          "finish_reason": "stop" if i == len(deltas) - 1
                                          else None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if (body.get("stream_options") or {}).get("include_usage"):
                    tail = {"id": "stub", "object": "chat.completion.chunk", "choices": [],
                            "usage": usage}
                    self.wfile.write(f"data: {json.dumps(tail)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _send(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a caller that gave up mid-answer

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="stub-upstream",
                                       kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def routes_config(upstream_url: str, small: str, ledger: Path) -> dict[str, Any]:
    """A routes config (as parsed YAML) with one route, :data:`ROUTE`: ``small`` answers about
    half of its requests and the upstream at ``upstream_url`` the rest."""
    return {"upstreams": {"stub": {"base_url": upstream_url, "model": "stub-large",
                                   "timeout_s": 10, "max_attempts": 1}},
            "routes": {ROUTE: {"small": small, "large": ["stub"], "policy": "random",
                               "threshold": 0.5, "pii": "off"}},
            "ledger_path": str(ledger)}


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port from a daemon thread; yields its
    base URL (``http://127.0.0.1:PORT``, no ``/v1``)."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=srv.run, name="bench-http", daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        if not t.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        t.join(15)
