"""GGUF (llama.cpp) file -> Hugging Face folder (config.json, model.safetensors, tokenizer).

Dequantising a GGUF and rebuilding its tokenizer takes tens of seconds in Python, so
the result is written once to a cache folder and every later load reads safetensors.
The folder is written under a temporary name and renamed into place, so a crash
never leaves a half-converted model that looks complete. The cache lives under
:func:`fleetlm.paths.cache_home`. This module knows GGUF's tensor names and metadata,
not our model classes: what it writes is an ordinary Hugging Face folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fleetlm.errors import ModelLoadError
from fleetlm.paths import cache_home

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 (llama.cpp's names): a norm before and after each block
GEMMA3_LAYER_NAMES = {
    **LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def cache_root() -> Path:
    """Where converted GGUF models live (rebuildable: deleting it costs a conversion)."""
    return cache_home() / "converted"


KEY_SCHEME = "sha256-v1"  # in every key, and in fleetlm_source.json: keyed by content


def _content_digest(path: Path) -> str:
    """The file's sha256, remembered in the cache home per (path, size, mtime): a GGUF is
    read through once, not at every start (0.2 s for the embedded 98 MB; seconds for a
    model of several GB)."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_home() / "gguf-digests.json"  # beside the converted folders, not among them
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(ident), str):
        return str(known[ident])
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    # entries of files that are gone (deleted checkouts) are dropped on the way
    known = {k: v for k, v in known.items() if Path(k.rsplit("|", 2)[0]).exists()}
    known[ident] = digest
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_name(f"{index.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known))
    tmp.replace(index)  # atomic: a concurrent writer's entry may be lost, never half-written
    return digest


def _cache_key(path: Path) -> str:
    """``<stem>-<12 hex digits of the file's sha256 and KEY_SCHEME>``: by content, so
    every checkout and virtual environment holding the same GGUF shares one conversion (a
    key by path and mtime made a new ~500 MB folder per fresh clone)."""
    h = hashlib.sha256(f"{_content_digest(path)}|{KEY_SCHEME}".encode())
    return f"{path.stem}-{h.hexdigest()[:12]}"


def _prune_orphans(root: Path, stem: str, keep: Path) -> None:
    """Remove converted folders of ``stem`` other than ``keep`` that nothing will read
    again: those whose source GGUF no longer exists (deleted checkouts), and those named by
    the older path-and-mtime key (their GGUF, if still there, now maps to a content key)."""
    for other in root.glob(f"{stem}-*"):
        if other == keep or not (other / "config.json").is_file():
            continue
        try:
            info = json.loads((other / "fleetlm_source.json").read_text())
            source = info["gguf"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if info.get("key") != KEY_SCHEME or not Path(source).exists():
            shutil.rmtree(other, ignore_errors=True)


def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        hf = (GEMMA3_LAYER_NAMES if arch == "gemma3" else LAYER_NAMES).get(part)
        return None if hf is None else f"model.layers.{idx}.{hf}.{suffix}"
    hf = GLOBAL_NAMES.get(base)
    return None if hf is None else f"{hf}.{suffix}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE layout)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _field(reader: object, key: str) -> object:
    f = reader.fields.get(key)  # type: ignore[attr-defined]
    if f is None:
        return None
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types and f.types[0].name == "STRING" else value[0].item()


def _gemma3_config(reader: object, cfg: dict[str, object]) -> dict[str, object]:
    """What a Gemma 3 config.json needs beyond what transformers reads from the GGUF, as
    llama.cpp runs the file: every sixth layer global, the others a sliding window with
    RoPE base 10,000; queries scaled by head_dim ** -0.5 (llama.cpp does so for every size
    but 27B, whose scale is hidden / heads: 27B is refused); GELU-tanh."""
    layers = int(cfg["num_hidden_layers"])  # type: ignore[call-overload]
    if layers == 62:
        raise ModelLoadError("Gemma 3 27B GGUF files are not supported (its query scale "
                             "differs); use a Hugging Face folder of it")
    scaling: dict[str, object] | None = None
    kind, factor = _field(reader, "gemma3.rope.scaling.type"), _field(reader, "gemma3.rope.scaling.factor")
    if kind not in (None, "none") and factor:
        scaling = {"rope_type": str(kind), "factor": float(factor)}  # type: ignore[arg-type]
    return {
        "model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": int(cfg["head_dim"]),  # type: ignore[call-overload]
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(layers)],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": cfg["rope_theta"],
                               **(scaling or {})},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
    }


def convert_gguf(path: Path, out_dir: Path) -> None:
    """Write config.json, model.safetensors and the tokenizer files of ``path`` into ``out_dir``."""
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors on a bad file
        raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from e
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else "?"
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not in the Llama family "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHS)})"
        )
    cfg = load_gguf_checkpoint(str(path))["config"]
    cfg.pop("_model_name_or_path", None)
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name, arch)
        if name is None:
            continue
        w = dequantize(t.data, t.tensor_type)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's 1 + w; Hugging Face stores w
        if arch == "llama" and ".attn_q." in t.name:
            w = _unpermute(w, n_head)
        elif arch == "llama" and ".attn_k." in t.name:
            w = _unpermute(w, n_kv)
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
    if "lm_head.weight" in tensors:
        cfg["tie_word_embeddings"] = False
    cfg.setdefault("architectures", [HF_ARCHITECTURES[arch]])
    if arch == "gemma3":
        cfg.update(_gemma3_config(reader, cfg))
    else:
        cfg["hidden_act"] = "silu"

    if arch == "gemma3":  # transformers' own conversion of it splits words into characters
        from fleetlm.models.gguf_tokenizer import gemma3_tokenizer

        tok = gemma3_tokenizer(reader)
        end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(end_of_turn, int) and end_of_turn != tok.unk_token_id:
            cfg["eos_token_id"] = [int(cfg["eos_token_id"]), end_of_turn]  # a chat turn's end
    else:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # transformers' GGUF tokenizer conversion can mislabel eos; the file's own ids win.
    for key, attr in (("tokenizer.ggml.eos_token_id", "eos_token"), ("tokenizer.ggml.bos_token_id", "bos_token")):
        f = reader.fields.get(key)
        if f is not None:
            setattr(tok, attr, tok.convert_ids_to_tokens(int(f.parts[f.data[0]][0])))

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(out_dir))
    (out_dir / "fleetlm_source.json").write_text(
        json.dumps({"gguf": str(path.resolve()), "key": KEY_SCHEME}))


def converted_folder(path: Path, show_progress: bool = True) -> Path:
    """The cached HF folder for GGUF ``path``, converting it first if needed."""
    target = cache_root() / _cache_key(path)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        if show_progress:
            from rich.console import Console

            with Console(stderr=True).status(f"Converting {path.name} (first use only)..."):
                convert_gguf(path, tmp)
        else:
            convert_gguf(path, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its folder is complete
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune_orphans(target.parent, path.stem, target)
    return target
