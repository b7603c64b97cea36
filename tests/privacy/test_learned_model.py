"""The learned recognizer on its real weights: the shipped file loads offline, finds a
name and a city, fails closed on an over-size text, plugs into the presidio detector
behind ``PiiConfig.ner``, and ``fleetlm privacy train`` runs end to end on a handful of
rows."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fleetlm.privacy import PiiConfig, PiiDetectionError, PiiRedactor
from fleetlm.privacy.learned.model import MAX_CHARS, WEIGHTS_NAME, LearnedNer, load_learned

SENTENCE = "Hello, I am Maria Fernández and I moved to Rotterdam last spring."


@pytest.fixture(scope="module")
def ner() -> LearnedNer:
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        return load_learned()  # the shipped weights, ~2 s
    finally:
        mp.undo()


def _found(text: str, spans) -> set[tuple[str, str]]:
    return {(text[s.start:s.end], s.entity_type) for s in spans}


def test_shipped_weights_find_a_name_and_a_city(ner):
    spans = ner.predict([SENTENCE, "", "Nothing personal here."])
    assert ("Maria Fernández", "PERSON") in _found(SENTENCE, spans[0])
    assert ("Rotterdam", "LOCATION") in _found(SENTENCE, spans[0])
    assert spans[1] == [] and spans[2] == []
    assert all(0.0 < s.score <= 1.0 for s in spans[0])


def test_batch_equals_one_by_one_and_long_texts_are_windowed(ner):
    texts = [SENTENCE, "Call Peter Jones in Leeds.", SENTENCE + " filler words." * 150]
    batch = ner.predict(texts)
    for text, spans in zip(texts[:2], batch, strict=False):  # padding moves the rounding only
        alone = ner.predict([text])[0]
        assert [(s.start, s.end, s.entity_type) for s in spans] == [
            (s.start, s.end, s.entity_type) for s in alone]
        assert [s.score for s in spans] == pytest.approx([s.score for s in alone], abs=1e-4)
    assert len(texts[2]) > 2000  # several windows of 256 pieces
    assert _found(texts[2], batch[2]) >= {("Maria Fernández", "PERSON"), ("Rotterdam", "LOCATION")}


def test_fused_tagger_gives_the_transformers_logits(ner):
    """encoder.FusedTagger (one query-key-value product per layer; what int8 quantises)
    against the transformers model it is built from, on a padded batch: the same
    logits on every real piece, and no piece's logits depend on another window's padding."""
    import torch

    from fleetlm.privacy.learned.encoder import FusedTagger
    from fleetlm.privacy.learned.model import collate, encode

    fused = FusedTagger(ner.model)
    texts = [SENTENCE, "Call Peter Jones in Leeds.", "ok"]
    batch = collate(encode(ner.tokenizer, texts, ner.meta), ner.tokenizer.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    assert not real.all()  # the batch has padding
    with torch.inference_mode():
        got, want = fused(*args), ner.forward(*args)
        alone = fused(*(a[1:2, :int(real[1].sum())] for a in args))
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], got[1, :int(real[1].sum())], atol=1e-5, rtol=1e-5)
    try:
        with pytest.raises(ValueError, match="eval mode"):
            FusedTagger(ner.model.train())
    finally:
        ner.model.eval()


def test_int8_model_agrees_with_the_float32_reference(ner):
    """The fast path (PyTorch's dynamic int8 linear, kernel chosen for this CPU) against
    its slow twin on the same weights: nearly every span identical on real text."""
    import torch

    int8 = load_learned(precision="int8")
    assert int8.precision == "int8" and ner.precision == "float32"
    quantized = [m for m in int8.model.modules() if "quantized" in type(m).__module__]
    assert quantized, "no linear layer was quantised"
    engine = torch.backends.quantized.engine
    assert engine in torch.backends.quantized.supported_engines
    from fleetlm.privacy.eval import support_v1_path

    rows = json.loads(support_v1_path().read_text(encoding="utf-8"))[:120]
    texts = [r["full_text"] for r in rows]
    ref, fast = ner.predict(texts), int8.predict(texts)

    def agreed(a, b) -> tuple[int, int]:  # spans of a with a same-type overlapping span in b
        hits = sum(any(x.entity_type == y.entity_type and x.start < y.end and y.start < x.end
                       for y in bs) for xs, bs in zip(a, b, strict=True) for x in xs)
        return hits, sum(len(xs) for xs in a)

    for (hits, total) in (agreed(ref, fast), agreed(fast, ref)):
        assert total > 150
        assert hits / total >= 0.9, (engine, hits, total)
    with pytest.raises(ValueError, match="precision"):
        LearnedNer(ner.path, "int4")


def test_int8_runs_traced_and_tracing_falls_back_to_eager(ner, caplog):
    import torch

    from fleetlm.privacy.learned.model import trace_checked

    int8 = load_learned(precision="int8")
    assert isinstance(int8.forward, torch.jit.ScriptModule)  # traced on this machine
    assert not isinstance(ner.forward, torch.jit.ScriptModule)  # float32: eager reference

    class ShapeDependent(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            # Python on the batch size: traces to a graph that is wrong for one row
            return input_ids.float() * (1.0 if input_ids.shape[0] == 2 else 2.0)

    class Untraceable(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            raise RuntimeError("cannot trace")

    for module in (ShapeDependent(), Untraceable()):
        caplog.clear()
        with caplog.at_level("WARNING"):
            fallback = trace_checked(module, int8._example())
        assert fallback is module
        assert "runs eagerly" in caplog.text


def test_over_size_input_fails_closed(ner):
    with pytest.raises(PiiDetectionError, match=f"cap of {MAX_CHARS}"):
        ner.predict(["fine", "x" * (MAX_CHARS + 1)])


def test_detector_with_the_learned_recognizer(network_calls):
    calls = network_calls
    redactor = PiiRedactor(PiiConfig(ner="learned"))
    text = SENTENCE + " Mail me at maria.f@example.com."
    redacted, mapping = redactor.redact(text)
    assert redacted == ("Hello, I am <PERSON_1> and I moved to <LOCATION_1> last spring. "
                        "Mail me at <EMAIL_ADDRESS_1>.")
    assert calls == []
    with pytest.raises(PiiDetectionError, match="cap of"):
        redactor.redact("y" * (MAX_CHARS + 1))
    # both: spaCy's and the model's spans, merged
    both, _ = PiiRedactor(PiiConfig(ner="both")).redact(text)
    assert "Maria" not in both and "Rotterdam" not in both


def _tiny_dataset(path) -> None:
    rows = []
    names = ["Anna Berg", "Tomas Novak", "Li Wei", "Sara Cohen", "Omar Haddad", "Ken Ito"]
    cities = ["Oslo", "Prague", "Chengdu", "Haifa", "Beirut", "Osaka"]
    for i, (name, city) in enumerate(zip(names, cities, strict=True)):
        text = f"{name} lives in {city}."
        rows.append({"full_text": text, "template_id": i, "spans": [
            {"entity_type": "PERSON", "start_position": 0, "end_position": len(name)},
            {"entity_type": "GPE", "start_position": text.index(city),
             "end_position": text.index(city) + len(city)}]})
    path.write_text(json.dumps(rows), encoding="utf-8")


def test_privacy_train_runs_end_to_end(tmp_path, monkeypatch):
    from fleetlm.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "tiny.json"
    _tiny_dataset(data)
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["privacy", "train", "--data", str(data), "--out", str(out),
                                      "--epochs", "1", "--batch-size", "4", "--layers", "2",
                                      "--augment", "8"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["weights"] == str(out / WEIGHTS_NAME)
    assert summary["train_rows"] - 8 + summary["validation"]["rows"] == 6
    assert summary["settings"]["layers"] == 2
    assert summary["steps"] >= 1 and summary["bytes"] < 2_000_000
    assert "overall" in summary["validation"]["scores"]
    model = load_learned(out)
    assert model.meta.layers == 2 and len(model.model.bert.encoder.layer) == 2
    spans = model.predict(["Anna Berg lives in Oslo."])
    assert all(0 <= s.start < s.end <= 24 for s in spans[0])


def test_privacy_train_refuses_bad_flags(tmp_path):
    from fleetlm.cli import app

    result = CliRunner().invoke(app, ["privacy", "train", "--data", str(tmp_path / "none.json"),
                                      "--epochs", "0", "--lr", "3", "--layers", "7",
                                      "--augment", "-1"])
    assert result.exit_code == 2
    for flag in ("--data", "--epochs=0", "--lr=3", "--layers=7", "--augment=-1"):
        assert flag in result.output
