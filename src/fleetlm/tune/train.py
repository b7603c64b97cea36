"""LoRA (or full) fine-tuning of a Llama-family base: our own loop over transformers + peft.

Why not ``transformers.Trainer``: the loss is taken on the answer tokens only, so this
loop runs the LM head on those positions alone (for a classifier, 2-5 of ~40 tokens per
row; the head is 28 M of SmolLM2-135M's 135 M parameters), and it batches rows of
similar length together so little compute goes to padding. ``fleetlm bench tune``
measures the difference against Trainer on the same configuration.

What it does: AdamW, linear warm-up then cosine decay, gradient accumulation, bfloat16
autocast (CPU or GPU), validation every ``eval_every`` optimizer steps (the answer
tokens' loss, and the share of rows greedy decoding answers exactly, from the same
forward) with early stopping and the best adapter kept -- by accuracy for a classifier,
by loss otherwise -- and a checkpoint every ``save_every`` steps from
which ``resume=True`` continues exactly (same data order, optimizer and schedule).
Checkpoints are written to a temporary name and renamed, so a crash never leaves a
half-written one; they hold tensors and plain Python values only and are read back with
torch's weights-only unpickler, so a crafted checkpoint cannot run code.

This module knows tensors, peft and the optimizer; rows arrive already encoded
(:mod:`fleetlm.tune.format`) and it knows nothing of the data's origin or of evaluation.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fleetlm.errors import ConfigError
from fleetlm.tune.config import TrainConfig
from fleetlm.tune.format import Encoded

CHECKPOINT = "checkpoint"  # run's checkpoint folder (last state)
BEST = "best"  # best adapter by the validation metric
FINAL = "adapter"  # what the stage hands on: the best (or last) adapter / model


@dataclass
class Batch:
    input_ids: Tensor  # [B, S] right-padded
    attention_mask: Tensor  # [B, S]
    rows: Tensor  # [N] batch row of each answer token
    positions: Tensor  # [N] position whose hidden state predicts it (token position - 1)
    targets: Tensor  # [N] the answer token ids
    tokens: int  # real (non-pad) tokens in the batch


@dataclass
class TrainResult:
    output_dir: Path  # the adapter folder (lora) or model folder (full)
    steps: int
    micro_batches: int
    train_tokens: int  # real tokens through forward + backward
    train_seconds: float
    best_val_loss: float | None  # the kept adapter's validation loss
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_accuracy: float | None = None  # the kept adapter's validation accuracy
    best_step: int | None = None  # the step the kept adapter comes from
    metric: str = "loss"  # what chose it (TrainConfig.early_stopping_metric, resolved)

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def collate(items: Sequence[Encoded], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    rows, pos, tgt = [], [], []
    for b, e in enumerate(items):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        mask[b, :n] = 1
        for p in range(max(e.answer_start, 1), n):
            rows.append(b)
            pos.append(p - 1)
            tgt.append(e.input_ids[p])
    return Batch(ids, mask, torch.tensor(rows), torch.tensor(pos), torch.tensor(tgt),
                 int(mask.sum()))


def spread(rows: Sequence[Encoded], n: int) -> list[Encoded]:
    """``n`` rows evenly spaced over ``rows`` (all of them if there are no more): data
    files are often sorted by label, and the first ``n`` rows would hold only a few labels."""
    if len(rows) <= n:
        return list(rows)
    return [rows[i * len(rows) // n] for i in range(n)]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of rows of similar length: shuffle, cut into windows of 50 batches,
    sort each window by length, cut it into batches, shuffle the batches."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def answer_logits(model: Any, batch: Batch) -> Tensor:
    """[N, V] float32 logits at the batch's answer positions. The LM head runs on the
    answer positions only."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal.model(input_ids=batch.input_ids,
                          attention_mask=batch.attention_mask).last_hidden_state  # [B, S, H]
    picked = hidden[batch.rows, batch.positions]  # [N, H]
    return causal.lm_head(picked).float()  # type: ignore[no-any-return]


def answer_loss(model: Any, batch: Batch) -> tuple[Tensor, int]:
    """Sum of the cross-entropy over the batch's answer tokens, and their count."""
    logits = answer_logits(model, batch)
    loss = torch.nn.functional.cross_entropy(logits, batch.targets, reduction="sum")
    return loss, int(batch.targets.numel())


