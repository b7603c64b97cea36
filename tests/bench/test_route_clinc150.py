"""``fleetlm bench route --data clinc150`` end to end on a tiny random Llama (SmolLM2's
tokenizer and chat template) with a random adapter and a few CLINC150-shaped rows: the
three policies are scored, the curve runs from the small model alone to 1.0, the per-row
label probabilities are probabilities, the outcomes file feeds ``route calibrate``, the
small-model pass is cached, and a missing adapter or data folder says what to do."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fleetlm.bench.route import run_clinc150, stratified_head
from fleetlm.errors import ConfigError

LABELS = ["balance", "transfer", "weather", "oos"]
TEXTS = {
    "balance": ["how much money is in my checking", "what is my account balance",
                "tell me my savings balance", "how much cash do i have in the bank",
                "show the balance of my account", "what's left in my checking account"],
    "transfer": ["send 50 dollars to my savings", "move money from checking to savings",
                 "transfer 20 to john", "wire money to my mother",
                 "make a transfer to my other account", "send cash to my savings account"],
    "weather": ["will it rain tomorrow", "what is the weather like today",
                "is it going to snow this week", "how hot will it be on friday",
                "do i need an umbrella today", "what's the forecast for the weekend"],
    "oos": ["how do i find the area of a circle", "who won the game last night",
            "a show on broadway", "what is the capital of peru",
            "how many onions do i have on hand", "tell me about the roman empire"],
}


@pytest.fixture(scope="module")
def store(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter store holding a random adapter published as ``fleetlm tune`` would."""
    from fleetlm.adapters.random import make_random_adapter
    from fleetlm.adapters.task_card import TASK_FILE, task_card
    from fleetlm.models.loader import read_config
    from fleetlm.tune.config import TaskConfig

    root = tmp_path_factory.mktemp("store")
    folder = make_random_adapter(root / "clinc-tiny", read_config(tiny_base), rank=4, seed=0,
                                 std=0.05)
    task = TaskConfig(type="classification", system_prompt="Classify the request; oos if none "
                      "fits.", instruction="")
    (folder / TASK_FILE).write_text(json.dumps(task_card(task, sorted(LABELS))))
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clinc150")
    with (folder / "val.jsonl").open("w") as f:
        for label in ("balance", "transfer", "weather"):
            for text in TEXTS[label]:
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    with (folder / "oos_val.jsonl").open("w") as f:
        for text in TEXTS["oos"]:
            f.write(json.dumps({"text": text, "label": "oos"}) + "\n")
    (folder / "domains.json").write_text(json.dumps({"banking": ["balance", "transfer"],
                                                     "utility": ["weather"]}))
    return folder


class HashEmbedder:
    """Bag of hashed words: cheap and deterministic, instead of MiniLM."""

    model_id = "hash-words"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), 32), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 32] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _run(tiny_base: Path, store: Path, data_dir: Path, tmp: Path, **kw: Any) -> dict[str, Any]:
    emb = HashEmbedder()
    return run_clinc150("clinc-tiny", folds=2, out=tmp / "out" / "route.json", data_dir=data_dir,
                        adapters_dir=store, base_model=str(tiny_base),
                        embedding_models=(emb.model_id,), embedders={emb.model_id: emb},
                        cache_dir=tmp / "emb", overhead_samples=10, show_progress=False,
                        log=lambda _m: None, **kw)


def test_clinc150_bench_end_to_end(tiny_base: Path, store: Path, data_dir: Path,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = _run(tiny_base, store, data_dir, tmp_path)
    out = capsys.readouterr().out
    assert "confidence" in out and "random" in out and "target (>= 95% at <= 20%)" in out

    doc = json.loads((tmp_path / "out" / "route.json").read_text())
    assert doc["outcomes"] in out and doc == json.loads(json.dumps(res))
    assert doc["n"] == 24 and doc["small_only"]["n_oos"] == 6
    small_acc = doc["small_only"]["accuracy"]
    assert 0.0 < small_acc < 1.0  # both outcomes occur, so the classifier was trained
    routers = {r["name"]: r for r in doc["routers"]}
    assert set(routers) == {"confidence", "classifier [hash-words]", "random", "oracle"}
    for r in routers.values():
        assert 0.0 <= r["apgr"] <= 1.0
        acc = r["curve"]["accuracy"]
        assert acc[0] == pytest.approx(small_acc)  # nothing escalated: the small model alone
        assert acc[-1] == pytest.approx(1.0)  # everything escalated: the large model, correct
        assert set(r["accuracy_at"]) == {"10%", "20%", "30%"}
        assert isinstance(r["target_met"], bool)
    # the oracle escalates exactly the small model's mistakes
    assert routers["oracle"]["share_for_target"] <= 1.0 - small_acc + 1e-9
    assert {"p50", "p99"} <= set(doc["overhead_ms"]["confidence"])
    assert {"p50", "p99"} <= set(doc["overhead_ms"]["classifier [hash-words]"])

    # the small-model pass: a label per row and its probability under constrained decoding
    cache = Path(doc["small_pass"]["file"])
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == 24 and not doc["small_pass"]["cached"]
    for r in rows:
        assert r["prediction"] in LABELS
        assert 0.0 < r["label_prob"] <= 1.0
        assert r["small_correct"] == (r["prediction"] == r["label"])
    assert np.mean([r["small_correct"] for r in rows]) == pytest.approx(small_acc)

    # the outcomes file is what `fleetlm route calibrate --policy confidence` reads
    from fleetlm.router.calibrate import load_outcomes

    outcomes = [json.loads(line) for line in Path(doc["outcomes"]).read_text().splitlines()]
    assert len(outcomes) == 24
    for o, r in zip(outcomes, rows, strict=True):
        assert {"prompt", "small_correct", "large_correct", "score"} <= set(o)
        assert o["large_correct"] is True and o["score"] == pytest.approx(r["label_prob"])
        assert o["prompt"].startswith("system: Classify the request")
    assert len(load_outcomes(doc["outcomes"])) == 24
    assert Path(doc["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a re-run takes the small-model pass from the cache and scores the same
    again = _run(tiny_base, store, data_dir, tmp_path)
    assert again["small_pass"]["cached"]
    assert [r["apgr"] for r in again["routers"]] == [r["apgr"] for r in doc["routers"]]


def test_limit_is_stratified(tiny_base: Path, store: Path, data_dir: Path,
                             tmp_path: Path) -> None:
    assert stratified_head(["a", "a", "a", "b", "b", "c"], 4) == [0, 1, 3, 5]
    assert stratified_head(["a", "b"], 10) == [0, 1]
    res = _run(tiny_base, store, data_dir, tmp_path, limit=8)
    assert res["n"] == 8 and res["small_only"]["n_oos"] == 2  # two rows of every label


def test_missing_adapter_and_data_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        run_clinc150("clinc150", adapters_dir=tmp_path / "store", data_dir=tmp_path / "none")
    msg = str(e.value)
    assert "fleetlm tune examples/clinc150.yaml" in msg and str(tmp_path / "store") in msg
    assert "val.jsonl" in msg and "../shared/data/clinc150" in msg


def test_cli_missing_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetlm.cli import app

    monkeypatch.setenv("FLEETLM_HOME", str(tmp_path))
    res = CliRunner().invoke(app, ["bench", "route", "--data", "clinc150", "--adapter", "nope"])
    assert res.exit_code != 0
    assert "fleetlm tune examples/clinc150.yaml" in res.output
