"""``fleetlm tune`` end to end on a tiny random model with SmolLM2's tokenizer: the loss
falls, stages are cached, training resumes exactly, bad configs name their field, the
published adapter scores in the engine what the run reported, and a real fleetlm server
works as the teacher."""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fleetlm.tune.config import parse_config
from fleetlm.tune.pipeline import Pipeline

LABELS = {"fruit": ["apple", "banana", "cherry", "mango"],
          "tool": ["hammer", "wrench", "saw", "drill"],
          "animal": ["horse", "tiger", "otter", "eagle"]}
FLEETLM = shutil.which("fleetlm", path=str(Path(sys.executable).parent))


def _write_data(path: Path, n_per_label: int = 24, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "category"])
        for label, words in LABELS.items():
            for i in range(n_per_label):
                a, b = rng.sample(words, 2)
                w.writerow([f"I saw a {a} and a {b} on day {i} of {rng.choice('xyzw')}", label])


def _config(tmp: Path, base: Path, **over: Any) -> dict[str, Any]:
    data = tmp / "train.csv"
    if not data.exists():
        _write_data(data)
    raw: dict[str, Any] = {
        "name": "tiny-cls", "base_model": str(base), "seed": 0,
        "task": {"type": "classification", "system_prompt": "Sort it.", "instruction": ""},
        "data": {"path": str(data), "label_column": "category", "validation_fraction": 0.25},
        "prepare": {"dedup": "exact"},
        "train": {"rank": 8, "alpha": 16, "learning_rate": 0.05, "max_steps": 30, "batch_size": 8,
                  "eval_every": 10, "save_every": 10, "bf16": False, "warmup_ratio": 0.0},
        "eval": {"base_rows": 6, "few_shot": 2},
        "publish": {"adapters_dir": str(tmp / "store")},
        "output_dir": str(tmp / "run"),
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


def test_tune_end_to_end_caches_and_publishes(tmp_path: Path, tiny_base: Path) -> None:
    cfg = parse_config(_config(tmp_path, tiny_base))
    res = Pipeline(cfg, quiet=True).run()
    s = res.summary
    train = s["stages"]["train"]
    assert train["steps"] == 30 and train["tokens_per_s"] > 0
    assert train["final_train_loss"] < 0.5 * train["first_train_loss"]  # it learns
    assert {"tuned", "base_zero_shot", "base_few_shot"} <= set(s["metrics"])
    tuned = s["metrics"]["tuned"]
    assert 0.0 <= tuned["accuracy"] <= 1.0 and "macro_f1" in tuned
    # run folder: summary, plots, log; published adapter with card and task file
    for f in ("summary.json", "loss.png", "confusion.png", "tune.log", "config.json"):
        assert (res.run_dir / f).is_file(), f
    pub = tmp_path / "store" / "tiny-cls"
    assert res.adapter_dir == pub
    for f in ("adapter_config.json", "adapter_model.safetensors", "README.md", "fleetlm_task.json"):
        assert (pub / f).is_file(), f
    card = (pub / "README.md").read_text()
    assert "## Training" in card and "## Evaluation" in card and "rank 8" in card
    task = json.loads((pub / "fleetlm_task.json").read_text())
    assert task["labels"] == sorted(LABELS) and task["system_prompt"] == "Sort it."

    # the published adapter, served by the engine, scores what the run reported
    from fleetlm.adapters import AdapterStore
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model
    from fleetlm.tune.evaluate import evaluate
    from fleetlm.tune.records import read_jsonl

    prep = res.run_dir / "stages" / f"prepare-{s['stages']['prepare']['key']}"
    val = read_jsonl(prep / "val.jsonl")
    lm = load_model(str(tiny_base), dtype="auto")
    store = AdapterStore(tmp_path / "store", lm.config, dtype=lm.model.dtype, max_rank=16)
    engine = Engine(lm, EngineConfig(max_running=8, max_len=256, max_hot_adapters=1), store=store)
    again = evaluate(engine, val, cfg.task, sorted(LABELS), adapter="tiny-cls", name="served")
    assert again.metrics["accuracy"] == pytest.approx(tuned["accuracy"])
    assert again.rows == tuned["rows"]

    # a second run reuses every stage; changing eval settings redoes only the evaluation
    cfg2 = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"overwrite": True})})
    s2 = Pipeline(cfg2, quiet=True).run().summary
    assert all(st["cached"] for st in s2["stages"].values())
    assert s2["metrics"] == s["metrics"]
    cfg3 = cfg2.model_copy(update={"eval": cfg.eval.model_copy(update={"few_shot": 0})})
    s3 = Pipeline(cfg3, quiet=True).run().summary
    assert s3["stages"]["train"]["cached"] and not s3["stages"]["evaluate"]["cached"]
    assert "base_few_shot" not in s3["metrics"]