def rows_exact(logits: Tensor, batch: Batch) -> Tensor:
    """[B] bool: every answer token of the row (its end token included) is the argmax of
    its logits. Under teacher forcing that is exactly "greedy decoding writes this
    answer": each greedy step sees the right prefix and picks the right token."""
    wrong = (logits.argmax(-1) != batch.targets).to(torch.long)
    per_row = torch.zeros(batch.input_ids.shape[0], dtype=torch.long,
                          device=wrong.device).index_add_(0, batch.rows, wrong)
    return per_row == 0


@dataclass
class Validation:
    loss: float  # mean cross-entropy per answer token
    accuracy: float  # share of rows answered exactly by greedy decoding (rows_exact)

    def better_than(self, other: Validation | None, metric: str) -> bool:
        if other is None:
            return True
        if metric == "accuracy":
            return (self.accuracy, -self.loss) > (other.accuracy, -other.loss)
        return self.loss < other.loss


def build_model(base_folder: Path, cfg: TrainConfig) -> Any:
    """The model to train. Full: float32 weights (the optimizer's master copy). LoRA with
    ``bf16``: the frozen base in bfloat16, so autocast does not cast every weight on every
    forward (measured 13% of a step), and the adapter in float32. ``attention: eager`` (the
    default) because torch's CPU flash-attention backward took a quarter of a step on
    the short rows of fine-tuning data (measured: eager 1.16x faster per step)."""
    from transformers import AutoModelForCausalLM

    frozen_bf16 = cfg.method == "lora" and cfg.bf16
    extra = {"quantization_config": int8_base_config()} if cfg.quantize_base == "int8" else {}
    model = AutoModelForCausalLM.from_pretrained(
        base_folder, dtype=torch.bfloat16 if frozen_bf16 else torch.float32,
        attn_implementation=cfg.attention, **extra)
    model.config.use_cache = False
    if cfg.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in present]
    if missing:
        raise ConfigError(f"train.target_modules: {missing} are not modules of the base model "
                          f"(it has e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                          f"down_proj)")
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # float is fine
                      lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), use_rslora=cfg.use_rslora,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg, autocast_adapter_dtype=True)  # adapter in float32


def int8_base_config() -> Any:
    """QLoRA's frozen base, as transformers loads it: every linear layer but the head as
    torchao's weight-only int8 (a scale per output row; the embedding is not a linear layer
    and stays as loaded). PEFT wraps those layers with its torchao LoRA layer, and can merge
    into them because transformers recorded how they were quantised."""
    import logging

    # torchao logs every optional native library it cannot load (GPU kernels) at import,
    # and torch a deprecation of how it registers an enum
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as e:
        raise ConfigError("train.quantize_base: int8 needs torchao (pip install "
                          "torchao==0.18.0; make install does this)") from e
    from transformers import TorchAoConfig

    return TorchAoConfig(quant_type=Int8WeightOnlyConfig(), modules_to_not_convert=["lm_head"])


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        frac = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return f


def _autocast(cfg: TrainConfig, device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)


def _save_output(model: Any, folder: Path, tokenizer: Any | None = None) -> None:
    """Write the adapter (lora) or the whole model (full) atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None and not hasattr(model, "get_base_model"):
        tokenizer.save_pretrained(tmp)  # a full fine-tune is a servable model folder
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _trainable_state(model: Any) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: Any, state: dict[str, Tensor]) -> None:
    """Copy a :func:`_trainable_state` back into ``model``."""
    with torch.no_grad():
        named = dict(model.named_parameters())
        for n, t in state.items():
            named[n].copy_(t)


def evaluate(model: Any, encoded: Sequence[Encoded], cfg: TrainConfig, pad_id: int,
             device: torch.device) -> Validation:
    """Mean cross-entropy per answer token over ``encoded``, and the share of rows whose
    answer greedy decoding writes exactly (one forward per batch gives both)."""
    was = model.training
    model.eval()
    total, count, exact = 0.0, 0, 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    with torch.no_grad(), _autocast(cfg, device):
        for k in range(0, len(order), cfg.batch_size):
            b = _to(collate([encoded[i] for i in order[k:k + cfg.batch_size]], pad_id), device)
            logits = answer_logits(model, b)
            total += float(torch.nn.functional.cross_entropy(logits, b.targets, reduction="sum"))
            count += int(b.targets.numel())
            exact += int(rows_exact(logits, b).sum())
    model.train(was)
    return Validation(total / max(1, count), exact / max(1, len(encoded)))


def _to(b: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return b
    return Batch(b.input_ids.to(device), b.attention_mask.to(device), b.rows.to(device),
                 b.positions.to(device), b.targets.to(device), b.tokens)


def _optimizer(model: Any, cfg: TrainConfig, total: int, warmup: int
               ) -> tuple[list[Tensor], torch.optim.Optimizer, Any]:
    """AdamW (no weight decay on biases and norms) and its warm-up + cosine schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, warmup))
    return params, opt, sched


