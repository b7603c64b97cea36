"""Load a Llama-family model and its tokenizer from one source.

Sources, tried in this order:

1. an embedded default by name (``smollm2-135m``), see :mod:`fleetlm.models.registry`;
2. a local Hugging Face folder (``config.json`` + ``*.safetensors`` + tokenizer files);
3. a local GGUF file (or a folder holding exactly one ``.gguf`` and no ``config.json``);
4. a hub id ``org/name``, fetched with ``huggingface_hub`` (optional; needs network).

The tokenizer and chat template always come from the same source as the weights.
Errors name the path and the problem. Pickled checkpoints are never read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fleetlm.errors import ModelLoadError
from fleetlm.models.config import LlamaConfig
from fleetlm.models.llama import LlamaForCausalLM
from fleetlm.models.registry import EMBEDDED_MODELS, resolve_embedded

DType = Literal["auto", "float32", "bfloat16"]
Quantize = Literal["auto", "none", "int8", "int4"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    name: str  # what the user asked for
    folder: Path  # the Hugging Face folder the weights were read from
    model: LlamaForCausalLM
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    config: LlamaConfig
    dtype: torch.dtype
    quantize: str

    @property
    def stop_token_ids(self) -> list[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bfloat16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    raise ModelLoadError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16")


def resolve_source(spec: str) -> Path:
    """Turn a model name, path or hub id into a local Hugging Face folder."""
    from fleetlm.models.gguf_convert import converted_folder

    if spec in EMBEDDED_MODELS:
        return converted_folder(resolve_embedded(spec))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be .gguf; pass a Hugging Face folder otherwise")
        return converted_folder(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return converted_folder(ggufs[0])
        raise ModelLoadError(
            f"{path}: not a model folder (no config.json"
            + (f", and {len(ggufs)} .gguf files: pass one of them)" if ggufs else " and no .gguf file)")
        )
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _download_from_hub(spec)
    known = ", ".join(sorted(EMBEDDED_MODELS))
    raise ModelLoadError(
        f"{spec}: no such file or folder, and not an embedded model name (known: {known}) "
        "or a hub id of the form org/name"
    )


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelLoadError(f"{repo_id}: loading from the hub needs huggingface_hub") from e
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=["config.json", "generation_config.json", "*.safetensors",
                            "*.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
                            "chat_template.*", "*.model"],
        )
    except Exception as e:
        raise ModelLoadError(
            f"{repo_id}: could not fetch from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Download it elsewhere and pass the local folder instead."
        ) from e
    return Path(folder)


def read_config(folder: Path) -> LlamaConfig:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelLoadError(f"{path}: missing; a model folder needs config.json") from e
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e
    gen = folder / "generation_config.json"
    if gen.is_file():  # generation_config's eos list is the one chat models stop on
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                raw["eos_token_id"] = eos
        except json.JSONDecodeError:
            pass
    return LlamaConfig.from_hf(raw, source=str(path))


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {pickles}: pickled weights are never loaded; convert them to safetensors)" if pickles else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weights{hint}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"{f}: corrupt or unreadable safetensors file ({e})") from e
    return state


def load_weights(model: LlamaForCausalLM, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy ``state`` (Hugging Face names) into ``model``; fused projections are stacked
    from their parts. Every missing, unexpected or misshapen tensor is reported at once."""
    from fleetlm.models.llama import hf_sources

    problems: list[str] = []
    used: set[str] = set()
    tied = model.config.tie_word_embeddings
    for name, param in model.named_parameters():
        if name == "lm_head.weight" and tied:
            continue
        sources = hf_sources(model.config, name, tuple(param.shape))
        # parts that are present are expected even when a sibling part is missing
        used.update(s for s, _ in sources if s in state)
        missing = [s for s, _ in sources if s not in state]
        if missing:
            problems.append(f"missing tensor {', '.join(missing)}")
            continue
        # each part is checked on its own: parts misshapen in ways that cancel out
        # (q too big, k too small) would otherwise stack to the right total shape
        bad = [f"{s}: shape {tuple(state[s].shape)} but the config implies {shape}"
               for s, shape in sources if tuple(state[s].shape) != shape]
        if bad:
            problems.extend(bad)
            continue
        param.data.copy_(torch.cat([state[s] for s, _ in sources]) if len(sources) > 1
                         else state[sources[0][0]])
        if model.config.norm_plus_one and name.endswith("norm.weight"):
            param.data.add_(1.0)  # Gemma applies its RMSNorm weights as 1 + w
    ignorable = ("rotary_emb.inv_freq",)
    extra = [k for k in state if k not in used and not k.endswith(ignorable)]
    if tied and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")
    if extra:
        problems.append(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if problems:
        raise ModelLoadError(f"{folder}: weights do not match config.json: " + "; ".join(problems))


def resolve_quantize(quantize: str, device: str = "cpu") -> str:
    """``auto``: int8 on a CPU where fleetlm's int8 kernel built with a vector path (AVX2,
    AVX-512 or NEON) -- it reads a quarter of float32's bytes per decode step and measured
    1.4x (one stream) to 3x (32 rows) float32's speed on SmolLM2-135M (docs/engine.md);
    float weights elsewhere (GPUs, a CPU with neither, no C++ compiler). ``int4`` (4-bit
    group-wise, :func:`quantize_int4`) is only used when asked for."""
    if quantize in ("none", "int8", "int4"):
        return quantize
    if quantize != "auto":
        raise ModelLoadError(f"--quantize {quantize!r} is not one of auto, none, int8, int4")
    if not device.startswith("cpu"):
        return "none"
    from fleetlm.kernels import int8_gemv

    if not int8_gemv.load():
        return "none"
    from fleetlm.kernels.cpu import kernel_isa

    return "none" if kernel_isa().get("int8_linear", "scalar") == "scalar" else "int8"


def quantize_int8(model: LlamaForCausalLM) -> None:
    """Replace every projection (and the LM head) with weight-only int8, in place."""
    from fleetlm.kernels import int8_gemv
    from fleetlm.models.layers import Int8Linear, Linear

    dtype = model.dtype
    on_cpu = model.model.embed_tokens.weight.device.type == "cpu"
    use_kernel = on_cpu and int8_gemv.load()  # builds once (~10 s), cached afterwards
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, child_name, Int8Linear.from_linear(child, dtype, use_kernel))


