"""``fleetlm distill``: logit-level knowledge distillation from a teacher into a student.

    result = distill(DistillSettings(teacher="exported/banking77/hf", student="pruned/",
                                     data=Path("rows.jsonl"), out=Path("distilled")))

The student (any model with the teacher's tokenizer: a pruned copy, a smaller base) is
trained on every token of the data to match the teacher's next-token distribution:
``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over tokens, plus
``ce_weight`` times the ordinary cross-entropy on the data's own next tokens. All of the
student's weights train (float32, AdamW, warm-up then cosine). The teacher runs in
inference mode.

Data, one example per row:

- ``.txt``: one example per line;
- ``.jsonl``: ``{"text": ...}``, ``{"messages": [...]}`` (rendered with the tokenizer's
  chat template), ``{"prompt": "...", "completion": "..."}``, or ``{"prompt": [messages],
  "answer": "..."}`` (the rows of a ``fleetlm tune`` run's prepare stage).

The last ``eval_rows`` rows are held out. The KL to the teacher and the greedy (top-1)
agreement on them are measured before and after, and ``out/distill.json`` records them.
The student is written to ``out`` as a Hugging Face folder, under a temporary name, then
renamed into place.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from fleetlm.config import StrictModel
from fleetlm.errors import ConfigError


class DistillSettings(StrictModel):
    teacher: str  # embedded name, HF folder or .gguf file
    student: str
    data: Path
    out: Path
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    max_len: int = Field(128, ge=8)  # tokens per row (longer rows are cut)
    learning_rate: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    temperature: float = Field(2.0, gt=0)
    ce_weight: float = Field(0.0, ge=0)
    eval_rows: int = Field(64, ge=1)
    seed: int = 0
    bf16: bool = True  # bfloat16 autocast for both models' forwards (the losses in float32)


def read_rows(path: Path, tokenizer: Any, max_len: int) -> list[list[int]]:
    """Token ids of every row of ``path`` (see the module), cut at ``max_len``; rows of
    fewer than 2 tokens are dropped (nothing to predict)."""
    if not path.is_file():
        raise ConfigError(f"data: {path} does not exist; give a .txt or .jsonl file",
                          param="data")
    texts: list[str] = []
    if path.suffix == ".txt":
        texts = [line for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data: {path}:{n} is not JSON ({e})", param="data") from e
            texts.append(_row_text(row, tokenizer, f"{path}:{n}"))
    else:
        raise ConfigError(f"data: {path} must be .txt (a row per line) or .jsonl",
                          param="data")
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_len] for t in texts]
    return [r for r in rows if len(r) >= 2]


def _row_text(row: Any, tokenizer: Any, where: str) -> str:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return str(row["text"])
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return str(tokenizer.apply_chat_template(row["messages"], tokenize=False))
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(
            row.get("completion"), str):
        return str(row["prompt"]) + str(row["completion"])
    if isinstance(row, dict) and isinstance(row.get("prompt"), list) and isinstance(
            row.get("answer"), str):  # a fleetlm tune prepared row: chat prompt, answer
        messages = [*row["prompt"], {"role": "assistant", "content": row["answer"]}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False))
    raise ConfigError(f"data: {where} has none of text, messages, prompt with completion, or "
                      "prompt messages with answer", param="data")


def _batch(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` at temperature ``T``, averaged over the positions
    where ``mask`` is 1 ([B, S] logits over the vocabulary)."""
    t = temperature
    logp_s = torch.log_softmax(student_logits.float() / t, dim=-1)
    logp_t = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # [B, S]
    m = mask.float()
    return (t * t) * (kl * m).sum() / m.sum().clamp_min(1)