def test_publish_refuses_to_overwrite_without_the_flag(tmp_path: Path, tiny_base: Path) -> None:
    from fleetlm.adapters import AdapterError

    raw = _config(tmp_path, tiny_base, train={"max_steps": 2}, eval={"enabled": False})
    Pipeline(parse_config(raw), quiet=True).run()
    with pytest.raises(AdapterError, match="already"):
        Pipeline(parse_config(raw), quiet=True).run()


def test_training_resumes_exactly_after_a_crash(tmp_path: Path, tiny_base: Path) -> None:
    from fleetlm.models.loader import load_tokenizer
    from fleetlm.tune.format import encode
    from fleetlm.tune.load import load_rows
    from fleetlm.tune.train import build_model, train

    cfg = parse_config(_config(tmp_path, tiny_base, train={"max_steps": 8, "save_every": 2}))
    tok = load_tokenizer(tiny_base)
    rows, _ = load_rows(cfg)
    enc = [encode(tok, r, cfg.task) for r in rows]
    pad = tok.eos_token_id

    def fresh() -> Any:
        torch.manual_seed(123)
        return build_model(tiny_base, cfg.train)

    whole = train(fresh(), enc[:60], enc[60:], cfg.train, tmp_path / "a", pad_id=pad)

    class Crash(Exception):
        pass

    def crash_at_5(e: dict[str, Any]) -> None:
        if e.get("step") == 5 and "loss" in e:
            raise Crash

    with pytest.raises(Crash):
        train(fresh(), enc[:60], enc[60:], cfg.train, tmp_path / "b", pad_id=pad, on_step=crash_at_5)
    assert (tmp_path / "b" / "checkpoint" / "state.pt").is_file()  # step 4's
    torch.manual_seed(999)  # a different start: everything must come from the checkpoint
    resumed = train(build_model(tiny_base, cfg.train), enc[:60], enc[60:], cfg.train,
                    tmp_path / "b", pad_id=pad, resume=True)
    assert resumed.steps == whole.steps == 8
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    losses = [h["loss"] for h in whole.history if "loss" in h]
    assert [h["loss"] for h in resumed.history if "loss" in h] == pytest.approx(losses, abs=1e-5)


