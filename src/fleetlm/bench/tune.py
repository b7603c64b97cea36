"""``fleetlm bench tune``: the tuning pipeline's wall time and accuracy, and its training
loop's tokens/s against transformers' ``Trainer`` + peft on the same configuration.

1. ``fleetlm tune CONFIG`` end to end (stages already in the run folder are reused and
   reported as cached, with the seconds they took when they ran).
2. Throughput, on the same prepared rows (``steps x batch_size`` of them, each seen once):
   our loop (:func:`fleetlm.tune.train.train`) and ``Trainer`` with the same LoRA config,
   batch size, accumulation, learning-rate schedule, bf16, attention implementation and
   answer-only labels (prompt tokens set to -100, rows right-padded to the batch's longest).
   Tokens/s counts real (non-pad) tokens through forward + backward, from the end of the
   second optimizer step to the end of the last (warm-up excluded), for both.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fleetlm.bench.common import environment, write_json
from fleetlm.config import StrictModel


class TuneBenchConfig(StrictModel):
    config: Path
    steps: int = 30  # optimizer steps per throughput run
    skip_pipeline: bool = False
    skip_trainer: bool = False


def _rate(marks: list[tuple[float, int]]) -> float:
    """tokens/s between the second mark and the last; marks: (time, cumulative tokens)."""
    if len(marks) < 3:
        (t0, k0), (t1, k1) = (0.0, 0), marks[-1]
    else:
        (t0, k0), (t1, k1) = marks[1], marks[-1]
    return (k1 - k0) / max(1e-9, t1 - t0)


def ours(cfg: Any, enc: list[Any], pad: int, base: Path, steps: int, out: Path) -> dict[str, Any]:
    import torch

    from fleetlm.tune.train import build_model, train

    tcfg = cfg.train.model_copy(update={"max_steps": steps, "eval_every": 10**9,
                                        "save_every": 10**9})
    torch.manual_seed(cfg.train.seed)
    model = build_model(base, tcfg)
    marks: list[tuple[float, int]] = []
    res = train(model, enc, [], tcfg, out, pad_id=pad,
                on_step=lambda e: marks.append((time.perf_counter(), e["tokens"]))
                if "loss" in e else None)
    return {"system": "fleetlm loop", "steps": res.steps, "tokens": res.train_tokens,
            "tokens_per_s": _rate(marks),
            "final_loss": next(h["loss"] for h in reversed(res.history) if "loss" in h)}


def trainer(cfg: Any, enc: list[Any], pad: int, base: Path, steps: int, out: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    t = cfg.train
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                 attn_implementation=t.attention)
    peft_model = get_peft_model(model, LoraConfig(
        r=t.rank, lora_alpha=t.alpha, lora_dropout=t.dropout,  # type: ignore[arg-type]
        use_rslora=t.use_rslora,
        target_modules=list(t.target_modules), bias="none", task_type="CAUSAL_LM"))
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
             "labels": [-100] * e.answer_start + e.input_ids[e.answer_start:]} for e in enc]
    seen = [0]

    def collate(features: list[dict[str, list[int]]]) -> dict[str, Any]:
        """Right-pad to the batch's longest row (what DataCollatorForSeq2Seq does), and
        count the real tokens."""
        width = max(len(f["input_ids"]) for f in features)
        batch = {key: torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features])
                 for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", -100))}
        seen[0] += int(batch["attention_mask"].sum())
        return batch

    marks: list[tuple[float, int]] = []

    class Mark(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marks.append((time.perf_counter(), seen[0]))

    class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, list[int]]:
            return rows[i]

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, warmup_steps=int(t.warmup_ratio * steps),
        lr_scheduler_type="cosine", max_grad_norm=1.0,
        max_steps=steps, bf16=t.bf16, use_cpu=True, logging_steps=max(1, steps // 5),
        save_strategy="no", report_to=[], dataloader_num_workers=0, seed=t.seed,
        remove_unused_columns=False, disable_tqdm=True)
    tr = Trainer(model=peft_model, args=args, train_dataset=Rows(), data_collator=collate,
                 callbacks=[Mark()])
    out_metrics = tr.train()
    return {"system": "transformers Trainer + peft", "steps": out_metrics.global_step,
            "tokens": seen[0], "tokens_per_s": _rate(marks),
            "final_loss": next((h["loss"] for h in reversed(tr.state.log_history) if "loss" in h),
                               None)}


def run(cfg: TuneBenchConfig, out: Path | None) -> dict[str, Any]:
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from fleetlm.models.loader import load_tokenizer, resolve_source
    from fleetlm.tune.config import load_config
    from fleetlm.tune.format import encode
    from fleetlm.tune.pipeline import Pipeline
    from fleetlm.tune.records import read_jsonl

    console = Console(stderr=True)
    tcfg = load_config(cfg.config)
    results: dict[str, Any] = {"config": {**cfg.model_dump(), "config": str(cfg.config)},
                               "tune_config": json.loads(tcfg.model_dump_json()),
                               "environment": environment()}
    # a benchmark re-run replaces the adapter its previous run published
    tcfg = tcfg.model_copy(update={"publish": tcfg.publish.model_copy(update={"overwrite": True})})
    pipe = Pipeline(tcfg)
    if not cfg.skip_pipeline:
        t0 = time.perf_counter()
        res = pipe.run()
        st = res.summary["stages"]
        results["pipeline"] = {
            "wall_s_this_run": time.perf_counter() - t0,
            "cached_stages": [k for k, v in st.items() if v.get("cached")],
            "prepare_s": st["prepare"].get("seconds"),
            "train_s": st["train"].get("train_seconds"), "train_steps": st["train"].get("steps"),
            "train_tokens_per_s": st["train"].get("tokens_per_s"),
            "metrics": res.summary.get("metrics", {})}
    # throughput on the prepared rows
    prep = sorted((pipe.run_dir / "stages").glob("prepare-*/done.json"),
                  key=lambda p: p.stat().st_mtime)
    if not prep:
        pipe.run_dir.mkdir(parents=True, exist_ok=True)
        pipe.prepare()
        prep = sorted((pipe.run_dir / "stages").glob("prepare-*/done.json"))
    rows = read_jsonl(prep[-1].parent / "train.jsonl")
    base = resolve_source(tcfg.base_model)
    tok = load_tokenizer(base)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n = cfg.steps * tcfg.train.batch_size * tcfg.train.grad_accum
    enc = [encode(tok, r, tcfg.task) for r in rows[:n]]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        console.print(f"throughput: our loop, {cfg.steps} steps")
        runs.append(ours(tcfg, enc, pad, base, cfg.steps, Path(tmp) / "ours"))
        if not cfg.skip_trainer:
            console.print(f"throughput: transformers Trainer + peft, {cfg.steps} steps")
            runs.append(trainer(tcfg, enc, pad, base, cfg.steps, Path(tmp) / "trainer"))
    results["throughput"] = runs
    if len(runs) == 2:
        results["ratio"] = {"fleetlm / Trainer tokens/s (target >= 1.0, aim 1.5)":
                            runs[0]["tokens_per_s"] / runs[1]["tokens_per_s"]}
    t = Table(title=f"fleetlm bench tune ({tcfg.name})")
    for col in ("system", "steps", "tokens", "tokens/s", "final loss"):
        t.add_column(col)
    for r in runs:
        t.add_row(r["system"], str(r["steps"]), str(r["tokens"]), f"{r['tokens_per_s']:.1f}",
                  f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-")
    console.print(t)
    if "pipeline" in results:
        p = results["pipeline"]
        console.print(f"pipeline: {p['wall_s_this_run']:.0f} s this run (cached: "
                      f"{', '.join(p['cached_stages']) or 'none'}); training "
                      f"{p['train_s']:.0f} s at {p['train_tokens_per_s']:.0f} tokens/s")
        for name, m in p["metrics"].items():
            console.print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()
                                                   if isinstance(v, float)))
    for k, v in results.get("ratio", {}).items():
        console.print(f"  {k}: {v:.3f}")
    write_json(results, out)
    return results