def _measure(student: Any, teacher: Any, rows: list[list[int]], pad: int, bs: int
             ) -> dict[str, float]:
    """KL(teacher || student) at temperature 1 and top-1 agreement, over every predicted
    position of ``rows``."""
    kl_sum, agree, n = 0.0, 0, 0
    with torch.inference_mode():
        for k in range(0, len(rows), bs):
            ids, mask = _batch(rows[k:k + bs], pad)
            s = student(input_ids=ids, attention_mask=mask).logits
            t = teacher(input_ids=ids, attention_mask=mask).logits
            m = mask.bool()
            kl_sum += float(kd_loss(s, t, mask, 1.0)) * int(m.sum())  # the mean, times tokens
            agree += int((s.argmax(-1) == t.argmax(-1))[m].sum())
            n += int(m.sum())
    return {"kl": kl_sum / max(1, n), "top1_agreement": agree / max(1, n), "tokens": n}


def load_hf(spec: str) -> tuple[Any, Any, Path]:
    """(model in float32 with eager attention, its tokenizer or None, its folder) for an
    embedded name, Hugging Face folder or .gguf file: what distill and prune work on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fleetlm.models.loader import resolve_source

    folder = resolve_source(spec)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        tok = None
    return model, tok, folder


def distill(s: DistillSettings, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the student on the teacher's logits (see the module); the summary."""
    from fleetlm.compress.merge import write_hf_folder

    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    teacher, ttok, _ = load_hf(s.teacher)
    student, stok, sfolder = load_hf(s.student)
    tok = stok or ttok
    if tok is None:
        raise ConfigError("neither the teacher nor the student folder has a tokenizer",
                          param="student")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ConfigError(f"the teacher's vocabulary ({teacher.config.vocab_size} tokens) is "
                          f"not the student's ({student.config.vocab_size}): logit-level "
                          "distillation needs the same tokenizer", param="student")
    teacher.eval()
    rows = read_rows(s.data, tok, s.max_len)
    if len(rows) <= s.eval_rows:
        raise ConfigError(f"data: {len(rows)} usable rows, but eval_rows holds out "
                          f"{s.eval_rows}; give more rows or lower --eval-rows", param="data")
    rng = random.Random(s.seed)
    rng.shuffle(rows)
    train, held = rows[:-s.eval_rows], rows[-s.eval_rows:]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    student.eval()
    before = _measure(student, teacher, held, pad, s.batch_size)
    say(f"before: KL to the teacher {before['kl']:.4f}, top-1 agreement "
        f"{before['top1_agreement']:.3f} on {before['tokens']} held-out tokens")
    losses = _train(student, teacher, train, pad, s)
    student.eval()
    after = _measure(student, teacher, held, pad, s.batch_size)
    say(f"after:  KL to the teacher {after['kl']:.4f}, top-1 agreement "
        f"{after['top1_agreement']:.3f}")
    state = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    summary = {"teacher": s.teacher, "student": s.student, "train_rows": len(train),
               "held_out_rows": len(held), "steps": s.steps, "before": before,
               "after": after, "first_loss": losses[0], "last_loss": losses[-1],
               "seconds": round(time.perf_counter() - t0, 2)}
    write_hf_folder(sfolder, state, s.out, {"distilled_from": s.teacher, **summary})
    (s.out / "distill.json").write_text(json.dumps(summary, indent=2))
    return summary


def _train(student: Any, teacher: Any, rows: list[list[int]], pad: int,
           s: DistillSettings) -> list[float]:
    from fleetlm.progress import Progress

    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=s.learning_rate)
    warm = int(s.steps * s.warmup_ratio)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / max(1, warm)
        frac = (step - warm) / max(1, s.steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(s.seed + 1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16)
    losses: list[float] = []
    with Progress("distill") as p:
        update = p.task("train", s.steps)
        for step in range(s.steps):
            ids, mask = _batch(rng.sample(rows, min(s.batch_size, len(rows))), pad)
            with torch.inference_mode(), autocast:
                t_logits = teacher(input_ids=ids, attention_mask=mask).logits
            with autocast:
                out = student(input_ids=ids, attention_mask=mask)
            loss = kd_loss(out.logits, t_logits.clone(), mask, s.temperature)
            if s.ce_weight > 0:
                logits = out.logits[:, :-1].float()
                target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                loss = loss + s.ce_weight * torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            update(step + 1, info=f"loss {losses[-1]:.4f}")
    return losses