def _tune_cli(tmp_path: Path, raw: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    assert FLEETLM
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return subprocess.run([FLEETLM, "tune", str(path)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("change, needle", [
    ({"train": {"rnak": 4}}, "train.rnak: unknown key"),
    ({"data": {"text_column": "body"}}, "data.text_column"),
    ({"data": {"label_column": "intent"}}, "data.label_column"),
    ({"prepare": {"min_chars": 500}}, "prepare."),
    ({"name": "bad name!"}, "name"),
])
def test_bad_configs_name_the_field(tmp_path: Path, tiny_base: Path, change, needle) -> None:
    r = _tune_cli(tmp_path, _config(tmp_path, tiny_base, **change))
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_fleetlm_server_as_teacher(tmp_path: Path, tiny_base: Path) -> None:
    """Synthesis against a real fleetlm server (the embedded model) on loopback; its rows
    pass the filter into the training data."""
    from tests.server.conftest import MODEL, live_server

    with live_server(tmp_path / "teacher-store", with_demo=False) as live:
        raw = _config(tmp_path, tiny_base, synthesize={
            "enabled": True, "per_label": 4, "seed_examples": 3, "concurrency": 2,
            "max_requests": 6, "teacher": {"base_url": live.url + "/v1", "model": MODEL,
                                           "max_tokens": 96, "temperature": 0.8}},
            filter={"confirm_labels": False, "min_chars": 8})
        p = Pipeline(parse_config(raw), quiet=True)
        p.run_dir.mkdir(parents=True)
        data, train, val = p.prepare()
        _, augmented = p.synthesize(data, train, val)
        generated = live.engine.stats()["generated_tokens"]
    synthetic = [r for r in augmented if r.source == "synthetic"]
    assert generated > 0 and synthetic, p.summary["stages"]
    assert len(augmented) == len(train) + len(synthetic)
    assert all(r.label in LABELS and r.text and len(r.text) >= 8 for r in synthetic)
    rep = p.summary["stages"]["synthesize"]
    assert rep["requests"] >= 1


def test_full_fine_tune_publishes_a_servable_model(tmp_path: Path, tiny_base: Path) -> None:
    raw = _config(tmp_path, tiny_base, train={"method": "full", "max_steps": 4,
                                              "learning_rate": 0.001, "eval_every": 2},
                  eval={"base_rows": 0})
    res = Pipeline(parse_config(raw), quiet=True).run()
    model_dir = res.adapter_dir
    assert model_dir == tmp_path / "run" / "model"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (model_dir / f).is_file(), f
    assert "library_name: transformers" in (model_dir / "README.md").read_text()
    from fleetlm.models.loader import load_model

    lm = load_model(str(model_dir), dtype="float32")  # what `fleetlm serve --model` loads
    assert lm.config.vocab_size > 1000 and "tuned" in res.summary["metrics"]


def test_completion_task_reports_exact_match_and_rouge(tmp_path: Path, tiny_base: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    with data.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"Repeat the number {i}", "completion": f"{i} {i}"}) + "\n")
    raw = _config(tmp_path, tiny_base, task={"type": "completion", "system_prompt": None},
                  data={"path": str(data), "label_column": "label"},
                  train={"max_steps": 3}, eval={"base_rows": 4, "few_shot": 1, "max_new_tokens": 4})
    raw["task"].pop("instruction")
    s = Pipeline(parse_config(raw), quiet=True).run().summary
    tuned = s["metrics"]["tuned"]
    assert set(tuned) == {"rows", "exact_match", "rouge_l"} and 0 <= tuned["rouge_l"] <= 1
    assert "base_few_shot" in s["metrics"]
    assert not (tmp_path / "run" / "confusion.png").exists()


def test_rouge_l_against_hand_computed_values() -> None:
    from fleetlm.tune.evaluate import rouge_l

    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "x") == 0.0 and rouge_l("", "") == 1.0
    # LCS("a b c d", "a c d e") = 3 -> P = 3/4, R = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("x y", "a b") == 0.0


