"""fleetlm distill: a student trained on a teacher's logits gets closer to it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fleetlm.compress.distill import DistillSettings, distill, kd_loss


def _student(teacher: Path, folder: Path, layers: int = 1) -> Path:
    """A smaller random model with the teacher's config and tokenizer files."""
    import shutil

    import transformers

    cfg = transformers.AutoConfig.from_pretrained(teacher)
    cfg.num_hidden_layers = layers
    torch.manual_seed(7)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in teacher.glob("tokenizer*"):
        shutil.copy2(f, folder / f.name)
    return folder


def _data(path: Path, n: int = 160) -> Path:
    rng = random.Random(0)
    words = "refund my card please order hello world the quick brown fox jumps".split()
    path.write_text("\n".join(" ".join(rng.choices(words, k=rng.randint(4, 12)))
                              for _ in range(n)) + "\n")
    return path


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    a = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.long)
    assert float(kd_loss(a, a, mask, 2.0)) == pytest.approx(0.0, abs=1e-6)
    b = a + torch.randn_like(a)
    assert float(kd_loss(b, a, mask, 2.0)) > 0.01
    # masked positions do not count
    mask[:, 3:] = 0
    c = a.clone()
    c[:, 3:] += 5.0
    assert float(kd_loss(c, a, mask, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_lowers_the_kl_to_the_teacher(small_base: Path, tmp_path: Path) -> None:
    student = _student(small_base, tmp_path / "student")
    summary = distill(DistillSettings(teacher=str(small_base), student=str(student),
                                      data=_data(tmp_path / "rows.txt"), out=tmp_path / "out",
                                      steps=60, batch_size=8, learning_rate=5e-3,
                                      eval_rows=32, temperature=1.0), say=lambda m: None)
    before, after = summary["before"], summary["after"]
    assert after["kl"] < 0.6 * before["kl"], (before, after)
    assert after["top1_agreement"] > before["top1_agreement"]
    assert summary["last_loss"] < summary["first_loss"]
    # the student is a model folder fleetlm serves, and distill.json says what happened
    from fleetlm.models.loader import load_model

    lm = load_model(str(tmp_path / "out"), dtype="float32", quantize="none")
    assert lm.config.num_layers == 1
    assert json.loads((tmp_path / "out" / "distill.json").read_text())["after"] == after


def test_distill_refusals_name_the_fix(small_base: Path, tmp_path: Path,
                                       tiny_checkpoints: dict[str, Path]) -> None:
    from fleetlm.errors import ConfigError

    data = _data(tmp_path / "rows.txt", n=20)
    with pytest.raises(ConfigError, match="same tokenizer"):
        distill(DistillSettings(teacher=str(small_base), student=str(tiny_checkpoints["llama"]),
                                data=data, out=tmp_path / "a"), say=lambda m: None)
    with pytest.raises(ConfigError, match="eval_rows holds out 64"):
        distill(DistillSettings(teacher=str(small_base), student=str(small_base), data=data,
                                out=tmp_path / "b"), say=lambda m: None)
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"text": "fine"}\n{"label": "no text here"}\n')
    with pytest.raises(ConfigError, match="rows.jsonl:2 has none of text"):
        distill(DistillSettings(teacher=str(small_base), student=str(small_base), data=bad,
                                out=tmp_path / "c"), say=lambda m: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_every_row_shape_reads(small_base: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from fleetlm.compress.distill import read_rows

    tok = AutoTokenizer.from_pretrained(small_base)
    chat = [{"role": "user", "content": "Refund my card"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"text": "hello world"}, {"messages": [*chat, {"role": "assistant", "content": "ok"}]},
        {"prompt": "Refund my ", "completion": "card"},
        {"prompt": chat, "answer": "ok", "label": "ok"}]) + "\n")
    rows = read_rows(path, tok, 128)
    assert len(rows) == 4
    assert rows[1] == rows[3]  # a prepared row renders as the same chat
    assert tok.decode(rows[2]) == "Refund my card"


def test_cli_distill_reports_json(small_base: Path, tmp_path: Path) -> None:
    student = _student(small_base, tmp_path / "student")
    r = subprocess.run([sys.executable, "-m", "fleetlm", "distill", "--teacher", str(small_base),
                        "--student", str(student), "--data", str(_data(tmp_path / "d.txt", 80)),
                        "--out", str(tmp_path / "o"), "--steps", "3", "--eval-rows", "8"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "FLEETLM_ALLOCATOR": "system"})  # one start, not two
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["steps"] == 3 and out["held_out_rows"] == 8 and "kl" in out["after"]
    from fleetlm.errors import ConfigError

    with pytest.raises(ConfigError, match="missing.txt does not exist"):
        distill(DistillSettings(teacher=str(small_base), student=str(student),
                                data=tmp_path / "missing.txt", out=tmp_path / "p"),
                say=lambda m: None)
