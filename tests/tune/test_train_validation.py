"""Validation inside the training loop: the greedy accuracy taken from the loss's forward
is what greedy decoding answers, and early stopping keeps the adapter its metric chose."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fleetlm.tune.config import TrainConfig
from fleetlm.tune.format import Encoded
from fleetlm.tune.train import Validation, build_model, collate, evaluate, train

PROMPTS = [[5, 17, 9, 33, 2], [8, 8, 41, 12], [60, 3, 27, 19, 44, 7], [11, 29]]


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding, one full forward per token (the reference)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_greedy_accuracy_is_what_greedy_decoding_answers(tiny_base: Path) -> None:
    cfg = TrainConfig(rank=2, alpha=4, bf16=False, batch_size=3)
    model = build_model(tiny_base, cfg).eval()
    rows, expected = [], []
    for prompt in PROMPTS:
        answer = _greedy(model, prompt, 3)
        rows.append(Encoded(prompt + answer, len(prompt)))  # the greedy answer: exact
        expected.append(True)
        wrong = answer[:-1] + [(answer[-1] + 1) % 64]  # its last token changed
        rows.append(Encoded(prompt + wrong, len(prompt)))
        expected.append(False)
        first = [(answer[0] + 1) % 64] + answer[1:]  # its first token changed
        rows.append(Encoded(prompt + first, len(prompt)))
        expected.append(False)
    v = evaluate(model, rows, cfg, pad_id=0, device=torch.device("cpu"))
    assert v.accuracy == pytest.approx(sum(expected) / len(rows))
    # row by row: padding in a batch changes nothing
    for row, want in zip(rows, expected, strict=True):
        assert evaluate(model, [row], cfg, 0, torch.device("cpu")).accuracy == float(want)
    # the loss is the mean cross-entropy of the answer tokens, as before
    b = collate(rows, 0)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    ce = torch.nn.functional.cross_entropy(logits[b.rows, b.positions].float(), b.targets)
    assert v.loss == pytest.approx(float(ce), rel=1e-4)


def test_better_than_by_metric() -> None:
    a, b = Validation(0.5, 0.80), Validation(0.4, 0.78)
    assert a.better_than(b, "accuracy") and not b.better_than(a, "accuracy")
    assert b.better_than(a, "loss") and not a.better_than(b, "loss")
    tie = Validation(0.45, 0.80)
    assert tie.better_than(a, "accuracy")  # same accuracy, lower loss
    assert a.better_than(None, "loss")


# accuracy peaks at the 3rd validation while the loss keeps falling
SCRIPT = [Validation(1.0, 0.50), Validation(0.8, 0.70), Validation(0.7, 0.90),
          Validation(0.6, 0.85), Validation(0.5, 0.80), Validation(0.4, 0.80),
          Validation(0.3, 0.75), Validation(0.2, 0.70)]


@pytest.mark.parametrize(("classification", "metric", "best_step", "steps", "early"), [
    (True, "auto", 3, 5, True),   # accuracy: kept step 3, stopped after 2 worse validations
    (False, "auto", 8, 8, False),  # loss: always improving, runs to the end
    (False, "accuracy", 3, 5, True),
    (True, "loss", 8, 8, False),
])
def test_early_stopping_keeps_the_adapter_its_metric_chose(
        tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch,
        classification: bool, metric: str, best_step: int, steps: int, early: bool) -> None:
    import fleetlm.tune.train as train_mod

    script = iter(SCRIPT)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    model = build_model(tiny_base, TrainConfig(rank=2, alpha=4, bf16=False))

    def scripted(m, encoded, cfg, pad_id, device):  # noqa: ANN001
        step = len(snapshots) + 1
        snapshots[step] = {n: p.detach().clone() for n, p in m.named_parameters()
                           if p.requires_grad}
        return next(script)

    monkeypatch.setattr(train_mod, "evaluate", scripted)
    cfg = TrainConfig(rank=2, alpha=4, max_steps=8, batch_size=2, bf16=False, warmup_ratio=0.0,
                      eval_every=1, save_every=100, early_stopping_patience=2,
                      early_stopping_metric=metric, learning_rate=1e-2)
    rows = [Encoded([1, 2, 3, 4, 5, 6], 3), Encoded([7, 8, 9, 10], 2)] * 4
    res = train(model, rows, rows[:2], cfg, tmp_path / "run", pad_id=0,
                classification=classification)
    assert (res.best_step, res.steps, res.stopped_early) == (best_step, steps, early)
    assert res.metric == ("accuracy" if (metric == "auto" and classification)
                          or metric == "accuracy" else "loss")
    assert (res.best_val_loss, res.best_val_accuracy) == (SCRIPT[best_step - 1].loss,
                                                          SCRIPT[best_step - 1].accuracy)
    # the model handed on holds the kept step's weights, not the last step's
    kept = snapshots[best_step]
    for n, p in model.named_parameters():
        if n in kept:
            assert torch.equal(p.detach(), kept[n]), n
    vals = [h for h in res.history if "val_loss" in h]
    assert [h["val_accuracy"] for h in vals] == [v.accuracy for v in SCRIPT[:steps]]


def test_validation_rows_are_spread_over_a_label_sorted_split() -> None:
    from fleetlm.tune.train import spread

    rows = [Encoded([label, k], 1) for label in range(10) for k in range(20)]  # sorted by label
    picked = spread(rows, 30)
    assert len(picked) == 30 and {r.input_ids[0] for r in picked} == set(range(10))
    assert spread(rows[:5], 30) == rows[:5]
