"""Thresholds from data (``fleetlm route calibrate``).

A policy's raw scores have no universal scale, so a threshold is read off a sample of past
requests rather than chosen by hand (as RouteLLM's ``calibrate_threshold.py`` does):

- target escalation share: the threshold below which that share of the sample's scores lie
  (a quantile of the scores; RouteLLM takes quantile ``1 - strong_pct`` of its win rates,
  the same cut in the opposite convention);
- target quality: the lowest escalation share whose hybrid accuracy reaches the target, where
  an escalated prompt counts as ``large_correct`` and a kept one as ``small_correct``. The
  target is an absolute accuracy, or a fraction of the always-large accuracy with
  ``relative_to="large"`` ("keep 95% of the large model's quality").

Thresholds sit midway between the highest escalated and the lowest kept score of the sample,
and apply with ``policies.decide`` (score >= threshold -> small). Equal scores move together,
so the share reached can differ from the target when many scores tie; the result says what
was reached.

Also the outcomes file reader (JSON lines ``{"prompt", "small_correct", "large_correct"}``,
or RouteLLM's ``weak_correct``/``strong_correct``), the reader of scores recorded in the same
file (a ``score`` per row), and the threshold file writer.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from fleetlm.router.evaluate import routing_curve

THRESHOLD_FORMAT = "fleetlm-threshold/1"


@dataclass(frozen=True)
class Outcome:
    """One labelled past request: did each model answer it correctly."""

    prompt: str
    small_correct: bool
    large_correct: bool
    domain: str | None = None


_KEY_PAIRS = (("small_correct", "large_correct"), ("weak_correct", "strong_correct"))


def _json_objects(p: Path, problems: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file; a line that is not
    a JSON object is added to ``problems`` and skipped."""
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"line {lineno}: not JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"line {lineno}: expected an object")
                continue
            yield lineno, obj


def load_outcomes(path: str | Path) -> list[Outcome]:
    """Read a JSON-lines outcomes file. Every problem is collected, then raised together."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--data {p}: no such file (JSON lines with "
                                f'"prompt", "small_correct", "large_correct")')
    rows: list[Outcome] = []
    problems: list[str] = []
    for lineno, obj in _json_objects(p, problems):
        keys = next((k for k in _KEY_PAIRS if k[0] in obj and k[1] in obj), None)
        if not isinstance(obj.get("prompt"), str) or keys is None:
            problems.append(f'line {lineno}: needs "prompt" (string) and "small_correct"/'
                            f'"large_correct" (or "weak_correct"/"strong_correct")')
            continue
        vals = [obj[k] for k in keys]
        if not all(isinstance(v, bool) or v in (0, 1) for v in vals):
            problems.append(f"line {lineno}: {keys[0]}/{keys[1]} must be true/false")
            continue
        rows.append(Outcome(obj["prompt"], bool(vals[0]), bool(vals[1]), obj.get("domain")))
        if len(problems) >= 20:
            break
    if problems:
        raise ValueError(f"--data {p}: " + "; ".join(problems[:20]))
    if not rows:
        raise ValueError(f"--data {p}: no rows")
    return rows


def load_scores(path: str | Path, key: str = "score") -> np.ndarray:
    """The ``key`` number in [0, 1] of every row of a JSON-lines file, in file order (the
    order of :func:`load_outcomes`): scores a policy recorded for each prompt, e.g. the
    small model's confidence. Every problem is collected, then raised together."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--data {p}: no such file")
    out: list[float] = []
    problems: list[str] = []
    for lineno, obj in _json_objects(p, problems):
        v = obj.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) \
                or not 0.0 <= v <= 1.0:
            problems.append(f"line {lineno}: " + (f'no "{key}"' if v is None else
                                                  f'"{key}" is {v!r}, not a number in [0, 1]'))
            if len(problems) >= 20:
                break
            continue
        out.append(float(v))
    if problems:
        raise ValueError(f"--data {p}: " + "; ".join(problems[:20]))
    return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True)
class Calibration:
    threshold: float
    share_escalated: float  # on the calibration sample
    accuracy: float | None  # hybrid accuracy on the sample (None without outcomes)
    target: dict[str, Any]  # {"escalation": 0.2} or {"quality": 0.95, "relative_to": ...}
    n: int


