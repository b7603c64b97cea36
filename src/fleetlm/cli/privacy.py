"""``fleetlm privacy train``: make the learned PII recognizer's weights file
(:func:`fleetlm.privacy.learned.train.train`). Progress goes to stderr, the JSON summary
(file, size, training time, the model's figures on the validation split) to stdout.

This module declares the options and prints; training lives in fleetlm.privacy.learned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fleetlm.cli.options import fail
from fleetlm.errors import FleetLMError

app = typer.Typer(help="Personal-data detection: the learned recognizer.", no_args_is_help=True)


@app.command("train")
def privacy_train(
    out: Annotated[Path, typer.Option(help="Folder for pii_minilm_lora.safetensors (give "
                                           "it to PiiConfig.learned_model).")] = Path("pii-learned"),
    data: Annotated[Path | None, typer.Option(help="presidio's synth_dataset_v2_train.json "
                                                   "(default: ../shared/data/pii/ beside the "
                                                   "repository); only its train split is used.")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training rows.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Windows per step.")] = 16,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (peak, after warm-up).")] = 1e-3,
    rank: Annotated[int, typer.Option(help="LoRA rank (alpha = 2 x rank).")] = 16,
    layers: Annotated[int, typer.Option(help="MiniLM's first N transformer layers (1-6): "
                                             "fewer detect faster.")] = 3,
    augment: Annotated[int, typer.Option(help="Generated support-style rows added to the "
                                              "training rows (0: none).")] = 8000,
    seed: Annotated[int, typer.Option(help="Seed of the head's init and the shuffling.")] = 0,
    case_dropout: Annotated[float, typer.Option(help="Share of windows trained without the "
                                                      "capital-letter flag.")] = 0.1,
    limit: Annotated[int | None, typer.Option(help="Only the first N training rows.")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Only the first N validation rows "
                                                        "(0: no evaluation).")] = None,
) -> None:
    """Fine-tune all-MiniLM-L6-v2 (LoRA) to tag names, places, organisations, dates and
    nationalities on the synthetic set's train split, and write the weights file."""
    from fleetlm.progress import Progress

    try:
        from fleetlm.privacy.learned.train import TrainSettings, train

        settings = TrainSettings(data=data, out=out, epochs=epochs, batch_size=batch_size,
                                 lr=lr, rank=rank, layers=layers, augment=augment, seed=seed, case_dropout=case_dropout,
                                 limit=limit, eval_limit=eval_limit)
        with Progress("privacy train") as p:
            summary = train(settings, p.say, p.task)
    except FleetLMError as e:
        fail(e)
    typer.echo(json.dumps(summary, indent=2))