def test_publish_with_serve_url_loads_into_a_running_server(tmp_path: Path, tiny_base: Path) -> None:
    """--serve-url: the new adapter is uploaded to a running fleetlm server over its API and
    answers at once, no restart."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from fleetlm.adapters import AdapterStore
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model
    from fleetlm.server.app import create_app

    lm = load_model(str(tiny_base), dtype="float32")
    server_root = tmp_path / "server-store"
    server_root.mkdir()
    store = AdapterStore(server_root, lm.config, dtype=torch.float32, max_rank=16)
    engine = Engine(lm, EngineConfig(max_running=2, max_len=256, max_hot_adapters=2), store=store)
    engine.start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny"), host="127.0.0.1", port=port,
                                        log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port}"
        raw = _config(tmp_path, tiny_base, train={"max_steps": 2}, eval={"enabled": False})
        Pipeline(parse_config(raw), quiet=True, serve_url=url + "/v1").run()
        assert (server_root / "tiny-cls" / "adapter_model.safetensors").is_file()
        models = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert "tiny-cls" in models
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny-cls", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "a mango"}],
            "response_format": {"type": "choice", "choices": sorted(LABELS)}})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] in LABELS
        # a server that is not there: a clear error naming the setting, adapter kept locally
        from fleetlm.errors import FleetLMError

        raw["publish"]["overwrite"] = True
        with pytest.raises(FleetLMError, match="publish.serve_url"):
            Pipeline(parse_config(raw), quiet=True, serve_url="http://127.0.0.1:9/v1").run()
    finally:
        srv.should_exit = True
        t.join(10)
        engine.shutdown(10)


def test_anonymize_removes_the_pii_of_a_fixture(tmp_path: Path, tiny_base: Path) -> None:
    """prepare.anonymize with the real Presidio redactor (the router's): names, e-mails and
    phone numbers in the rows become placeholders before anything is trained on them."""
    data = tmp_path / "pii.csv"
    secrets = ["John Smith", "jane.doe@example.com", "212-555-0199", "Maria Garcia"]
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "category"])
        w.writerow(["John Smith asked to close his account", "close"])
        w.writerow(["Please email jane.doe@example.com about the refund", "refund"])
        w.writerow(["Call me back at 212-555-0199 about my refund", "refund"])
        w.writerow(["Maria Garcia wants to close the joint account", "close"])
        for i in range(8):
            w.writerow([f"generic close request number {i} today", "close"])
            w.writerow([f"generic refund request number {i} today", "refund"])
    raw = _config(tmp_path, tiny_base, data={"path": str(data), "validation_fraction": 0.2},
                  prepare={"anonymize": True, "dedup": "exact"})
    p = Pipeline(parse_config(raw), quiet=True)
    p.run_dir.mkdir(parents=True)
    stage, train, val = p.prepare()
    stored = (stage.folder / "train.jsonl").read_text() + (stage.folder / "val.jsonl").read_text()
    for s in secrets:
        assert s not in stored
    assert "<PERSON_1>" in stored and "<EMAIL_ADDRESS_1>" in stored
    assert p.summary["stages"]["prepare"]["anonymized_rows"] >= 3


def test_bench_tune_compares_with_trainer_and_writes_json(tmp_path: Path, tiny_base: Path) -> None:
    raw = _config(tmp_path, tiny_base, train={"max_steps": 2}, eval={"enabled": False})
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "tune.json"
    assert FLEETLM
    r = subprocess.run([FLEETLM, "bench", "tune", "--config", str(cfg_path), "--steps", "4",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    systems = [x["system"] for x in d["throughput"]]
    assert systems == ["fleetlm loop", "transformers Trainer + peft"]
    ours, theirs = d["throughput"]
    assert ours["steps"] == theirs["steps"] == 4
    assert ours["tokens"] == theirs["tokens"] > 0  # the same rows, each seen once
    assert all(x["tokens_per_s"] > 0 for x in d["throughput"])
    assert list(d["ratio"].values())[0] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    assert d["pipeline"]["train_steps"] == 2 and (tmp_path / "store" / "tiny-cls").is_dir()


def _teacher(body: dict[str, Any], i: int) -> str:
    """Synthesis: three new rows of the asked label; label confirmation: the label whose
    word the text holds."""
    user = body["messages"][-1]["content"]
    if "Intent (label): " in user:
        label = user.split("Intent (label): ")[1].split("\n")[0]
        return "\n".join(f"{k + 1}. a new {LABELS[label][k]} seen on day {i}" for k in range(3))
    text = user.split("Text: ")[1].split("\n\n")[0]
    return next(label for label, words in LABELS.items() if any(w in text for w in words))


def test_tune_off_a_terminal_prints_plain_progress_lines(
        tmp_path: Path, tiny_base: Path, teacher_stub: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Without a terminal (CI, nohup, a container log) every stage says where it is in plain
    lines: stage, step/total, rate, eta; and the stage summaries still print."""
    import re

    monkeypatch.setenv("FLEETLM_PROGRESS_INTERVAL", "0")  # every update prints
    stub = teacher_stub(_teacher)
    raw = _config(tmp_path, tiny_base,
                  synthesize={"enabled": True, "per_label": 3, "seed_examples": 2,
                              "teacher": {"base_url": stub.base_url, "model": "tch"}},
                  train={"max_steps": 4, "eval_every": 2, "save_every": 4},
                  eval={"max_rows": 6, "base_rows": 0})
    Pipeline(parse_config(raw)).run()  # not quiet; pytest's captured stdout is no terminal
    out = capsys.readouterr().out
    line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d tune: (?P<stage>[a-z ]+?) "
                      r"(?P<done>\d+)(?:/(?P<total>\d+) [\d.]+%)?(?P<rest>.*)$")
    lines = [m for m in map(line.match, out.splitlines()) if m]
    stages = {m["stage"] for m in lines}
    assert {"prepare", "synthesize", "filter", "train", "evaluate tuned"} <= stages, out
    train = [m for m in lines if m["stage"] == "train"]
    assert [int(m["done"]) for m in train] == [0, 1, 2, 3, 4]  # interval 0: every step
    assert all(m["total"] == "4" for m in train[1:])
    mid = train[2]["rest"]
    assert re.search(r" [\d.]+/s elapsed \w+ eta \w+ \| loss [\d.]+", mid), mid
    assert "eta" not in train[-1]["rest"]  # the last line: done, nothing left to wait for
    synth = [m for m in lines if m["stage"] == "synthesize"]
    assert synth[-1]["done"] == synth[-1]["total"] == "3"  # one request per label
    assert "prepare: " in out and "rows in ->" in out  # say() messages still print
    assert "synthesize: 9 teacher rows" in out and "validation loss" in out