def threshold_for_escalation(scores: ArrayLike, target: float,
                             small_correct: ArrayLike | None = None,
                             large_correct: ArrayLike | None = None) -> Calibration:
    """The threshold that escalates the share ``target`` of ``scores`` (closest achievable;
    on a tie, the lower share). Outcomes, when given, only fill in the accuracy."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"--target-escalation must be in [0, 1], got {target}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    has_outcomes = small_correct is not None and large_correct is not None
    a = np.asarray(small_correct if has_outcomes else np.zeros_like(s), dtype=np.float64)
    b = np.asarray(large_correct if has_outcomes else np.zeros_like(s), dtype=np.float64)
    curve = routing_curve(s, a, b)
    i = int(np.argmin(np.abs(curve.share - target) + 1e-12 * curve.share))
    return Calibration(threshold=float(curve.threshold[i]), share_escalated=float(curve.share[i]),
                       accuracy=float(curve.accuracy[i]) if has_outcomes else None,
                       target={"escalation": float(target)}, n=len(s))


def threshold_for_quality(scores: ArrayLike, small_correct: ArrayLike, large_correct: ArrayLike,
                          target: float,
                          relative_to: Literal["absolute", "large"] = "absolute") -> Calibration:
    """The threshold with the lowest escalation whose hybrid accuracy reaches ``target``
    (absolute accuracy, or ``target`` x the always-large accuracy)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"--target-quality must be in (0, 1], got {target}")
    if relative_to not in ("absolute", "large"):
        raise ValueError(f"relative_to must be 'absolute' or 'large', got {relative_to!r}")
    curve = routing_curve(scores, small_correct, large_correct)
    goal = target * curve.acc_large if relative_to == "large" else target
    ok = np.flatnonzero(curve.accuracy >= goal - 1e-12)
    if len(ok) == 0:
        raise ValueError(f"--target-quality {target} is out of reach on this data: the best "
                         f"hybrid accuracy is {curve.accuracy.max():.4f} (always-large "
                         f"{curve.acc_large:.4f}); lower the target")
    i = int(ok[0])
    return Calibration(threshold=float(curve.threshold[i]), share_escalated=float(curve.share[i]),
                       accuracy=float(curve.accuracy[i]),
                       target={"quality": float(target), "relative_to": relative_to,
                               "accuracy_goal": float(goal)},
                       n=int(np.asarray(scores).size))


def write_threshold(path: str | Path, threshold: float, meta: Mapping[str, Any]) -> Path:
    """Write the threshold file: ``{"format", "threshold", "policy", "target", "data", ...}``.

    ``meta`` must hold ``policy`` (name), ``target`` (what was asked, e.g.
    ``{"escalation": 0.2}``) and ``data`` (where the sample came from); any other JSON-able
    keys (share reached, accuracy, n, model ids) are kept. Written atomically.
    """
    if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    missing = [k for k in ("policy", "target", "data") if k not in meta]
    if missing:
        raise ValueError(f"write_threshold meta lacks {', '.join(missing)}")
    doc = {"format": THRESHOLD_FORMAT, "threshold": float(threshold), **dict(meta),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def read_threshold(path: str | Path) -> dict[str, Any]:
    """Read a threshold file; the error names the file and what is wrong with it."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"threshold file {p} not found; write one with "
                                f"`fleetlm route calibrate`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"threshold file {p} is not JSON: {e.msg}") from None
    t = doc.get("threshold") if isinstance(doc, dict) else None
    if not isinstance(t, int | float) or not 0.0 <= float(t) <= 1.0:
        raise ValueError(f'threshold file {p}: "threshold" must be a number in [0, 1]')
    return dict(doc)


def calibration_meta(cal: Calibration, policy: str, data: str,
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``meta`` for :func:`write_threshold` from a calibration result."""
    meta: dict[str, Any] = {"policy": policy, "target": cal.target, "data": data,
                            "share_escalated": cal.share_escalated, "n": cal.n}
    if cal.accuracy is not None:
        meta["accuracy"] = cal.accuracy
    if extra:
        meta.update(extra)
    return meta


def outcome_arrays(rows: Sequence[Outcome]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(prompts, small_correct, large_correct) as lists/arrays."""
    return ([r.prompt for r in rows], np.array([r.small_correct for r in rows], dtype=bool),
            np.array([r.large_correct for r in rows], dtype=bool))
