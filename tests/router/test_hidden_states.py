"""The base model's hidden states as the classifier router's embedding (``base:MODEL``), on a tiny
random SmolLM2-shaped checkpoint with a character-level tokenizer built here; one slow test on
the real smollm2-135m."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fleetlm.models.loader import load_model
from fleetlm.router.classifier import HFEmbedder, TrainedRouter, fit_router, load_embedder
from fleetlm.router.hidden_states import HiddenStateEmbedder, hidden_state_spec
from tests.conftest import make_hf_model


def char_tokenizer() -> Any:
    """One token per printable character (95 + unk + eos < the tiny vocab of 128)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set(string.whitespace))
    vocab = {c: i for i, c in enumerate(["[UNK]", "</s>", *chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random tied-embedding (SmolLM2-like) checkpoint with its tokenizer saved beside."""
    folder = tmp_path_factory.mktemp("tiny-smollm")
    make_hf_model("smollm2-tied").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def emb(tiny_folder: Path) -> HiddenStateEmbedder:
    torch.set_num_threads(1)
    lm = load_model(str(tiny_folder), dtype="float32", with_tokenizer=False)
    return HiddenStateEmbedder(lm.model, char_tokenizer(), "base:tiny", max_length=64,
                               batch_size=4)


TEXTS = ["hello there", "Prove that sqrt(2) is irrational.", "ok",
         "a much longer prompt, with several words and punctuation; enough to pad the others!"]


def test_shape_unit_norm_and_deterministic(emb: HiddenStateEmbedder) -> None:
    v = emb.embed(TEXTS)
    assert v.shape == (4, 64) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(emb.embed(TEXTS), v)
    assert not np.allclose(v[0], v[1], atol=1e-3)  # different texts, different vectors


def test_padding_and_batch_order_do_not_change_a_prompt(emb: HiddenStateEmbedder) -> None:
    alone = emb.embed([TEXTS[0]])[0]
    with_longer = emb.embed([TEXTS[0], TEXTS[3]])[0]  # padded to the long text's length
    np.testing.assert_allclose(with_longer, alone, atol=1e-6)
    batch = emb.embed(TEXTS)
    reversed_batch = emb.embed(TEXTS[::-1])[::-1]
    np.testing.assert_allclose(reversed_batch, batch, atol=1e-6)
    one_by_one = np.stack([emb.embed([t])[0] for t in TEXTS])
    np.testing.assert_allclose(one_by_one, batch, atol=1e-6)


def test_mean_of_final_norm_hidden_states(emb: HiddenStateEmbedder) -> None:
    """The slow, obvious twin: one unpadded forward, LM head undone by the logits check."""
    ids = torch.tensor([emb.token_ids([TEXTS[1]])[0]])
    n = ids.shape[1]
    m = emb.model
    with torch.inference_mode():
        h = m(ids, torch.arange(n)[None], m.allocate_cache(1, n), None, n, return_hidden=True)
        logits = m(ids, torch.arange(n)[None], m.allocate_cache(1, n), None, n)
    torch.testing.assert_close(m.lm_head(h).float(), logits)  # same forward, LM head apart
    ref = h[0].mean(0)
    ref = ref / ref.norm()
    np.testing.assert_allclose(emb.embed([TEXTS[1]])[0], ref.numpy(), atol=1e-6)


def test_matches_transformers_hidden_states(tiny_folder: Path, emb: HiddenStateEmbedder) -> None:
    """Same pooling run by transformers (the folder embedder) on the same weights."""
    hf = HFEmbedder(tiny_folder, "hf", max_length=64)
    np.testing.assert_allclose(emb.embed(TEXTS), hf.embed(TEXTS), atol=1e-5)


def test_truncation_and_empty_text(emb: HiddenStateEmbedder) -> None:
    long = "x" * 40 + "y" * 100  # 140 characters -> 140 tokens, truncated to 64
    assert len(emb.token_ids([long])[0]) == 64
    np.testing.assert_allclose(emb.embed([long])[0], emb.embed(["x" * 40 + "y" * 24])[0],
                               atol=1e-6)
    v = emb.embed(["", "hi", "   "])
    assert not v[0].any() and not v[2].any() and np.isclose(np.linalg.norm(v[1]), 1.0)


def test_embedding_ids() -> None:
    assert hidden_state_spec("base:smollm2-135m") == "smollm2-135m"
    assert hidden_state_spec("base:/models/x") == "/models/x"
    for other in ("all-MiniLM-L6-v2", "all-MiniLM-L6-v2:static", "smollm2-135m", "base:"):
        assert hidden_state_spec(other) is None


def test_saved_router_reloads_the_same_embedder(tiny_folder: Path, tmp_path: Path) -> None:
    """A router trained on ``base:FOLDER`` stores that id; loading it without an embedder
    builds the same one through load_embedder."""
    e = load_embedder(f"base:{tiny_folder}")
    assert isinstance(e, HiddenStateEmbedder)
    assert e.model_id == f"base:{tiny_folder.resolve()}"
    x = e.embed(TEXTS)
    r = fit_router(x, [True, False, True, False], [True] * 4, e.model_id, embedder=e)
    loaded = TrainedRouter.load(r.save(tmp_path / "router"))
    assert loaded.embedding_model == e.model_id and loaded.embedder is None
    np.testing.assert_allclose(loaded.score_many(TEXTS), r.score_many(TEXTS), atol=1e-9)
    assert isinstance(loaded.embedder, HiddenStateEmbedder)


def _toy_set(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray]:
    """Hard prompts use math keywords, easy ones greetings; half of each, shuffled."""
    hard_words = ["integral", "prove", "matrix", "theorem", "derivative", "eigenvalue"]
    easy_words = ["hello", "thanks", "bye", "good", "morning", "cheers"]
    texts, small = [], []
    for i in range(n):
        words = easy_words if i % 2 else hard_words
        texts.append(" ".join(rng.choice(words, size=int(rng.integers(2, 6)))))
        small.append(bool(i % 2))
    return texts, np.array(small)


def test_router_on_hidden_states_routes_a_keyword_separable_set(emb: HiddenStateEmbedder) -> None:
    rng = np.random.default_rng(0)
    train, small = _toy_set(rng, 60)
    test, small_test = _toy_set(rng, 40)
    r = fit_router(emb.embed(train), small, np.ones(60, bool), emb.model_id, C=10.0,
                   embedder=emb)
    s = r.score_many(test)  # higher = the small model is good enough
    assert s[small_test].min() > s[~small_test].max()


@pytest.mark.slow
def test_real_smollm2_hidden_states() -> None:
    torch.set_num_threads(2)
    texts = ["Hello, how are you?", "Prove that there are infinitely many primes.",
             "Translate 'good morning' into French."]
    e = load_embedder("base:smollm2-135m")
    assert e.model_id == "base:smollm2-135m"
    v = e.embed(texts)
    assert v.shape == (3, 576)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e.embed(texts[:1])[0], v[0], atol=1e-5)
    from fleetlm.models.loader import resolve_source

    hf = HFEmbedder(resolve_source("smollm2-135m"), "hf")  # the same pooling by transformers
    np.testing.assert_allclose(hf.embed(texts), v, atol=1e-4)
