"""Hugging Face folder (Llama family) -> GGUF file that llama.cpp loads, with ``gguf``.

    write_gguf(folder, state, cfg, Path("model-q8_0.gguf"), "q8_0", name="banking77")

Types: ``f32``, ``f16``, ``q8_0`` (8-bit, a scale per 32 weights) and ``q4_0`` (4-bit, a
scale per 32 weights); 1-D tensors (norms, biases) stay float32, as llama.cpp expects, and
a matrix whose rows do not split into 32-weight blocks falls back to f16. The layout is the
inverse of :mod:`fleetlm.models.gguf_convert` (which reads GGUF): llama.cpp's tensor names,
q/k rows permuted to its RoPE layout for the ``llama`` architecture.

The tokenizer: a folder converted from a GGUF (``fleetlm_source.json``: every embedded
model) gets the source file's ``tokenizer.*`` fields verbatim, so llama.cpp tokenizes
exactly as it did the original. Any other folder needs a byte-level BPE ``tokenizer.json``
(GPT-2 style: SmolLM, Llama 3, Qwen); its vocabulary, merges, special tokens and chat
template are written, with llama.cpp's default pre-tokenizer (``tokenizer.ggml.pre``):
token ids match, text may split differently in llama.cpp for models whose own
pre-tokenizer differs (docs/compress.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fleetlm.errors import ModelLoadError
from fleetlm.models.config import LlamaConfig
from fleetlm.models.gguf_convert import GLOBAL_NAMES, LAYER_NAMES

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_BLOCK = 32  # weights per block of q8_0 and q4_0


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half q/k rows -> llama.cpp's interleaved layout (the inverse of
    ``gguf_convert._unpermute``)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str | None:
    """llama.cpp's name of a Hugging Face tensor (None: not part of the model)."""
    base, _, suffix = hf.rpartition(".")
    if base.startswith("model.layers."):
        _, _, idx, part = base.split(".", 3)
        short = {v: k for k, v in LAYER_NAMES.items()}.get(part)
        return None if short is None else f"blk.{idx}.{short}.{suffix}"
    short = {v: k for k, v in GLOBAL_NAMES.items()}.get(base)
    return None if short is None else f"{short}.{suffix}"


def check_exportable(cfg: LlamaConfig) -> str:
    """The GGUF architecture of ``cfg``, or an error naming what llama.cpp's file would lack."""
    arch = _ARCH.get(cfg.model_type)
    if arch is None:
        raise ModelLoadError(f"model_type {cfg.model_type!r} is not exported to GGUF (exported: "
                             f"{', '.join(_ARCH)}); export the Hugging Face folder only "
                             "(--gguf none)")
    if cfg.rope_scaling is not None:
        raise ModelLoadError(f"rope_scaling {cfg.rope_scaling} is not exported to GGUF yet; "
                             "export the Hugging Face folder only (--gguf none)")
    if cfg.sliding_window is not None:
        raise ModelLoadError(f"sliding_window={cfg.sliding_window} is not exported to GGUF yet; "
                             "export the Hugging Face folder only (--gguf none)")
    return arch


def _tensor(writer: Any, name: str, w: np.ndarray, qtype: str) -> None:
    import gguf

    if w.ndim == 1 or qtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
        return
    if qtype == "f16" or w.shape[-1] % _BLOCK:
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float16))
        return
    t = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]
    writer.add_tensor(name, gguf.quantize(np.ascontiguousarray(w, dtype=np.float32), t),
                      raw_dtype=t)


def _model_fields(writer: Any, cfg: LlamaConfig, qtype: str, name: str) -> None:
    import gguf

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(ftype[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)


def _copy_tokenizer(writer: Any, source: Path) -> None:
    """Every ``tokenizer.*`` field of the GGUF the folder was converted from."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _built_tokenizer(writer: Any, folder: Path, cfg: LlamaConfig) -> None:
    """A byte-level BPE ``tokenizer.json`` as GGUF's ``gpt2`` tokenizer model."""
    import gguf
    from transformers import AutoTokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json; a GGUF file carries its tokenizer, "
                             "so export needs one (or --gguf none for the Hugging Face folder)")
    spec = json.loads(path.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ModelLoadError(f"{path}: only byte-level BPE tokenizers (GPT-2 style) are "
                             "exported to GGUF; export the Hugging Face folder only (--gguf none)")
    tok = AutoTokenizer.from_pretrained(str(folder))
    n = cfg.vocab_size
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for text, i in tok.get_vocab().items():
        if i < n:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, added in tok.added_tokens_decoder.items():
        if i < n:
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id),
                      ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id),
                      ("pad_token_id", writer.add_pad_token_id)):
        i = getattr(tok, attr, None)
        if i is not None and i < n:
            add(int(i))
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    writer.add_add_bos_token(bool(adds_bos))
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)


def tokenizer_fields(folder: Path, cfg: LlamaConfig) -> dict[str, Any]:
    """The GGUF ``tokenizer.*`` fields of ``folder`` (see the module), as the ``gguf``
    package holds them: built once, written into every type's file."""
    import gguf

    writer = gguf.GGUFWriter(None, check_exportable(cfg))  # a holder: never written
    source = folder / "fleetlm_source.json"
    gguf_source = json.loads(source.read_text()).get("gguf") if source.is_file() else None
    if gguf_source and Path(gguf_source).is_file():
        _copy_tokenizer(writer, Path(gguf_source))
    else:
        _built_tokenizer(writer, folder, cfg)
    return {k: v for k, v in writer.kv_data[0].items() if k.startswith("tokenizer.")}


def write_gguf(folder: Path, state: dict[str, torch.Tensor], cfg: LlamaConfig, out: Path,
               qtype: str, *, name: str, tokenizer: dict[str, Any] | None = None) -> Path:
    """``state`` (Hugging Face names, ``folder``'s config and tokenizer) as a GGUF file of
    type ``qtype`` at ``out``; written beside it under a temporary name, then renamed.
    ``tokenizer``: :func:`tokenizer_fields` of ``folder``, when already built."""
    import gguf

    if qtype not in GGUF_TYPES:
        raise ModelLoadError(f"GGUF type {qtype!r}: choose from {', '.join(GGUF_TYPES)}")
    arch = check_exportable(cfg)
    fields = tokenizer if tokenizer is not None else tokenizer_fields(folder, cfg)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _model_fields(writer, cfg, qtype, name)
        for key, v in fields.items():
            writer.add_key_value(key, v.value, v.type, sub_type=v.sub_type)
        for hf, t in sorted(state.items()):
            gname = gguf_name(hf)
            if gname is None or (cfg.tie_word_embeddings and hf == "lm_head.weight"):
                continue
            w = t.detach().to(torch.float32).numpy()
            if arch == "llama" and ".attn_q." in gname:
                w = permute(w, cfg.num_heads)
            elif arch == "llama" and ".attn_k." in gname:
                w = permute(w, cfg.num_kv_heads)
            _tensor(writer, gname, w, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
