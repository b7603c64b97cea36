"""The model card (README.md) published with a tuned adapter: where its data came from,
what was anonymised and filtered, how it was trained, how well it did, what it is for."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fleetlm.tune.config import TuneConfig


def _table(rows: dict[str, dict[str, Any]]) -> str:
    if not rows:
        return "_not evaluated_\n"
    cols = sorted({k for r in rows.values() for k in r if k != "rows"})
    out = ["| model | rows | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for name, r in rows.items():
        vals = " | ".join(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                          for c in cols)
        out.append(f"| {name.replace('_', ' ')} | {r.get('rows', '-')} | {vals} |")
    return "\n".join(out) + "\n"


def model_card(cfg: TuneConfig, summary: dict[str, Any], labels: Sequence[str] | None,
               metrics: dict[str, dict[str, Any]]) -> str:
    st = summary.get("stages", {})
    prep, train = st.get("prepare", {}), st.get("train", {})
    t = cfg.train
    lines = [
        "---",
        f"base_model: {cfg.base_model}",
        "library_name: peft" if t.method == "lora" else "library_name: transformers",
        "tags: [fleetlm, lora]" if t.method == "lora" else "tags: [fleetlm]",
        "---",
        f"# {cfg.name}",
        "",
        f"{cfg.task.description or 'A ' + cfg.task.type + ' adapter'} — tuned with "
        f"`fleetlm tune` on `{cfg.base_model}`.",
        "",
        "## Intended use",
        "",
        cfg.publish.intended_use or f"{cfg.task.type.capitalize()} of inputs like the training "
        "data, prompted exactly as in training (see `fleetlm_task.json`).",
        "",
        "## Data",
        "",
        "- Source: " + ", ".join(f"`{p.name}`" for p in cfg.data.paths)
        + ("; validation " + ", ".join(f"`{p.name}`" for p in cfg.data.validation_paths)
           if cfg.data.validation_paths else
           f"; validation carved from it ({cfg.data.validation_fraction:.0%}, stratified)"),
        f"- Rows in: {prep.get('rows_in', '-')}; training rows: {prep.get('train_rows', '-')}; "
        f"validation rows: {prep.get('val_rows', '-')}",
        f"- Removed: {prep.get('exact_duplicates', 0)} exact and {prep.get('near_duplicates', 0)} "
        f"near duplicates, {prep.get('conflicting_labels', 0)} with conflicting labels, "
        f"{prep.get('dropped_empty', 0) + prep.get('dropped_too_short', 0) + prep.get('dropped_too_long', 0)} "
        f"empty or out of length bounds, {prep.get('val_leakage_removed', 0)} validation rows "
        "repeating training rows",
        "- Anonymised: " + (f"yes, Presidio placeholders (<PERSON_1>, ...) in "
                            f"{prep.get('anonymized_rows', 0)} rows" if cfg.prepare.anonymize
                            else "no"),
    ]
    if "filter" in st:
        f = st["filter"]
        lines.append(f"- Synthetic: {f.get('synthetic_in', 0)} rows from teacher "
                     f"`{cfg.synthesize.teacher.model if cfg.synthesize.teacher else '-'}`, "
                     f"{f.get('kept', 0)} kept by the filter "
                     f"({json.dumps({k: v for k, v in f.items() if k.startswith('dropped')})})")
    if labels is not None:
        lines.append(f"- Labels: {len(labels)}")
    lines += [
        "",
        "## Training",
        "",
        f"- Method: {t.method}" + (f", rank {t.rank}, alpha {t.alpha}, dropout {t.dropout}, "
                                  f"rsLoRA {t.use_rslora}, targets {', '.join(t.target_modules)}"
                                  + (", on an int8 base (QLoRA)" if t.quantize_base == "int8"
                                     else "")
                                  if t.method == "lora" else ""),
        f"- AdamW lr {t.learning_rate}, weight decay {t.weight_decay}, warm-up "
        f"{t.warmup_ratio:.0%} then cosine, batch {t.batch_size} x {t.grad_accum} accumulation, "
        f"bf16 autocast {t.bf16}, loss on answer tokens only",
        f"- Steps: {train.get('steps', '-')}, {train.get('train_tokens', '-')} tokens, "
        f"{train.get('tokens_per_s', 0):.0f} tokens/s; kept step "
        f"{train.get('best_step', '-')} by validation {train.get('early_stopping_metric', 'loss')}"
        f" (loss {train.get('best_val_loss', '-')}, greedy accuracy "
        f"{train.get('best_val_accuracy', '-')})"
        + (", stopped early" if train.get("stopped_early") else ""),
        "",
        "## Evaluation (validation split)",
        "",
        _table(metrics),
        "## Limitations",
        "",
        cfg.publish.limitations or "Trained on the data above only; inputs unlike it, other "
        "languages, or prompts formatted differently from `fleetlm_task.json` will do worse. "
        "A small model: check its answers where mistakes matter (or route them to a larger "
        "model).",
        "",
    ]
    return "\n".join(lines)
