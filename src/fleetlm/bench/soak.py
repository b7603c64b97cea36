"""``fleetlm bench soak``: a real server under closed-loop load for minutes, with and
without hostile clients, watching its memory, its answers and its latency.

``fleetlm serve`` is started as its own process (as users run it), with a temporary adapter
store holding ``adapters`` random adapters and a routes config whose route
(:data:`fleetlm.bench.harness.ROUTE`) sends about half its requests to a stub upstream
running in this process. Then, from an asyncio load generator in this process:

- warm-up (10% of the time): ``clients`` well-behaved clients;
- calm (45%): the same clients, measured;
- hostile (45%): the same clients, measured, plus ``ceil(hostile * clients)`` hostile ones.

A well-behaved client sends one request after another, cycling over the base model, the
adapters and the route, chat and completions, streaming (2 of 3) and not, ``max_tokens``
tokens each. A hostile client cycles over: malformed JSON, a body over the server's limit
(declared, and sent chunked without a length), out-of-vocabulary token ids, a huge stop
string, a stream it drops after the first chunks, and a request it drops half-sent.

Measured: the server's RSS every second (growth from the end of warm-up to the end, in %,
each end the median of its last/first samples); per phase, the well-behaved requests sent,
answered, lost (the connection failed or a stream ended without ``[DONE]``) and hung (no
answer within ``deadline_s``), their status codes, TTFT p50/p99 of the streaming ones, and
throughput; the hostile requests by kind and status. Afterwards ``/health`` must answer with
nothing left running. The issue's targets are reported pass/fail, never asserted: RSS growth
<= 5% after warm-up, 0 lost or hung, p99 TTFT with hostile clients <= 1.5x without.

This module knows HTTP clients, processes and clocks; what the server does with the requests
is the server's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from fleetlm.config import StrictModel
from fleetlm.errors import FleetLMError

if TYPE_CHECKING:
    from fleetlm.progress import Update

TARGETS = {"rss_growth_pct": 5.0, "lost_or_hung": 0, "ttft_p99_ratio": 1.5}
HOSTILE_KINDS = ("malformed_json", "oversized_declared", "oversized_chunked", "oov_token_ids",
                 "huge_stop", "drop_mid_stream", "drop_mid_request")
# the answers a hostile request must get (the drops get none: nobody is left to read one)
EXPECTED = {"malformed_json": 400, "oversized_declared": 413, "oversized_chunked": 413,
            "oov_token_ids": 400, "huge_stop": 400}


class SoakBenchConfig(StrictModel):
    model: str = "smollm2-135m"  # any model `fleetlm serve` takes, or "tiny"
    dtype: str = "auto"
    seconds: float = Field(600.0, gt=0)  # the whole run: warm-up, calm, hostile
    clients: int = Field(4, ge=1)  # well-behaved clients, in every phase
    hostile: float = Field(0.1, ge=0, le=10)  # hostile clients per well-behaved one
    adapters: int = Field(3, ge=0, le=64)
    max_tokens: int = Field(24, ge=1)
    max_len: int = Field(256, ge=64)  # the server's --max-len: the prompts here are short
    deadline_s: float = Field(120.0, gt=0)  # no answer within it: hung
    max_body_mb: float = Field(4.0, gt=0)  # the server's --max-body-mb
    compile: bool = True  # the server's --compile (its default) or --no-compile
    seed: int = 0

    @property
    def hostile_clients(self) -> int:
        return math.ceil(self.hostile * self.clients) if self.hostile > 0 else 0


@dataclass
class Record:
    """One request: who sent it, in which phase, and what came back."""

    phase: str
    kind: str  # well-behaved: "chat/stream/a001" ...; hostile: one of HOSTILE_KINDS
    hostile: bool
    start: float
    outcome: str = "answered"  # answered | lost | hung | dropped (a hostile drop, on purpose)
    status: int | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    tokens: int = 0
    error: str = ""


@dataclass
class Load:
    """The shared state of the load generator: the phase now, and every record."""

    phase: str = "warmup"
    stop: bool = False
    records: list[Record] = field(default_factory=list)


# -- the server ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_process(cmd: list[str], port: int, env: dict[str, str],
                   timeout_s: float = 300) -> Iterator[subprocess.Popen[str]]:
    """``cmd`` (a ``fleetlm serve``) started, waited for until ``/health`` answers, and
    stopped with SIGTERM afterwards; its output is kept in a temporary file and shown if
    it dies."""
    import httpx

    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise FleetLMError(f"fleetlm serve exited with {proc.returncode}:\n"
                                   f"{log.read()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise FleetLMError(f"fleetlm serve did not answer /health within {timeout_s} s")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


class RssSampler:
    """The RSS of process ``pid`` every ``interval_s`` seconds, from a thread:
    ``samples`` is a list of (seconds since start, bytes)."""

    def __init__(self, pid: int, interval_s: float = 1.0) -> None:
        import psutil

        self.proc, self.interval_s = psutil.Process(pid), interval_s
        self.samples: list[tuple[float, int]] = []
        self.marks: dict[str, float] = {}  # phase -> when it began
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def now(self) -> float:
        return time.monotonic() - self._t0

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.samples.append((self.now(), int(self.proc.memory_info().rss)))
            except psutil.Error:
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def rss_summary(samples: list[tuple[float, int]], after_s: float) -> dict[str, Any]:
    """Growth of RSS after ``after_s`` (the end of warm-up): the median of the last 10% of
    the samples over the median of the first 10% after it."""
    import statistics

    later = [b for t, b in samples if t >= after_s]
    if len(later) < 2:
        return {"samples": len(samples), "growth_pct": None}
    k = max(1, len(later) // 10)
    first, last = statistics.median(later[:k]), statistics.median(later[-k:])
    step = max(1, len(samples) // 120)  # at most ~120 points in the JSON
    return {"samples": len(samples), "after_warmup_mb": round(first / 2**20, 1),
            "end_mb": round(last / 2**20, 1), "peak_mb": round(max(b for _, b in samples) / 2**20, 1),
            "growth_pct": round(100 * (last - first) / first, 2),
            "series_s_mb": [(round(t, 1), round(b / 2**20, 1)) for t, b in samples[::step]]}


# -- well-behaved clients -------------------------------------------------------------------


def request_plan(model: str, adapters: list[str], route: str | None, seed: int
                 ) -> Iterator[tuple[str, str, bool]]:
    """Endless (endpoint, model, stream) for a well-behaved client: every model, both
    endpoints (a route answers chat only), streaming two times in three, shuffled."""
    models = [model, *adapters] + ([route] if route else [])
    plan = [(ep, m, s) for m in models for ep in ("chat", "completions") for s in (True, True, False)
            if not (m == route and ep == "completions")]
    rng = random.Random(seed)
    while True:
        rng.shuffle(plan)
        yield from plan


async def well_behaved(http: Any, url: str, load: Load, plan: Iterator[tuple[str, str, bool]],
                       max_tokens: int, deadline_s: float) -> None:
    """One closed-loop client: a request, its whole answer, the next."""
    import httpx

    while not load.stop:
        ep, model, stream = next(plan)
        rec = Record(load.phase, f"{ep}/{'stream' if stream else 'json'}/{model}", False,
                     time.perf_counter())
        load.records.append(rec)
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.7,
                                "stream": stream}
        if ep == "chat":
            body["messages"] = [{"role": "user", "content": "Tell me about the river town."}]
        else:
            body["prompt"] = "The river town woke slowly. Fishermen"
        try:
            async with asyncio.timeout(deadline_s):
                await _one(http, f"{url}/v1/{'chat/completions' if ep == 'chat' else ep}",
                           body, rec)
        except TimeoutError:
            rec.outcome, rec.error = "hung", f"no answer within {deadline_s:g} s"
        except httpx.HTTPError as e:
            rec.outcome, rec.error = "lost", f"{type(e).__name__}: {e}"[:300]
        rec.latency_s = time.perf_counter() - rec.start


async def _one(http: Any, url: str, body: dict[str, Any], rec: Record) -> None:
    if not body["stream"]:
        r = await http.post(url, json=body)
        rec.status = r.status_code
        if r.status_code == 200:
            rec.tokens = int(r.json().get("usage", {}).get("completion_tokens", 0))
        return
    async with http.stream("POST", url, json=body) as r:
        rec.status = r.status_code
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                rec.error = str(chunk["error"].get("message"))[:300]
            for c in chunk.get("choices", []):
                if (c.get("delta") or {}).get("content") or c.get("text"):
                    if rec.ttft_s is None:
                        rec.ttft_s = time.perf_counter() - rec.start
                    rec.tokens += 1
        if r.status_code == 200 and not done:
            rec.outcome, rec.error = "lost", "the stream ended without data: [DONE]"


# -- hostile clients -------------------------------------------------------------------------


async def _raw(host: str, port: int, head: bytes, body_parts: list[bytes], read: bool,
               timeout_s: float) -> int | None:
    """Send ``head`` then ``body_parts`` on a fresh connection while watching for an answer;
    with ``read`` the status of the answer (None: none came), else close once sent. Sending
    stops as soon as the server answers or closes: a refused body is never read."""
    reader, writer = await asyncio.open_connection(host, port)
    answer = asyncio.create_task(reader.readline()) if read else None
    try:
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(head)
            await writer.drain()
            for part in body_parts:
                if answer is not None and answer.done():
                    break
                writer.write(part)
                await writer.drain()
        if answer is None:
            return None
        try:
            async with asyncio.timeout(timeout_s):
                line = await answer
        except (ConnectionError, OSError):
            return None
        parts = line.split()
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    finally:
        if answer is not None and not answer.done():
            answer.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def hostile(http: Any, url: str, load: Load, model: str, cfg: SoakBenchConfig,
                  offset: int) -> None:
    """One hostile client: each of :data:`HOSTILE_KINDS` in turn, one after another."""
    import httpx

    host, port = url.removeprefix("http://").split(":")
    big = cfg.max_body_mb * (1 << 20) + (1 << 20)
    kinds = itertools.islice(itertools.cycle(HOSTILE_KINDS), offset, None)
    while not load.stop:
        kind = next(kinds)
        rec = Record(load.phase, kind, True, time.perf_counter())
        load.records.append(rec)
        try:
            async with asyncio.timeout(cfg.deadline_s):
                await _attack(http, url, host, int(port), kind, model, int(big), rec, cfg)
        except TimeoutError:
            rec.outcome, rec.error = "hung", f"no answer within {cfg.deadline_s:g} s"
        except httpx.HTTPError as e:
            rec.outcome, rec.error = "lost", f"{type(e).__name__}: {e}"[:300]
        rec.latency_s = time.perf_counter() - rec.start
        await asyncio.sleep(0.05)


async def _attack(http: Any, url: str, host: str, port: int, kind: str, model: str, big: int,
                  rec: Record, cfg: SoakBenchConfig) -> None:
    chat = f"{url}/v1/chat/completions"
    hdr = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    if kind == "malformed_json":
        r = await http.post(chat, content=b'{"model": "' + model.encode() + b'", "messages": [',
                            headers={"Content-Type": "application/json"})
        rec.status = r.status_code
    elif kind == "oversized_declared":  # refused on its Content-Length: no body sent
        rec.status = await _raw(host, port, (hdr + f"Content-Length: {big}\r\n\r\n").encode(),
                                [], True, cfg.deadline_s)
        if rec.status is None:
            rec.outcome, rec.error = "lost", "the connection closed (or was reset) before an answer"
    elif kind == "oversized_chunked":  # no length: cut off once the limit is passed
        piece = b" " * 65536
        frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        rec.status = await _raw(host, port, (hdr + "Transfer-Encoding: chunked\r\n\r\n").encode(),
                                [frame] * (big // len(piece) + 1) + [b"0\r\n\r\n"], True,
                                cfg.deadline_s)
        if rec.status is None:
            rec.outcome, rec.error = "lost", "the connection closed (or was reset) before an answer"
    elif kind == "oov_token_ids":
        r = await http.post(f"{url}/v1/completions", json={
            "model": model, "prompt": [1, 2, 10**9, -5], "max_tokens": 4})
        rec.status = r.status_code
    elif kind == "huge_stop":
        r = await http.post(chat, json={"model": model, "max_tokens": 4, "stop": ["x" * 500_000],
                                        "messages": [{"role": "user", "content": "hi"}]})
        rec.status = r.status_code
    elif kind == "drop_mid_stream":
        body = {"model": model, "max_tokens": 64, "stream": True, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        async with http.stream("POST", chat, json=body) as r:
            rec.status, seen = r.status_code, 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 2:
                    break  # leaving the block closes the connection mid-stream
        rec.outcome = "dropped"
    elif kind == "drop_mid_request":
        data = json.dumps({"model": model, "max_tokens": 8,
                           "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
        await _raw(host, port, (hdr + f"Content-Length: {len(data)}\r\n\r\n").encode(),
                   [data[: len(data) // 2]], False, cfg.deadline_s)
        rec.outcome = "dropped"


# -- the run ---------------------------------------------------------------------------------


async def drive(url: str, cfg: SoakBenchConfig, model: str, adapters: list[str],
                route: str | None, rss: RssSampler, progress: Update) -> Load:
    """The three phases, with ``progress(seconds so far, info=...)`` every second."""
    import httpx

    load = Load()
    phase_s = 0.45 * cfg.seconds
    n = cfg.clients + cfg.hostile_clients
    limits = httpx.Limits(max_connections=2 * n + 4, max_keepalive_connections=2 * n + 4)

    async def report() -> None:
        while not load.stop:
            done = [r for r in load.records if r.latency_s is not None]
            mb = rss.samples[-1][1] / 2**20 if rss.samples else 0.0
            progress(int(rss.now() - rss.marks["warmup"]),
                     info=f"{load.phase}: {sum(not r.hostile for r in done)} answered, "
                          f"{sum(r.hostile for r in load.records)} hostile, "
                          f"{sum(r.outcome in ('lost', 'hung') for r in done)} lost/hung, "
                          f"RSS {mb:.0f} MB")
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.deadline_s), limits=limits) as http:
        rss.marks["warmup"] = rss.now()
        reporter = asyncio.create_task(report())
        good = [asyncio.create_task(well_behaved(
            http, url, load, request_plan(model, adapters, route, cfg.seed + i),
            cfg.max_tokens, cfg.deadline_s)) for i in range(cfg.clients)]
        await asyncio.sleep(0.1 * cfg.seconds)
        load.phase = "calm"
        rss.marks["calm"] = rss.now()
        await asyncio.sleep(phase_s)
        load.phase = "hostile"
        rss.marks["hostile"] = rss.now()
        # each starts at a different attack, so that a short run still sends every kind
        bad = [asyncio.create_task(hostile(http, url, load, model, cfg,
                                           i * len(HOSTILE_KINDS) // cfg.hostile_clients))
               for i in range(cfg.hostile_clients)]
        await asyncio.sleep(phase_s)
        load.stop = True
        rss.marks["end"] = rss.now()
        await asyncio.gather(*good, *bad, reporter)
    progress(int(cfg.seconds))
    return load


def phase_summary(records: list[Record], seconds: float) -> dict[str, Any]:
    """The well-behaved requests of one phase."""
    from fleetlm.bench.common import percentile

    ttft = [r.ttft_s * 1e3 for r in records if r.ttft_s is not None]
    answered = [r for r in records if r.outcome == "answered"]
    ok = [r for r in answered if r.status == 200 and not r.error]
    latency = [r.latency_s * 1e3 for r in ok if r.latency_s is not None]
    return {"sent": len(records), "answered": len(answered),
            "lost": sum(r.outcome == "lost" for r in records),
            "hung": sum(r.outcome == "hung" for r in records),
            "ok": len(ok), "errors": Counter(r.error for r in records if r.error).most_common(5),
            "status_codes": dict(Counter(str(r.status) for r in answered)),
            "streams_with_ttft": len(ttft),
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
            "latency_p50_ms": percentile(latency, 50), "latency_p99_ms": percentile(latency, 99),
            "requests_per_s": round(len(ok) / seconds, 2),
            "tokens_per_s": round(sum(r.tokens for r in ok) / seconds, 1)}


def hostile_summary(records: list[Record]) -> dict[str, Any]:
    """The hostile requests by kind: how many, what came back, and which answers were not
    the expected ones."""
    out: dict[str, Any] = {}
    for kind in HOSTILE_KINDS:
        rs = [r for r in records if r.kind == kind]
        want = EXPECTED.get(kind)
        out[kind] = {"sent": len(rs), "outcomes": dict(Counter(r.outcome for r in rs)),
                     "status_codes": dict(Counter(str(r.status) for r in rs)),
                     "errors": dict(Counter(r.error for r in rs if r.error)),
                     "unexpected": sum(1 for r in rs if r.outcome in ("lost", "hung") or
                                       (want is not None and r.status != want) or
                                       (r.status is not None and r.status >= 500))}
    return out


def run(cfg: SoakBenchConfig, out: Path | None) -> dict[str, Any]:
    """The whole soak: server, stub upstream, load, health, summary; prints and writes."""
    from fleetlm.bench.common import write_json
    from fleetlm.bench.fuzz import health_problems, machine
    from fleetlm.bench.harness import ROUTE, StubUpstream, routes_config, tiny_model
    from fleetlm.progress import Progress

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fleetlm-bench-soak-") as tmp, \
            Progress("bench soak") as p:
        work = Path(tmp)
        model = cfg.model
        if model == "tiny":
            model = str(tiny_model(work / "tiny"))
        name, adapters = _prepare(work / "adapters", model, cfg.adapters)
        stub = StubUpstream()
        # the route's small model: an adapter (a model given as a path is no valid name)
        route = ROUTE if adapters else None
        (work / "routes.yaml").write_text(json.dumps(  # JSON is YAML
            routes_config(stub.base_url, adapters[0] if adapters else name,
                          work / "ledger.sqlite3")))
        port = _free_port()
        n = cfg.clients + cfg.hostile_clients
        cmd = [sys.executable, "-m", "fleetlm", "serve", "--model", model, "--dtype", cfg.dtype,
               "--port", str(port), "--adapters-dir", str(work / "adapters"),
               *(("--config", str(work / "routes.yaml")) if route else ()),
               "--max-batch", str(max(4, 2 * n)),
               "--max-len", str(cfg.max_len), "--max-hot-adapters", str(max(1, cfg.adapters)),
               "--max-body-mb", str(cfg.max_body_mb),
               "--compile" if cfg.compile else "--no-compile"]
        p.say(f"bench soak: starting fleetlm serve ({name}, {cfg.adapters} adapters"
              + (f", route {route!r} over a stub upstream)" if route else ")"))
        try:
            with server_process(cmd, port, {"FLEETLM_HOME": str(work / "home")}) as proc, \
                    RssSampler(proc.pid) as rss:
                url = f"http://127.0.0.1:{port}"
                load = asyncio.run(drive(url, cfg, name, adapters, route, rss,
                                         p.task("soak seconds", int(cfg.seconds))))
                unhealthy = health_problems(url)
        finally:
            stub.close()
    result = summarize(cfg, load, rss, unhealthy, time.perf_counter() - t0, machine())
    _print(result)
    write_json(result, out)
    return result


def _prepare(root: Path, model: str, n: int) -> tuple[str, list[str]]:
    """The name ``fleetlm serve`` will give ``model`` (as :func:`fleetlm.server.run.build`
    does), and ``n`` random adapters for it under ``root``."""
    from fleetlm.bench.harness import make_store
    from fleetlm.models.loader import load_model

    root.mkdir(parents=True)
    lm = load_model(model, dtype="float32")
    name = model if "/" not in model and not model.endswith(".gguf") else lm.name
    return name, make_store(root, lm.config, n)


def summarize(cfg: SoakBenchConfig, load: Load, rss: RssSampler, unhealthy: list[str],
              wall_s: float, env: dict[str, Any]) -> dict[str, Any]:
    phase_s = 0.45 * cfg.seconds
    good = [r for r in load.records if not r.hostile]
    phases = {ph: phase_summary([r for r in good if r.phase == ph], phase_s)
              for ph in ("calm", "hostile")}
    rss_info = rss_summary(rss.samples, rss.marks.get("calm", 0.0))
    calm99, hostile99 = phases["calm"]["ttft_p99_ms"], phases["hostile"]["ttft_p99_ms"]
    ratio = hostile99 / calm99 if calm99 and hostile99 else None
    lost_hung = sum(r.outcome in ("lost", "hung") for r in good)
    bad = hostile_summary([r for r in load.records if r.hostile])
    targets = {
        "rss_growth_pct <= 5": rss_info["growth_pct"] is not None
        and rss_info["growth_pct"] <= TARGETS["rss_growth_pct"],
        "lost_or_hung == 0": lost_hung == 0,
        "ttft_p99_hostile / calm <= 1.5": ratio is not None and ratio <= TARGETS["ttft_p99_ratio"],
        "hostile requests answered as expected": sum(k["unexpected"] for k in bad.values()) == 0,
        "healthy afterwards": not unhealthy}
    return {"config": cfg.model_dump(), "environment": env, "wall_s": round(wall_s, 1),
            "hostile_clients": cfg.hostile_clients, "rss": rss_info,
            "well_behaved": {**phases, "lost_or_hung": lost_hung,
                             "sent": len(good), "warmup_sent": sum(r.phase == "warmup" for r in good)},
            "ttft_p99_ratio": round(ratio, 3) if ratio else None,
            "hostile": bad, "hostile_sent": sum(k["sent"] for k in bad.values()),
            "health_problems": unhealthy, "targets": targets, "pass": all(targets.values())}


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    t = Table(title=f"fleetlm bench soak: {result['config']['clients']} clients, "
                    f"{result['hostile_clients']} hostile")
    for col in ("phase", "sent", "answered", "lost", "hung", "TTFT p50 ms", "TTFT p99 ms",
                "req/s", "tok/s"):
        t.add_column(col)
    for ph in ("calm", "hostile"):
        s = result["well_behaved"][ph]
        t.add_row(ph, *(str(s[k]) for k in ("sent", "answered", "lost", "hung")),
                  *("-" if s[k] is None else f"{s[k]:.0f}" for k in ("ttft_p50_ms", "ttft_p99_ms")),
                  str(s["requests_per_s"]), str(s["tokens_per_s"]))
    console.print(t)
    console.print(f"  RSS after warm-up {result['rss'].get('after_warmup_mb')} MB, end "
                  f"{result['rss'].get('end_mb')} MB, growth {result['rss']['growth_pct']}%; "
                  f"TTFT p99 ratio {result['ttft_p99_ratio']}; hostile requests "
                  f"{result['hostile_sent']}")
    for k, v in result["targets"].items():
        console.print(f"  {'PASS' if v else 'FAIL'}  {k}")
