"""``fleetlm route train|calibrate|eval``: the router offline. Training is
:mod:`fleetlm.router.training`, calibration :mod:`fleetlm.router.calibration_runs`, evaluation
:mod:`fleetlm.router.evaluation_runs`, the options' checks :mod:`fleetlm.router.options`;
this module declares the options, prints, and turns errors into exit code 2."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fleetlm.cli.options import LedgerOpt, SinceOpt, fail, warn
from fleetlm.errors import FleetLMError

app = typer.Typer(help="The router offline: train a classifier router, calibrate a "
                       "threshold, evaluate against random and the oracle.",
                  no_args_is_help=True)

# what a command that reads --data catches and reports as `error: ...`
ERRORS = (FleetLMError, ValueError, FileNotFoundError, ImportError)


class RouterTargetOpt(StrEnum):
    large_needed = "large_needed"
    small_correct = "small_correct"


OUTCOMES_HELP = ('JSON lines, one past request each: {"prompt", "small_correct", '
                 '"large_correct"} (or RouteLLM\'s weak_correct/strong_correct).')


@app.command("train")
def route_train(
    data: Annotated[Path, typer.Option("--data", help=OUTCOMES_HELP + " The ledger cannot "
                                       "train a router: it stores no prompts.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for router.json; a route's "
                                      "`classifier:` key names this folder.")],
    embedding: Annotated[str, typer.Option(
        help="all-MiniLM-L6-v2:static (its token embeddings, ~0.2 ms a request), "
             "all-MiniLM-L6-v2 (the full sentence model, ~20 ms), base:MODEL, or a local "
             "Hugging Face folder.")] = "all-MiniLM-L6-v2:static",
    target: Annotated[RouterTargetOpt, typer.Option(
        help="large_needed: learn when only the large model is right (RouteLLM); "
             "small_correct: learn when the small one is.")] = RouterTargetOpt.large_needed,
    c: Annotated[float, typer.Option("--C", help="Inverse regularisation strength of the "
                                     "logistic regression (larger = fits the data closer).")] = 1.0,
    folds: Annotated[int, typer.Option(help="Cross-validation folds for the held-out "
                                       "figures (0 = skip).")] = 5,
    seed: Annotated[int, typer.Option(help="Shuffles the folds; seeds the random baseline.")] = 0,
) -> None:
    """Learn a classifier router from past outcomes and save it (router.json in --out)."""
    try:
        from fleetlm.router.options import check_train
        from fleetlm.router.training import train_from_outcomes

        check_train(c, folds, out)
        run = train_from_outcomes(data, out, embedding=embedding, target=target.value, C=c,
                                  folds=folds, seed=seed, echo=typer.echo)
    except ERRORS as e:
        fail(e)
    weak = run.warning()
    if weak is not None:
        warn(weak)
    typer.echo(run.next_steps())


@app.command("calibrate")
def route_calibrate(
    out: Annotated[Path, typer.Option("--out", help="The threshold file to write (JSON); a "
                                      "route's `threshold:` key names it.")],
    target_escalation: Annotated[float | None, typer.Option(
        help="Share of requests to escalate to the large model, in [0, 1] (e.g. 0.2).")] = None,
    target_quality: Annotated[float | None, typer.Option(
        help="Hybrid accuracy to reach with the least escalation, in (0, 1]; needs "
             "outcomes (--data).")] = None,
    relative_to_large: Annotated[bool, typer.Option(
        "--relative-to-large", help="--target-quality is a fraction of the always-large "
                                    "accuracy (0.95 = keep 95% of its quality).")] = False,
    data: Annotated[Path | None, typer.Option("--data", help=OUTCOMES_HELP + " Scores from "
                                              "--router, else a score on every row.")] = None,
    router: Annotated[Path | None, typer.Option(
        "--router", help="A trained router folder (`fleetlm route train --out`): scores the "
                         "--data prompts, for policy classifier.")] = None,
    policy: Annotated[str | None, typer.Option(
        "--policy", help="The policy that produced the recorded scores (confidence, "
                         "classifier, ...); the file records it, and a route of another "
                         "policy refuses the file.")] = None,
    scores_key: Annotated[str, typer.Option(
        "--scores-key", help="The field holding each --data row's score (without --router).")
    ] = "score",
    route: Annotated[str | None, typer.Option(
        "--route", help="Calibrate on the scores the ledger recorded for this route, instead "
                        "of --data (with --target-escalation).")] = None,
    ledger: LedgerOpt = None,
    since: SinceOpt = None,
) -> None:
    """Choose a route's threshold from data: a target share escalated or a target quality."""
    try:
        from fleetlm.router.calibration_runs import calibrate
        from fleetlm.router.options import CalibrateSettings

        settings = CalibrateSettings(
            target_escalation=target_escalation, target_quality=target_quality,
            relative_to_large=relative_to_large, data=data, router=router, policy=policy,
            scores_key=scores_key, route=route, ledger=ledger, since=since)
        settings.check()
        run = calibrate(out, settings, warn=warn)
    except ERRORS as e:
        fail(e)
    for line in run.lines(settings):
        typer.echo(line)


@app.command("eval")
def route_eval(
    data: Annotated[Path, typer.Option("--data", help=OUTCOMES_HELP + " Prompts the router "
                                       "was not trained on, for honest figures.")],
    router: Annotated[Path | None, typer.Option(
        "--router", help="A trained router folder (`fleetlm route train --out`).")] = None,
    scores_key: Annotated[str | None, typer.Option(
        "--scores-key", help="Also (or, without --router, instead) evaluate the scores in this "
                             "field of every --data row (default without --router: score).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="The PNG of accuracy against share escalated (default: --json's path "
                       "with .png, else ./route-eval.png).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON "
                                                  "here.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the random baseline.")] = 0,
) -> None:
    """RouteLLM-style report: APGR and CPT(50/80/95%) of the router against random and the
    oracle, and the accuracy-against-share-escalated plot."""
    try:
        from fleetlm.router.evaluation_runs import evaluate_outcomes

        run = evaluate_outcomes(data, router=router, scores_key=scores_key, plot=plot,
                                json_out=json_out, seed=seed, warn=warn)
    except ERRORS as e:
        fail(e)
    for line in run.lines():
        typer.echo(line)
