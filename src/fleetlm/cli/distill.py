"""``fleetlm distill``: logit-level knowledge distillation (:mod:`fleetlm.compress.distill`);
this module reads the options and prints the summary as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fleetlm.cli.options import fail
from fleetlm.errors import FleetLMError

app = typer.Typer()


@app.command()
def distill(
    teacher: Annotated[str, typer.Option(help="The teacher: embedded name, HF folder or .gguf file (e.g. `fleetlm export`'s hf/).")],
    student: Annotated[str, typer.Option(help="The student, with the teacher's tokenizer (e.g. a pruned copy).")],
    data: Annotated[Path, typer.Option(help=".txt (a row per line) or .jsonl (text, messages, prompt + completion, or a tune run's prepared rows).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the distilled student (Hugging Face) and distill.json.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Rows per step.")] = 8,
    max_len: Annotated[int, typer.Option(help="Tokens per row (longer rows are cut).")] = 128,
    learning_rate: Annotated[float, typer.Option(help="AdamW peak learning rate (warm-up, then cosine).")] = 1e-4,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of both distributions.")] = 2.0,
    ce_weight: Annotated[float, typer.Option(help="Weight of the data's own next-token cross-entropy (0: KL only).")] = 0.0,
    eval_rows: Annotated[int, typer.Option(help="Rows held out to measure KL and top-1 agreement before and after.")] = 64,
    seed: Annotated[int, typer.Option(help="Shuffling and sampling seed.")] = 0,
    bf16: Annotated[bool, typer.Option("--bf16/--no-bf16", help="bfloat16 autocast for the forwards (losses in float32).")] = True,
) -> None:
    """Train a student on a teacher's next-token distributions (KL at a temperature), for
    any pair with the same tokenizer (docs/compress.md)."""
    from pydantic import ValidationError

    from fleetlm.compress.distill import DistillSettings
    from fleetlm.compress.distill import distill as run
    from fleetlm.config import format_errors

    try:
        s = DistillSettings(teacher=teacher, student=student, data=data, out=out, steps=steps,
                            batch_size=batch_size, max_len=max_len,
                            learning_rate=learning_rate, temperature=temperature,
                            ce_weight=ce_weight, eval_rows=eval_rows, seed=seed, bf16=bf16)
        summary = run(s, say=lambda m: typer.echo(m, err=True))
    except ValidationError as e:
        fail(ValueError("; ".join(format_errors(e, "docs/compress.md"))))
    except FleetLMError as e:
        fail(e)
    typer.echo(json.dumps(summary, indent=2))