def quantize_int4(model: LlamaForCausalLM, group_size: int = 32, head: str = "int8"
                  ) -> dict[str, str]:
    """Replace every projection with 4-bit group-wise weights, in place; the LM head gets
    ``head`` ("int8", the default, or "int4").

    Format: ``fleetlm.kernels.int4_gemv`` (asymmetric 4-bit codes, a float32 scale and min
    per ``group_size`` weights along the input dim). The LM head stays int8 by default: on
    SmolLM2-135M a 4-bit head alone costs ~8% perplexity, int8 ~0% (docs/engine.md). A
    tied head is quantised as a projection only: the embedding lookup keeps the float
    table. A projection whose input size is not a multiple of ``group_size`` stays int8
    (per channel, :class:`Int8Linear`). Returns {module name: "int4" | "int8"}.
    """
    from fleetlm.kernels import int4_gemv, int8_gemv
    from fleetlm.models.layers import Int4Linear, Int8Linear, Linear

    if head not in ("int8", "int4"):
        raise ValueError(f"head={head!r}: 'int8' or 'int4'")
    dtype = model.dtype
    on_cpu = model.model.embed_tokens.weight.device.type == "cpu"
    use_kernel = on_cpu and int4_gemv.load()
    formats: dict[str, str] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, Linear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            is_head = child is getattr(model, "lm_head", None)
            new: Int4Linear | Int8Linear
            if child.in_features % group_size == 0 and (head == "int4" or not is_head):
                new = Int4Linear.from_linear(child, dtype, use_kernel, group_size)
                formats[name] = "int4"
            else:
                new = Int8Linear.from_linear(child, dtype, on_cpu and int8_gemv.load())
                formats[name] = "int8"
            setattr(parent, child_name, new)
    return formats


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise ModelLoadError(f"{folder}: could not load the tokenizer ({type(e).__name__}: {e})") from e


def load_model(
    spec: str,
    dtype: DType | str = "auto",
    quantize: Quantize | str = "none",
    max_positions: int | None = None,
    device: str = "cpu",
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load weights + tokenizer from ``spec`` (name, folder, .gguf file or hub id).

    ``with_tokenizer=False`` is for weight-only folders (tests, benchmarks of the forward).
    """
    quantize = resolve_quantize(quantize, device)
    torch_dtype = resolve_dtype(dtype, device)
    folder = resolve_source(spec)
    cfg = read_config(folder)
    state = read_state_dict(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions=max_positions)
    model = model.to_empty(device="cpu")  # no random init: every tensor is overwritten
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # type: ignore[assignment]
    load_weights(model, state, folder)
    del state
    model = model.to(device=device, dtype=torch_dtype)
    _init_rope(model, max_positions)  # meta tensors had no values; tables stay float32
    if quantize == "int8":
        quantize_int8(model)
    elif quantize == "int4":
        quantize_int4(model)
    model.eval()
    tokenizer = load_tokenizer(folder) if with_tokenizer else None
    return LoadedModel(spec, folder, model, tokenizer, cfg, torch_dtype, quantize)


def _init_rope(model: LlamaForCausalLM, max_positions: int | None) -> None:
    from fleetlm.models.llama import rope_tables

    c = model.config
    cos, sin = rope_tables(c, max_positions or c.max_position_embeddings)
    device = model.model.embed_tokens.weight.device
    model.rope_cos = cos.to(device)
    model.rope_sin = sin.to(device)
    from fleetlm.models.llama import Attention

    for module in model.modules():  # meta tensors had no values: the layer kinds too
        if isinstance(module, Attention):
            module.kind_index = torch.tensor([int(module.kind or 0)], device=device)