def test_qlora_trains_on_an_int8_base_and_its_adapter_serves(tmp_path: Path,
                                                             tiny_base: Path) -> None:
    """train.quantize_base: int8 -- the frozen projections are torchao int8 tensors under
    PEFT's LoRA; the run learns, and the published adapter, served by the engine on the
    unquantised base, scores what the run reported."""
    from fleetlm.tune.config import TrainConfig
    from fleetlm.tune.train import build_model

    tc = TrainConfig(rank=4, alpha=8, quantize_base="int8", bf16=False)
    model = build_model(tiny_base, tc)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "TorchaoLoraLinear"
    assert type(q.base_layer.weight).__name__ == "Int8Tensor"
    assert q.base_layer.weight.qdata.dtype == torch.int8
    assert not q.base_layer.weight.requires_grad
    # the embedding (the tied head) stays as it was
    emb = model.get_base_model().model.embed_tokens.weight
    assert type(emb) is torch.nn.Parameter and emb.dtype == torch.float32

    raw = _config(tmp_path, tiny_base, train={"quantize_base": "int8"}, eval={"base_rows": 0})
    res = Pipeline(parse_config(raw), quiet=True).run()
    train = res.summary["stages"]["train"]
    assert train["final_train_loss"] < 0.5 * train["first_train_loss"]
    assert "on an int8 base (QLoRA)" in (tmp_path / "store" / "tiny-cls" / "README.md").read_text()

    from fleetlm.adapters import AdapterStore
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model
    from fleetlm.tune.evaluate import evaluate
    from fleetlm.tune.records import read_jsonl

    cfg = parse_config(raw)
    prep = res.run_dir / "stages" / f"prepare-{res.summary['stages']['prepare']['key']}"
    lm = load_model(str(tiny_base), dtype="float32")
    store = AdapterStore(tmp_path / "store", lm.config, dtype=lm.model.dtype, max_rank=16)
    engine = Engine(lm, EngineConfig(max_running=8, max_len=256, max_hot_adapters=1), store=store)
    again = evaluate(engine, read_jsonl(prep / "val.jsonl"), cfg.task, sorted(LABELS),
                     adapter="tiny-cls", name="served")
    tuned = res.summary["metrics"]["tuned"]
    assert again.metrics["accuracy"] == pytest.approx(tuned["accuracy"])
    with pytest.raises(ValueError, match="quantize_base: int8 trains LoRA"):
        TrainConfig(method="full", quantize_base="int8")
