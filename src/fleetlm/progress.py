"""Progress of long work (tune, bench, route train), seen in a terminal and in a plain log.

On a terminal: rich progress bars. Anywhere else (CI, ``nohup``, a container log, a pipe):
one plain line per stage at its start, then at a steady interval and at its end::

    2026-12-06 09:12:03 tune: train 120/400 30.0% 2.10/s elapsed 57s eta 2m13s | loss 1.231

The interval is ``FLEETLM_PROGRESS_INTERVAL`` seconds (default 10), read when a
:class:`Progress` opens. Lines go to stderr, so a command's own output on stdout (a table,
JSON) stays clean. This module knows terminals and clocks, not what the work is.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

DEFAULT_INTERVAL_S = 10.0
INTERVAL_ENV = "FLEETLM_PROGRESS_INTERVAL"


class Update(Protocol):
    def __call__(self, done: int, total: int | None = None, info: str = "") -> None: ...


def _duration(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def interval_from_env() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        from fleetlm.errors import ConfigError

        raise ConfigError(f"{INTERVAL_ENV}={raw!r}: seconds between progress lines, a number "
                          ">= 0 (0 prints every update); unset it for the default "
                          f"{DEFAULT_INTERVAL_S:g}")
    return value


@dataclass
class _Plain:
    """One stage's plain-line state."""

    description: str
    total: int | None
    started: float = field(default_factory=time.monotonic)
    last_print: float = 0.0
    done: int = 0
    info: str = ""
    finished: bool = False

    def line(self, label: str, now: float) -> str:
        elapsed = now - self.started
        parts = [time.strftime("%Y-%m-%d %H:%M:%S"), f"{label}: {self.description}"]
        if self.total:
            parts.append(f"{self.done}/{self.total} {100 * self.done / self.total:.1f}%")
        else:
            parts.append(str(self.done))
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.done and elapsed > 0:
            parts.append(f"{rate:.2f}/s" if rate < 100 else f"{rate:.0f}/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"eta {_duration((self.total - self.done) / rate)}")
        text = " ".join(parts)
        return f"{text} | {self.info}" if self.info else text


class Progress:
    """Progress of one command (``label``: tune, bench decode, ...). Use as a context:
    ``with Progress("tune") as p: update = p.task("train", 400); update(1, info=...)``.

    ``plain`` forces plain lines (True) or bars (False); by default bars on a terminal."""

    def __init__(self, label: str, *, stream: IO[str] | None = None, plain: bool | None = None,
                 interval_s: float | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.plain = (not _isatty(self.stream)) if plain is None else plain
        self.interval_s = interval_from_env() if interval_s is None else interval_s
        self._rich: Any = None
        self._tasks: list[_Plain] = []

    def __enter__(self) -> Progress:
        if not self.plain:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), console=Console(file=self.stream))
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
            self._rich = None
        for t in self._tasks:  # a stage cut short still says where it stopped
            if not t.finished:
                self._emit(t, time.monotonic())
                t.finished = True

    def say(self, msg: str) -> None:
        """A message between the bars (or a plain line)."""
        if self._rich is not None:
            self._rich.console.print(msg)
        else:
            print(msg, file=self.stream, flush=True)

    def task(self, description: str, total: int | None = None) -> Update:
        """The callback of one stage: ``update(done, total=None, info="")``."""
        if self._rich is not None:
            rich = self._rich
            tid = rich.add_task(description, total=total, info="")

            def update_bar(done: int, total: int | None = None, info: str = "") -> None:
                kw: dict[str, Any] = {"completed": done, "info": info}
                if total is not None:
                    kw["total"] = total
                rich.update(tid, **kw)
            return update_bar
        state = _Plain(description, total)
        self._tasks.append(state)
        self._emit(state, state.started)

        def update_plain(done: int, total: int | None = None, info: str = "") -> None:
            if state.finished:
                return
            state.done, state.info = done, info
            if total is not None:
                state.total = total
            now = time.monotonic()
            end = state.total is not None and done >= state.total
            if end or now - state.last_print >= self.interval_s:
                self._emit(state, now)
            state.finished = end
        return update_plain

    def _emit(self, state: _Plain, now: float) -> None:
        state.last_print = now
        print(state.line(self.label, now), file=self.stream, flush=True)


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False

