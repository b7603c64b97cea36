"""``fleetlm privacy train``: fine-tune the learned PII recognizer on the train part of
presidio's synthetic set plus generated rows, and write its weights file.

The split is :func:`fleetlm.privacy.eval.synthetic.synthetic_split` (disjoint by
template): the model trains on ``train`` plus ``augment`` rows of
:func:`fleetlm.privacy.learned.generate.generate` (8,000 by default: support-style texts
from templates of our own filled by Faker), and ``val`` is used for nothing but the figures
printed at the end (the model alone, overlap rule, see scoring.py). The hand-labelled
``support_v1`` set is never read here.

What trains: the first ``layers`` (3 by default) of all-MiniLM-L6-v2's six transformer
layers, with LoRA (rank 16 by default) on every attention and MLP projection, the tag
head, and BERT's two token-type vectors, which carry a "starts with a capital" flag (the
encoder is uncased). AdamW, linear warm-up over the first tenth of the steps then linear
decay, cross-entropy over the word pieces. With ``case_dropout`` of the windows the flag
is zeroed, so lower-case chat still works. Seeded: the same settings on the same machine
give the same file.

The file is written under a temporary name and renamed, float16, with the settings in
its metadata (model.py reads it). This module knows training; not presidio.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fleetlm.config import StrictModel
from fleetlm.errors import ConfigError
from fleetlm.privacy.learned.labels import gold_spans, tag_pieces
from fleetlm.privacy.learned.model import (
    META_KEY,
    WEIGHTS_NAME,
    LearnedMeta,
    LearnedNer,
    Window,
    base_model,
    collate,
    encode,
    lora_config,
    minilm_folder,
)
from fleetlm.privacy.learned.scoring import span_scores

Say = Callable[[str], None]
Update = Callable[..., None]  # progress.Update: update(done, total=None, info="")


class TrainSettings(StrictModel):
    """The options of ``fleetlm privacy train`` (the CLI's flags, one to one)."""

    data: Path | None = None  # None = ../shared/data/pii/synth_dataset_v2_train.json
    out: Path = Path("pii-learned")
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    rank: int = 16
    layers: int = 3  # MiniLM's first N transformer layers (of 6): fewer = faster detection
    augment: int = 8000  # generated rows (fleetlm.privacy.learned.generate) added to training
    seed: int = 0
    case_dropout: float = 0.1
    limit: int | None = None  # the first N training rows (smoke tests)
    eval_limit: int | None = None  # the first N validation rows (None = all; 0 = skip)

    def check(self) -> Path:
        """The data path; raises ConfigError naming every bad flag at once."""
        from fleetlm.privacy.eval.synthetic import default_synthetic_path

        problems = []
        path = self.data if self.data is not None else default_synthetic_path()
        if not path.is_file():
            problems.append(f"--data {path}: no such file; pass presidio's "
                            "synth_dataset_v2_train.json (default: ../shared/data/pii/ "
                            "beside the repository)")
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size),
                            ("--rank", self.rank)):
            if value < 1:
                problems.append(f"{flag}={value}: must be >= 1")
        if self.augment < 0:
            problems.append(f"--augment={self.augment}: must be >= 0 (0: none)")
        if not 1 <= self.layers <= 6:
            problems.append(f"--layers={self.layers}: must be 1 to 6 (all-MiniLM-L6-v2 has 6)")
        if not 0 < self.lr < 1:
            problems.append(f"--lr={self.lr}: must be in (0, 1), e.g. 1e-3")
        if not 0 <= self.case_dropout < 1:
            problems.append(f"--case-dropout={self.case_dropout}: must be in [0, 1)")
        for flag, lim in (("--limit", self.limit), ("--eval-limit", self.eval_limit)):
            if lim is not None and lim < (1 if flag == "--limit" else 0):
                problems.append(f"{flag}={lim}: must be >= {1 if flag == '--limit' else 0}")
        if self.out.exists() and not self.out.is_dir():
            problems.append(f"--out {self.out}: is a file; give a folder (the weights are "
                            f"written to FOLDER/{WEIGHTS_NAME})")
        if problems:
            raise ConfigError("invalid privacy train settings: " + "; ".join(problems))
        return path


def _windows(tokenizer: Any, rows: Sequence[dict[str, Any]], meta: LearnedMeta) -> list[Window]:
    windows = encode(tokenizer, [r["full_text"] for r in rows], meta)
    for w in windows:
        w.tags = tag_pieces(w.offsets, gold_spans(rows[w.text_index]), meta.labels)
    return windows