def _restore(ckpt: Path, model: Any, opt: torch.optim.Optimizer, sched: Any, total: int,
             num_rows: int) -> dict[str, Any]:
    """Load the checkpoint in ``ckpt`` into model, optimizer, schedule and RNG; the loop
    state it was saved with."""
    saved = load_state(ckpt / "state.pt")
    if saved["total"] != total or saved["num_rows"] != num_rows:
        raise ConfigError(f"--resume: the checkpoint in {ckpt} is for another run "
                          f"({saved['num_rows']} rows, {saved['total']} steps; now "
                          f"{num_rows} rows, {total} steps); run without --resume")
    _load_trainable(model, saved["trainable"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    return dict(saved["loop"])


def load_state(path: Path) -> dict[str, Any]:
    """A ``state.pt`` written by :func:`_save_state`: tensors, numbers, strings, None and
    lists/dicts of them, read with torch's weights-only unpickler, so a crafted file is
    refused instead of running code (a checkpoint folder may come from anywhere)."""
    try:
        saved = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message ends with the reason ("Unsupported global: GLOBAL io.open ...")
        # after advice to load the file unsafely, which is not ours to give
        found = re.search(r"WeightsUnpickler error: (.+?)\.(?:\s|$)", str(e))
        why = found.group(1) if found else type(e).__name__
        raise ConfigError(f"--resume: {path} holds objects other than tensors and plain Python "
                          f"values, so it was not loaded (unpickling it could run code: {why}); "
                          f"delete {path.parent} and run without --resume") from e
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} is not a fleetlm checkpoint (it holds a "
                          f"{type(saved).__name__}); delete {path.parent} and run without --resume")
    return saved


def _save_state(folder: Path, payload: dict[str, Any]) -> None:
    """``folder/state.pt``, written under a temporary name and renamed."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(payload, tmp / "state.pt")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _optimizer_step(model: Any, pending: Sequence[Batch], params: list[Tensor],
                    opt: torch.optim.Optimizer, sched: Any, cfg: TrainConfig,
                    dev: torch.device) -> tuple[float, int, int]:
    """One optimizer step over the micro-batches ``pending``: (summed answer-token loss,
    answer tokens, real tokens)."""
    loss_sum, count, tokens = 0.0, 0, 0
    n_answer = sum(int(b.targets.numel()) for b in pending)
    for b in pending:  # the loss is the mean over all answer tokens of the step
        with _autocast(cfg, dev):
            loss, _ = answer_loss(model, b)
        (loss / max(1, n_answer)).backward()
        loss_sum += float(loss.detach())
        count += int(b.targets.numel())
        tokens += b.tokens
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, count, tokens


def train(model: Any, train_rows: Sequence[Encoded], val_rows: Sequence[Encoded],
          cfg: TrainConfig, out_dir: Path, *, pad_id: int, tokenizer: Any | None = None,
          resume: bool = False, device: str = "cpu", classification: bool = False,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``model`` in place; the adapter (or model) ends up in ``out_dir / FINAL``.

    ``on_step`` gets a dict after every optimizer step (step, total, loss, lr, tokens/s)
    and after every validation (val_loss, val_accuracy) -- the caller draws progress from
    it. ``classification`` makes ``early_stopping_metric: auto`` mean accuracy."""
    if not train_rows:
        raise ConfigError("train: no training rows left (see the prepare and filter reports)")
    dev = torch.device(device)
    model.to(dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    lengths = [len(e.input_ids) for e in train_rows]
    batches_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_ratio * total)
    params, opt, sched = _optimizer(model, cfg, total, warmup)
    val_eval = spread(val_rows, cfg.eval_loss_rows)

    metric = cfg.early_stopping_metric
    if metric == "auto":
        metric = "accuracy" if classification else "loss"
    state: dict[str, Any] = {"step": 0, "micro": 0, "tokens": 0, "seconds": 0.0,
                             "best_val_loss": None, "best_val_accuracy": None,
                             "best_step": None, "bad_evals": 0, "history": []}
    ckpt = out_dir / CHECKPOINT
    if resume and (ckpt / "state.pt").is_file():
        state = _restore(ckpt, model, opt, sched, total, len(train_rows))
    best_state = None
    if (out_dir / BEST / "state.pt").is_file() and resume:
        best_state = load_state(out_dir / BEST / "state.pt")

    def save_checkpoint() -> None:
        _save_state(ckpt, {"trainable": _trainable_state(model), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                           "loop": state, "total": total, "num_rows": len(train_rows)})

    def validate() -> bool:
        """Record a validation; True when training should stop early."""
        nonlocal best_state
        if not val_eval:
            return False
        v = evaluate(model, val_eval, cfg, pad_id, dev)
        entry = {"step": state["step"], "val_loss": v.loss, "val_accuracy": v.accuracy}
        state["history"].append(entry)
        best = (None if state["best_val_loss"] is None else
                Validation(state["best_val_loss"], state.get("best_val_accuracy") or 0.0))
        improved = v.better_than(best, metric)
        if on_step:
            on_step({**entry, "total": total, "best": improved, "metric": metric})
        if improved:
            state["best_val_loss"], state["best_val_accuracy"] = v.loss, v.accuracy
            state["best_step"], state["bad_evals"] = state["step"], 0
            best_state = {"trainable": _trainable_state(model), "step": state["step"]}
            _save_state(out_dir / BEST, best_state)
            return False
        state["bad_evals"] += 1
        return 0 < cfg.early_stopping_patience <= state["bad_evals"]

    model.train()
    stopped_early = False
    pending: list[Batch] = []
    while state["step"] < total and not stopped_early:
        epoch, offset = divmod(state["micro"], batches_per_epoch)
        order = length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch)
        for idx in order[offset:]:
            pending.append(_to(collate([train_rows[i] for i in idx], pad_id), dev))
            state["micro"] += 1
            if len(pending) < cfg.grad_accum and state["micro"] % batches_per_epoch != 0:
                continue
            t0 = time.perf_counter()
            accum_loss, accum_count, accum_tokens = _optimizer_step(model, pending, params, opt,
                                                                    sched, cfg, dev)
            state["seconds"] += time.perf_counter() - t0
            state["tokens"] += accum_tokens
            state["step"] += 1
            pending = []
            entry = {"step": state["step"], "loss": accum_loss / max(1, accum_count),
                     "lr": sched.get_last_lr()[0], "tokens": state["tokens"],
                     "tokens_per_s": state["tokens"] / max(1e-9, state["seconds"])}
            state["history"].append(entry)
            if on_step:
                on_step({**entry, "total": total})
            if state["step"] % cfg.eval_every == 0 or state["step"] == total:
                stopped_early = validate()
            if state["step"] % cfg.save_every == 0 or state["step"] == total or stopped_early:
                save_checkpoint()
            if state["step"] >= total or stopped_early:
                break

    if best_state is not None:  # hand on the best adapter by the validation metric
        _load_trainable(model, best_state["trainable"])
    final = out_dir / FINAL
    _save_output(model, final, tokenizer)
    (out_dir / "history.json").write_text(json.dumps(state["history"], indent=1))
    return TrainResult(final, state["step"], state["micro"], state["tokens"], state["seconds"],
                       state["best_val_loss"], stopped_early, state["history"],
                       state.get("best_val_accuracy"), state.get("best_step"), metric)
