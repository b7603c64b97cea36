"""The settings of the offline router commands (``fleetlm route train`` and ``fleetlm route
calibrate``) and their checks: every problem found at once, each naming its option and the
fix, raised as one ConfigError before any data is read.

This module knows which settings go together; it reads no file and knows nothing of typer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fleetlm.errors import ConfigError


def raise_problems(problems: list[str]) -> None:
    """Every problem with the options at once (each names its option and the fix)."""
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else
                          f"{len(problems)} problems:\n  " + "\n  ".join(problems))


def check_train(c: float, folds: int, out: Path) -> None:
    """``fleetlm route train``'s --C, --folds and --out."""
    problems = []
    if not c > 0:
        problems.append(f"--C {c}: must be > 0")
    if folds == 1 or folds < 0:
        problems.append(f"--folds {folds}: 0 (skip) or at least 2")
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out}: is a file; give a folder (router.json goes inside)")
    raise_problems(problems)


@dataclass(frozen=True)
class CalibrateSettings:
    """``fleetlm route calibrate``'s choices: one target, one sample (outcomes in ``data``,
    or the ledger's scores for ``route``), and the policy the scores belong to."""

    target_escalation: float | None = None
    target_quality: float | None = None
    relative_to_large: bool = False
    data: Path | None = None
    router: Path | None = None
    policy: str | None = None
    scores_key: str = "score"
    route: str | None = None
    ledger: Path | None = None
    since: str | None = None

    def check(self) -> None:
        """Every problem at once, as one ConfigError."""
        raise_problems(self.problems())

    def problems(self) -> list[str]:
        from fleetlm.router.policies import POLICY_NAMES

        te, tq, data, route, router, policy = (self.target_escalation, self.target_quality,
                                               self.data, self.route, self.router, self.policy)
        problems = []
        if te is None and tq is None:
            problems.append("give one target: --target-escalation SHARE (e.g. 0.2) or "
                            "--target-quality ACCURACY (e.g. 0.95)")
        elif te is not None and tq is not None:
            problems.append("--target-escalation and --target-quality: give one, not both")
        if te is not None and not 0.0 <= te <= 1.0:
            problems.append(f"--target-escalation {te}: a share in [0, 1]")
        if tq is not None and not 0.0 < tq <= 1.0:
            problems.append(f"--target-quality {tq}: an accuracy in (0, 1]")
        if self.relative_to_large and tq is None:
            problems.append("--relative-to-large applies to --target-quality only; drop it")
        if data is None and route is None:
            problems.append("give the sample: --data FILE (outcomes) or --route NAME (the "
                            "scores the ledger recorded for that route)")
        elif data is not None and route is not None:
            problems.append("--data and --route: give one sample, not both")
        if route is None and (self.ledger is not None or self.since is not None):
            problems.append("--ledger and --since read the ledger: add --route NAME")
        if route is not None:
            if tq is not None:
                problems.append("--target-quality needs outcomes (was each answer right?), "
                                "which the ledger does not record; use --target-escalation, "
                                "or --data with an outcomes file")
            if router is not None:
                problems.append("--router scores prompts, which the ledger does not store; "
                                "its recorded scores are used as they are: drop --router")
        if policy is not None and policy not in POLICY_NAMES:
            problems.append(f"--policy {policy!r}: one of {', '.join(POLICY_NAMES)}")
        if router is not None and policy not in (None, "classifier"):
            problems.append(f"--policy {policy}: a trained router's scores are the classifier "
                            "policy's; drop --policy")
        if data is not None and router is None and policy is None:
            problems.append(f"--policy: name the policy whose scores --data holds in "
                            f"{self.scores_key!r} (e.g. confidence), or pass --router FOLDER")
        return problems