def _fit(model: Any, windows: list[Window], s: TrainSettings, pad_id: int,
         update: Update) -> dict[str, Any]:
    """The training loop; returns its figures (steps, seconds, last epoch's mean loss)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01)
    per_epoch = math.ceil(len(windows) / s.batch_size)
    total = per_epoch * s.epochs
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min((k + 1) / warmup, max(0.0, (total - k) / max(1, total - warmup))))
    rng = random.Random(s.seed)
    model.train()
    step, started, epoch_loss = 0, time.monotonic(), float("nan")
    for epoch in range(s.epochs):
        order = list(range(len(windows)))
        rng.shuffle(order)
        losses = []
        for b in range(0, len(order), s.batch_size):
            chunk = [windows[k] for k in order[b:b + s.batch_size]]
            chunk = [Window(w.text_index, w.input_ids, [0] * len(w.case), w.offsets, w.tags)
                     if rng.random() < s.case_dropout else w for w in chunk]
            loss = model(**collate(chunk, pad_id)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            update(step, info=f"epoch {epoch + 1}/{s.epochs} loss {sum(losses) / len(losses):.4f}")
        epoch_loss = sum(losses) / len(losses)
    model.eval()
    return {"steps": step, "train_seconds": round(time.monotonic() - started, 1),
            "final_epoch_loss": round(epoch_loss, 5)}


def save_weights(model: Any, meta: LearnedMeta, out_dir: Path) -> Path:
    """The trained tensors (LoRA, head, token-type vectors) as float16 safetensors with
    ``meta`` in the metadata, written to a temporary name and renamed."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(model)
    tensors = {k: v.detach().to("cpu").half().contiguous() for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / WEIGHTS_NAME
    tmp = out_dir / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={META_KEY: meta.to_json()})
    os.replace(tmp, path)
    return path


def evaluate(ner: LearnedNer, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The model alone on ``rows``: per-type figures (scoring.py) and latency."""
    texts = [r["full_text"] for r in rows]
    started = time.monotonic()
    pred = ner.predict(texts)
    seconds = time.monotonic() - started
    scores = span_scores([gold_spans(r) for r in rows], pred)
    return {"rows": len(rows), "seconds": round(seconds, 2),
            "rows_per_s": round(len(rows) / seconds, 1) if seconds else None,
            "scores": scores}


def train(s: TrainSettings, say: Say, task: Callable[[str, int], Update]) -> dict[str, Any]:
    """Train, save, reload the saved file and evaluate it; the JSON summary.
    ``say`` prints a line, ``task(name, total)`` opens a progress stage."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from fleetlm.privacy.eval.synthetic import synthetic_split

    path = s.check()
    started = time.monotonic()
    train_rows, val_rows = synthetic_split(path)
    train_rows = train_rows[:s.limit] if s.limit is not None else train_rows
    if s.augment:
        from fleetlm.privacy.learned.generate import generate

        train_rows = [*train_rows, *generate(s.augment, seed=s.seed)]
    val_rows = val_rows[:s.eval_limit] if s.eval_limit is not None else val_rows
    folder = minilm_folder()
    meta = LearnedMeta(rank=s.rank, alpha=2 * s.rank, layers=s.layers,
                       base_bytes=(folder / "model.safetensors").stat().st_size)
    torch.manual_seed(s.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = get_peft_model(base_model(folder, meta.labels, meta.layers), lora_config(meta))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    windows = _windows(tokenizer, train_rows, meta)
    say(f"{len(train_rows)} training rows ({s.augment} of them generated; {len(windows)} "
        f"windows), {len(val_rows)} "
        f"validation rows held out, from {path}; {trainable:,} trainable parameters, "
        f"{torch.get_num_threads()} threads")
    steps = math.ceil(len(windows) / s.batch_size) * s.epochs
    fit = _fit(model, windows, s, tokenizer.pad_token_id or 0, task("train", steps))
    weights = save_weights(model, meta, s.out)
    say(f"wrote {weights} ({weights.stat().st_size:,} bytes)")
    summary: dict[str, Any] = {
        "weights": str(weights), "bytes": weights.stat().st_size, "data": str(path),
        "train_rows": len(train_rows), "train_windows": len(windows),
        "trainable_parameters": trainable, "threads": torch.get_num_threads(),
        "settings": s.model_dump(mode="json"), **fit}
    if val_rows:
        summary["validation"] = evaluate(LearnedNer(weights), val_rows)
    summary["seconds"] = round(time.monotonic() - started, 1)
    return summary
