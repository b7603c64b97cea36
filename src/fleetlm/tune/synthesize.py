"""Self-instruct style expansion: ask a teacher model for new training rows like the seeds.

    train rows --seeded plan of requests--> teacher (POST {base_url}/chat/completions,
    OpenAI shape) --parse--> synthetic Example rows (source="synthetic")

Classification: for every label (``task.labels``, else the labels of the data) the
teacher gets the task description and up to ``synthesize.seed_examples`` texts of that
label and writes ``synthesize.per_label`` new texts, one per line (asked for in batches
of at most :data:`TEXTS_PER_REQUEST`). Completion and chat: the teacher gets seed
instruction/answer pairs and writes ``synthesize.num_instructions`` new pairs in total
as a JSON array (batches of :data:`PAIRS_PER_REQUEST`); anything unparsable is skipped
and counted. Synthetic chat rows are single-turn (plus the seed's system message).

The plan (which seeds go into which request, and each request's ``seed``) is fixed
from ``cfg.seed`` before anything is sent, so it does not depend on response order.

:class:`Teacher` is the one HTTP client of the tuning stages (the filter uses it too):
concurrency, retries with backoff on 429/5xx/connection errors, a hard per-request
timeout, usage accounting and the budget caps. A failed request is counted, never
raised, and never hangs. Budget caps stop new requests once reached; requests already
in flight finish, so tokens may overshoot ``max_tokens_total`` by at most
``concurrency`` responses.

This module does not judge the rows it gets back: :mod:`fleetlm.tune.filter` does.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from fleetlm.errors import ConfigError
from fleetlm.tune.config import TeacherConfig, TuneConfig
from fleetlm.tune.records import Example, classification_example

Progress = Callable[[str, int, int], None]  # (stage name, done, total)

TEXTS_PER_REQUEST = 10  # classification texts asked for in one request
PAIRS_PER_REQUEST = 5  # instruction/answer pairs asked for in one request
MAX_ATTEMPTS = 3  # per request, the first try included
BACKOFF_S = 0.5  # wait before retry k (0-based): BACKOFF_S * 2**k, or the server's Retry-After
MAX_BACKOFF_S = 20.0


# ----------------------------------------------------------------------------- teacher


@dataclass
class TeacherStats:
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    failures: int = 0  # calls that got no usable answer after their retries
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: int = 0  # responses without `usage`: tokens estimated as chars / 4
    stopped_by_budget: bool = False
    errors: Counter[str] = field(default_factory=Counter)  # reason -> calls

    def report(self) -> dict[str, Any]:
        return {"requests": self.requests, "retries": self.retries, "failures": self.failures,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "tokens": self.prompt_tokens + self.completion_tokens,
                "usage_estimated": self.usage_estimated,
                "stopped_by_budget": self.stopped_by_budget, "errors": dict(self.errors)}


class _Retry(Exception):
    def __init__(self, reason: str, after_s: float | None = None):
        super().__init__(reason)
        self.reason, self.after_s = reason, after_s


class _Fail(Exception):
    pass


class Teacher:
    """An OpenAI-compatible chat endpoint with retries, a timeout, usage and budget caps.

    ``config_field`` is the config path named in errors (``synthesize.teacher``).
    """

    def __init__(self, cfg: TeacherConfig, client: httpx.AsyncClient, *, concurrency: int,
                 max_requests: int | None = None, max_tokens_total: int | None = None,
                 config_field: str = "synthesize.teacher"):
        self.cfg, self.client = cfg, client
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(f"{config_field}.api_key_env: environment variable "
                                  f"{cfg.api_key_env} is not set; export it with the teacher's "
                                  "API key, or remove api_key_env for a server without keys")
            self.headers["Authorization"] = f"Bearer {key}"
        self.max_requests, self.max_tokens_total = max_requests, max_tokens_total
        self.stats = TeacherStats()
        self._sem = asyncio.Semaphore(concurrency)

    def _over_budget(self) -> bool:
        s = self.stats
        return ((self.max_requests is not None and s.requests >= self.max_requests)
                or (self.max_tokens_total is not None
                    and s.prompt_tokens + s.completion_tokens >= self.max_tokens_total))

    async def chat(self, messages: list[dict[str, str]], *, temperature: float | None = None,
                   max_tokens: int | None = None, seed: int | None = None) -> str | None:
        """The assistant's reply, or None when the call failed or the budget is spent."""
        body: dict[str, Any] = {
            "model": self.cfg.model, "messages": messages,
            "temperature": self.cfg.temperature if temperature is None else temperature,
            "max_tokens": self.cfg.max_tokens if max_tokens is None else max_tokens}
        if seed is not None:
            body["seed"] = seed
        reason = ""
        async with self._sem:
            for attempt in range(MAX_ATTEMPTS):
                if self._over_budget():
                    self.stats.stopped_by_budget = True
                    return None
                self.stats.requests += 1
                try:
                    return await self._once(body)
                except _Fail as e:
                    reason = str(e)
                    break
                except _Retry as e:
                    reason = e.reason
                    if attempt + 1 == MAX_ATTEMPTS:
                        break
                    self.stats.retries += 1
                    wait = e.after_s if e.after_s is not None else BACKOFF_S * 2**attempt
                    await asyncio.sleep(min(wait, MAX_BACKOFF_S))
        self.stats.failures += 1
        self.stats.errors[reason] += 1
        return None

    async def _once(self, body: dict[str, Any]) -> str:
        try:
            # asyncio.timeout bounds the whole call; httpx's timeout is per read/write
            async with asyncio.timeout(self.cfg.timeout_s):
                resp = await self.client.post(self.url, json=body, headers=self.headers,
                                              timeout=self.cfg.timeout_s)
        except httpx.ConnectTimeout:
            raise _Retry("connect timeout") from None
        except (TimeoutError, httpx.TimeoutException):
            # a teacher too slow once is as slow on a retry: fail, don't wait 3x as long
            raise _Fail(f"timeout after {self.cfg.timeout_s:g}s "
                        "(raise synthesize.teacher.timeout_s)") from None
        except httpx.TransportError as e:
            raise _Retry(f"connection error ({type(e).__name__})") from None
        if resp.status_code == 429 or resp.status_code >= 500:
            raise _Retry(f"HTTP {resp.status_code}", _retry_after(resp))
        if resp.status_code >= 400:
            raise _Fail(f"HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            data = resp.json()
            content = data["choices"][0]["message"].get("content") or ""
            if not isinstance(content, str):
                raise TypeError(type(content).__name__)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Fail("response is not an OpenAI chat completion") from None
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.stats.completion_tokens += usage["completion_tokens"]
        else:
            self.stats.usage_estimated += 1
            self.stats.prompt_tokens += sum(len(m["content"]) for m in body["messages"]) // 4
            self.stats.completion_tokens += len(content) // 4
        return content


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return max(0.0, float(resp.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


@asynccontextmanager
async def http_client(client: httpx.AsyncClient | None,
                      cfg: TeacherConfig) -> AsyncIterator[httpx.AsyncClient]:
    """``client`` as given (the caller closes it), or a new one closed on exit."""
    if client is not None:
        yield client
        return
    async with httpx.AsyncClient(timeout=cfg.timeout_s) as c:
        yield c


def require_teacher(cfg: TuneConfig, why: str) -> TeacherConfig:
    if cfg.synthesize.teacher is None:
        raise ConfigError(f"synthesize.teacher is required for {why}; give base_url and "
                          "model of an OpenAI-compatible endpoint (a `fleetlm serve` URL "
                          "ending in /v1 works)")
    return cfg.synthesize.teacher


# ----------------------------------------------------------------------------- parsing

_BULLET = re.compile(r"^\s*(?:[-*•·–]+|\(?\d{1,3}[.):\]]|#\d+[.:)]?)\s+")
_QUOTES = [('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("«", "»"), ("`", "`")]
_PREAMBLE = re.compile(r"^(here (are|is)|here's|sure\b|certainly\b|of course\b|okay\b|ok\b)",
                       re.IGNORECASE)
_FENCE = re.compile(r"^```[\w-]*\s*$|^\s*```\s*$", re.MULTILINE)


def parse_lines(text: str) -> list[str]:
    """One text per line: numbering, bullets and surrounding quotes removed; blank lines,
    code fences and preambles ("Here are 5 messages:") skipped."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            continue
        line = _BULLET.sub("", line, count=1).strip()
        changed = True
        while changed and len(line) >= 2:
            changed = False
            for a, b in _QUOTES:
                if line.startswith(a) and line.endswith(b):
                    line, changed = line[len(a):-len(b)].strip(), True
        if not line or line.endswith(":") or _PREAMBLE.match(line):
            continue
        out.append(line)
    return out


_INSTRUCTION_KEYS = ("instruction", "prompt", "question", "input")
_ANSWER_KEYS = ("answer", "response", "output", "completion")


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """(instruction, answer) pairs from a JSON array (or JSON lines, or a code fence
    around either); items without both fields as non-empty text are skipped."""
    text = _FENCE.sub("", text).strip()
    items: list[Any] = []
    for attempt in (text, text[text.find("["):text.rfind("]") + 1]):
        try:
            obj = json.loads(attempt)
        except ValueError:
            continue
        if isinstance(obj, dict) and not any(k in obj for k in _INSTRUCTION_KEYS):
            # {"examples": [...]}: a wrapper object around the array
            obj = next((v for v in obj.values() if isinstance(v, list)), [obj])
        items = obj if isinstance(obj, list) else [obj]
        break
    else:  # JSON lines, or objects separated by commas/newlines
        decoder = json.JSONDecoder()
        pos = text.find("{")
        while pos != -1:
            try:
                obj, end = decoder.raw_decode(text, pos)
            except ValueError:
                pos = text.find("{", pos + 1)
                continue
            items.append(obj)
            pos = text.find("{", end)
    pairs = []
    for it in items:
        if not isinstance(it, dict):
            continue
        q = next((it[k] for k in _INSTRUCTION_KEYS if isinstance(it.get(k), str)), "")
        a = next((it[k] for k in _ANSWER_KEYS if isinstance(it.get(k), str)), "")
        if q.strip() and a.strip():
            pairs.append((q.strip(), a.strip()))
    return pairs


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Request:
    messages: list[dict[str, str]]
    n: int  # rows asked for
    label: str | None  # classification
    system: tuple[dict[str, str], ...] = ()  # generation: the seed's system message(s)


def _labels(train: Sequence[Example], cfg: TuneConfig) -> list[str]:
    if cfg.task.labels is not None:
        return list(cfg.task.labels)
    return sorted({ex.label for ex in train if ex.label is not None})


def _plan_classification(train: Sequence[Example], cfg: TuneConfig,
                         rng: random.Random) -> list[_Request]:
    s, desc = cfg.synthesize, cfg.task.description.strip()
    by_label: dict[str, list[str]] = {}
    for ex in train:
        if ex.label is not None and ex.text is not None:
            by_label.setdefault(ex.label, []).append(ex.text)
    plan = []
    for label in _labels(train, cfg):
        texts = by_label.get(label, [])
        left = s.per_label
        while left > 0:
            n = min(left, TEXTS_PER_REQUEST)
            left -= n
            seeds = rng.sample(texts, min(s.seed_examples, len(texts)))
            shown = "".join(f"- {t}\n" for t in seeds)
            user = ((f"Task: {desc}\n" if desc else "")
                    + f"Intent (label): {label}\n"
                    + (f"Examples of user messages with this intent:\n{shown}" if seeds else "")
                    + f"\nWrite {n} new user messages with the intent \"{label}\". Make them "
                    "diverse: vary wording, length, tone and details, and do not copy the "
                    "examples. Write one message per line, with no numbering, quotes or "
                    "other text.")
            plan.append(_Request(
                messages=[{"role": "system", "content": "You write realistic, varied training "
                           "data for a text classifier."}, {"role": "user", "content": user}],
                n=n, label=label))
    return plan


def _plan_generation(train: Sequence[Example], cfg: TuneConfig,
                     rng: random.Random) -> list[_Request]:
    s, desc = cfg.synthesize, cfg.task.description.strip()
    pool = [ex for ex in train if any(m["role"] == "user" for m in ex.prompt)]
    plan = []
    left = s.num_instructions
    while left > 0:
        n = min(left, PAIRS_PER_REQUEST)
        left -= n
        seeds = rng.sample(pool, min(s.seed_examples, len(pool)))
        shown = "\n".join(json.dumps({"instruction": _last_user(ex), "answer": ex.answer},
                                     ensure_ascii=False) for ex in seeds)
        user = ((f"Task: {desc}\n" if desc else "")
                + (f"The assistant follows this system prompt: {cfg.task.system_prompt}\n"
                   if cfg.task.system_prompt else "")
                + (f"Examples of instructions and the answers the assistant gives:\n{shown}\n"
                   if seeds else "")
                + f"\nWrite {n} new, diverse instructions for this task, each with the answer "
                "the assistant should give. Do not repeat the examples. Reply with only a JSON "
                "array of objects with the keys \"instruction\" and \"answer\".")
        system = tuple(m for m in seeds[0].prompt if m["role"] == "system") if seeds else ()
        plan.append(_Request(
            messages=[{"role": "system", "content": "You write realistic, varied training "
                       "data for an AI assistant. You reply with JSON only."},
                      {"role": "user", "content": user}],
            n=n, label=None, system=system))
    return plan


def _last_user(ex: Example) -> str:
    return next(m["content"] for m in reversed(ex.prompt) if m["role"] == "user")


# ----------------------------------------------------------------------------- synthesize


@dataclass
class SynthResult:
    rows: list[Example]
    report: dict[str, Any]


async def synthesize(train: list[Example], cfg: TuneConfig, *,
                     client: httpx.AsyncClient | None = None,
                     progress: Progress | None = None) -> SynthResult:
    """New rows from the teacher; see the module docstring."""
    teacher_cfg = require_teacher(cfg, "synthesis")
    s = cfg.synthesize
    classification = cfg.task.type == "classification"
    rng = random.Random(cfg.seed)
    plan = (_plan_classification(train, cfg, rng) if classification
            else _plan_generation(train, cfg, rng))
    meta = {"teacher": teacher_cfg.model}
    unparsable = 0
    done = 0

    async with http_client(client, teacher_cfg) as http:
        teacher = Teacher(teacher_cfg, http, concurrency=s.concurrency,
                          max_requests=s.max_requests, max_tokens_total=s.max_tokens_total)

        async def run(i: int, req: _Request) -> list[Example]:
            nonlocal unparsable, done
            reply = await teacher.chat(req.messages, seed=cfg.seed * 100_003 + i)
            rows: list[Example] = []
            if reply is not None:
                if req.label is not None:
                    rows = [classification_example(t, req.label, source="synthetic")
                            for t in parse_lines(reply)[:req.n]]
                else:
                    rows = [Example(prompt=(*req.system, {"role": "user", "content": q}),
                                    answer=a, source="synthetic")
                            for q, a in parse_pairs(reply)[:req.n]]
                if not rows:
                    unparsable += 1
            done += 1
            if progress is not None:
                progress("synthesize", done, len(plan))
            return [replace(r, meta=dict(meta)) for r in rows]

        batches = await asyncio.gather(*(run(i, r) for i, r in enumerate(plan)))

    rows = [r for b in batches for r in b]
    report = {"planned_requests": len(plan), "rows": len(rows),
              "rows_asked": sum(r.n for r in plan), "unparsable": unparsable,
              **teacher.stats.report()}
    return SynthResult(rows=rows, report=report)
