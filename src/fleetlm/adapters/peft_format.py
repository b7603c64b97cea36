"""Read and validate one PEFT LoRA adapter folder against a base model's config.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r],
``<module>`` a Hugging Face module name such as ``model.layers.3.self_attn.q_proj``.
Pickled weights (``adapter_model.bin``) are never read.

Two depths of checking:

- :func:`inspect_folder` reads the config and the safetensors *header* only (key names,
  shapes, dtypes): every problem except non-finite values, in milliseconds;
- :func:`load_folder` does that, then reads the tensors, converts them to the store's
  dtype and rejects NaN/inf.

Which modules ``target_modules`` / ``layers_to_transform`` / ``exclude_modules`` select,
and each module's rank and alpha under ``rank_pattern`` / ``alpha_pattern``, follow
PEFT's own matching rules (``check_target_module_exists`` and ``get_pattern_key`` in
peft 0.21), so a folder PEFT loads cleanly is accepted and its scales agree with PEFT's.
The regexes among them come from the uploaded file, so they run on RE2 in linear time
(:mod:`fleetlm.adapters.user_regex`); one RE2 cannot run (lookaround, backreferences) or
longer than 1,000 characters is refused, naming the key.
This module knows nothing about tiers, caching or where folders live; the store does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fleetlm.adapters.errors import AdapterError
from fleetlm.adapters.user_regex import (
    MAX_PATTERNS,
    PatternError,
    compile_user_regex,
)
from fleetlm.models.config import LlamaConfig

ADAPTER_NAME_RE = r"[A-Za-z0-9._-]{1,64}"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

# the block each projection lives in: model.layers.N.<parent>.<target>
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
_MODULE = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<parent>[A-Za-z0-9_]+)\.(?P<target>[A-Za-z0-9_]+)")
_NAME = re.compile(ADAPTER_NAME_RE)
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# PEFT's default target_modules for the Llama family when a config leaves it out
_DEFAULT_TARGETS = ("q_proj", "v_proj")
_FIX_PLAIN = "fleetlm serves plain LoRA: retrain or re-save the adapter without it"
# how PEFT wraps a rank_pattern/alpha_pattern key and a layers_pattern entry (the '{}')
_KEY_TEMPLATE = r"(.*\.)?({})$"
_LAYERS_TEMPLATE = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."
# PEFT's layer index when layers_pattern is empty: the first numbered segment (our own regex)
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoraModule:
    """One adapted projection of one layer: delta W = scale * B @ A."""

    a: Tensor  # [r, in], in the store's dtype
    b: Tensor  # [out, r]
    scale: float  # alpha/r, or alpha/sqrt(r) with rsLoRA


@dataclass
class LoadedAdapter:
    name: str
    rank: int  # the largest rank over modules
    modules: dict[str, LoraModule]  # "model.layers.3.self_attn.q_proj" -> module
    config: dict[str, Any]  # adapter_config.json as read
    nbytes: int  # bytes of all A and B tensors in the store's dtype


@dataclass(frozen=True)
class ModuleSpec:
    """What the header says about one module (no tensor data)."""

    rank: int
    alpha: float
    scale: float
    in_features: int
    out_features: int


@dataclass(frozen=True)
class FolderSpec:
    """A folder whose config and safetensors header passed every check."""

    name: str
    folder: Path
    config: dict[str, Any]
    modules: dict[str, ModuleSpec]  # HF module name -> spec, sorted by name
    weights_bytes: int  # size of adapter_model.safetensors on disk

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def targets(self) -> tuple[str, ...]:
        present = {m.rsplit(".", 1)[1] for m in self.modules}
        return tuple(t for t in LORA_TARGETS if t in present)

    @property
    def base_model(self) -> str | None:
        base = self.config.get("base_model_name_or_path")
        return str(base) if base else None


def valid_adapter_name(name: object) -> bool:
    """Whether ``name`` can name an adapter (see :func:`check_name`)."""
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and not name.startswith(".")


def check_name(name: str) -> None:
    """Adapter names are ``[A-Za-z0-9._-]{1,64}``; a leading '.' is reserved for the
    store's temporary folders (and keeps '.' and '..' out)."""
    if not valid_adapter_name(name):
        raise AdapterError(
            str(name),
            "invalid adapter name: use 1-64 letters, digits, '.', '_' or '-', not starting "
            "with '.' (to add a folder by path, use `fleetlm adapters add PATH --name NAME`)",
        )


def projection_dims(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-capable projection of the base model."""
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def module_names(cfg: LlamaConfig) -> list[str]:
    """Every module an adapter may target, in Hugging Face names."""
    return [f"model.layers.{n}.{_PARENT[t]}.{t}" for n in range(cfg.num_layers) for t in LORA_TARGETS]


# --- PEFT's matching rules ------------------------------------------------------------


class PatternKeys:
    """The keys of a rank_pattern/alpha_pattern, compiled once (RE2), in order."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._keys = [(key, compile_user_regex(key, _KEY_TEMPLATE)) for key in patterns]

    def key(self, module: str) -> str | None:
        """The first key matching ``module`` as a regex suffix, or None: what
        peft.utils.other.get_pattern_key matches with ``re.match(_KEY_TEMPLATE)``."""
        for key, rx in self._keys:
            if rx.match(module):
                return key
        return None


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first rank_pattern/alpha_pattern key matching ``module`` as a regex suffix
    (peft.utils.other.get_pattern_key), or None."""
    return PatternKeys(patterns).key(module)


class _Selector:
    """Which modules PEFT puts LoRA on for one config
    (peft.tuners.tuners_utils.check_target_module_exists), its regexes compiled once."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        exclude = config.get("exclude_modules")
        self.exclude = exclude or None
        self.exclude_rx = compile_user_regex(exclude) if isinstance(exclude, str) and exclude else None
        targets = config.get("target_modules")
        self.targets = list(_DEFAULT_TARGETS) if targets is None else targets
        self.target_rx = None
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.target_rx = compile_user_regex(self.targets)
        layers = config.get("layers_to_transform")
        self.layers = None if layers is None or (isinstance(layers, list) and not layers) else layers
        self.layer_rx: list[Any] = []
        if self.layers is not None and not isinstance(self.targets, str):
            self.layer_rx = [_LAYER_INDEX] if not (pattern := config.get("layers_pattern")) else [
                compile_user_regex(p, _LAYERS_TEMPLATE)
                for p in ([pattern] if isinstance(pattern, str) else pattern)]

    def selects(self, module: str) -> bool:
        if self.exclude_rx is not None:
            if self.exclude_rx.fullmatch(module):
                return False
        elif self.exclude and (module in self.exclude
                               or any(module.endswith(f".{e}") for e in self.exclude)):
            return False
        targets = self.targets
        if isinstance(targets, str):
            if self.target_rx is None:  # "all-linear": PEFT expands it to every linear layer but the head
                return module.rsplit(".", 1)[1] in LORA_TARGETS
            return self.target_rx.fullmatch(module) is not None
        if module not in targets and not any(module.endswith(f".{t}") for t in targets):
            return False
        if self.layers is None:
            return True
        match = None
        for rx in self.layer_rx:
            match = rx.match(module)
            if match is not None:
                break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == self.layers if isinstance(self.layers, int) else idx in self.layers


def _selected(config: Mapping[str, Any], module: str) -> bool:
    """Whether PEFT would put LoRA on ``module`` (peft.tuners.tuners_utils.check_target_module_exists)."""
    return _Selector(config).selects(module)


# --- config checks --------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def _set(v: Any) -> bool:
    """An option counts as used when it is not null/false/empty."""
    return v is not None and v is not False and v != [] and v != {} and v != ""


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """Every reason this adapter_config.json is not a plain LoRA fleetlm can serve."""
    p: list[str] = []
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        p.append(f"peft_type is {peft_type!r}; fleetlm serves LoRA adapters only (peft_type 'LORA')")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        p.append(f"task_type is {task!r}; fleetlm serves causal language models "
                 "(train with task_type='CAUSAL_LM')")
    if config.get("bias", "none") != "none":
        p.append(f"bias={config.get('bias')!r} trains base-model biases, which are not in the "
                 "adapter's LoRA weights; retrain with bias='none'")
    if config.get("fan_in_fan_out"):
        p.append("fan_in_fan_out=true stores weights transposed (GPT-2 Conv1D layers); Llama "
                 "projections are nn.Linear: retrain with fan_in_fan_out=false")
    if _set(config.get("modules_to_save")):
        p.append(f"modules_to_save={config['modules_to_save']} ships full copies of base-model "
                 f"modules (often after adding tokens); {_FIX_PLAIN}")
    variants = {"use_dora": "DoRA", "alora_invocation_tokens": "activated LoRA (aLoRA)",
                "use_qalora": "QA-LoRA", "use_bdlora": "block-diagonal LoRA",
                "arrow_config": "Arrow routing", "kasa_config": "KaSA",
                "monteclora_config": "MonteCLoRA", "lora_bias": "a bias on lora_B",
                "target_parameters": "target_parameters (LoRA on raw parameters)",
                "trainable_token_indices": "trainable token embeddings",
                "layer_replication": "layer replication"}
    for key, what in variants.items():
        if _set(config.get(key)):
            p.append(f"{key} is set: {what} is not supported; {_FIX_PLAIN}")
    init = str(config.get("init_lora_weights", True)).lower()
    for prefix in ("pissa", "olora", "corda", "lora_ga", "loftq"):
        if init.startswith(prefix):
            p.append(f"init_lora_weights={config['init_lora_weights']!r} changes the base weights "
                     "the adapter applies to; convert it to a plain LoRA of the original base "
                     "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        p.append(f"r={r!r} must be a positive integer")
    if not _is_number(config.get("lora_alpha")):
        p.append(f"lora_alpha={config.get('lora_alpha')!r} must be a finite number")
    if not isinstance(config.get("use_rslora", False), bool):
        p.append(f"use_rslora={config.get('use_rslora')!r} must be true or false")
    for key, check, what in (("rank_pattern", _is_int, "a positive integer"),
                             ("alpha_pattern", _is_number, "a finite number")):
        pat = config.get(key) or {}
        if not isinstance(pat, dict):
            p.append(f"{key} must be an object mapping module patterns to values")
            continue
        for k, v in pat.items():
            if not check(v) or (key == "rank_pattern" and v <= 0):
                p.append(f"{key}[{_shown(k)}]={v!r} must be {what}")
    p.extend(_pattern_problems(config))
    p.extend(_target_problems(config))
    return p


def _shown(pattern: str) -> str:
    return repr(pattern) if len(pattern) <= 100 else f"{pattern[:100]!r}..."


def _pattern_problems(config: Mapping[str, Any]) -> list[str]:
    """The regexes PEFT would run, other than a target_modules string: each must compile
    with RE2 (see user_regex), as PEFT writes it."""
    p: list[str] = []
    for key in ("rank_pattern", "alpha_pattern"):
        pat = config.get(key) or {}
        if not isinstance(pat, dict):
            continue  # reported by config_problems
        if len(pat) > MAX_PATTERNS:
            p.append(f"{key} has {len(pat)} keys; the limit is {MAX_PATTERNS} (name groups of "
                     "modules with one pattern)")
            continue
        for k in pat:
            try:
                compile_user_regex(k)  # on its own too, as this check always did
                compile_user_regex(k, _KEY_TEMPLATE)
            except PatternError as e:
                p.append(f"{key} key {_shown(k)} {e}")
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and exclude:
        try:
            compile_user_regex(exclude)
        except PatternError as e:
            p.append(f"exclude_modules {_shown(exclude)} {e}")
    pattern = config.get("layers_pattern")
    layers = config.get("layers_to_transform")
    if pattern and layers not in (None, []) and not isinstance(config.get("target_modules"), str):
        patterns = [pattern] if isinstance(pattern, str) else pattern
        if not isinstance(patterns, list) or len(patterns) > MAX_PATTERNS:
            p.append(f"layers_pattern={_shown(str(pattern))} must be a pattern or a list of at "
                     f"most {MAX_PATTERNS} of them")
            return p
        for one in patterns:
            try:
                compile_user_regex(one, _LAYERS_TEMPLATE)
            except PatternError as e:
                p.append(f"layers_pattern {_shown(str(one))} {e}")
    return p


def _target_problems(config: Mapping[str, Any]) -> list[str]:
    supported = ", ".join(LORA_TARGETS)
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return []
    if isinstance(targets, str):
        try:
            rx = compile_user_regex(targets)
        except PatternError as e:
            return [f"target_modules {_shown(targets)} {e}"]
        bad = [m for m in ("lm_head", "model.embed_tokens") if rx.fullmatch(m)]
        if bad:
            return [f"target_modules {targets!r} matches {', '.join(bad)}; fleetlm applies LoRA "
                    f"to {supported} only: retrain with target_modules limited to those"]
        return []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        return [f"target_modules={targets!r} must be a list of module names or a regex string"]
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in LORA_TARGETS]
    if unknown:
        return [f"unknown target module{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in "
                f"target_modules; fleetlm applies LoRA to {supported} only: retrain with "
                "target_modules limited to those"]
    layers = config.get("layers_to_transform")
    if layers is not None and not _is_int(layers) and not (
            isinstance(layers, list) and all(_is_int(x) for x in layers)):
        return [f"layers_to_transform={layers!r} must be a layer index or a list of them"]
    return []


# --- reading a folder -----------------------------------------------------------------


def _file(name: str, folder: Path, filename: str, inside: Path | None) -> Path:
    path = folder / filename
    if inside is not None and path.exists():
        real = path.resolve()
        if not real.is_relative_to(inside):
            raise AdapterError(name, f"{path} is a symlink to {real}, outside the adapter store "
                                     f"{inside}; add the adapter with `fleetlm adapters add` instead")
    return path


def read_config(name: str, folder: Path, inside: Path | None = None) -> dict[str, Any]:
    """adapter_config.json of ``folder`` after checking the folder holds the two files."""
    config_path = _file(name, folder, CONFIG_FILE, inside)
    weights = _file(name, folder, WEIGHTS_FILE, inside)
    problems = []
    if not config_path.is_file():
        problems.append(f"{folder} has no {CONFIG_FILE}; a PEFT adapter folder holds {CONFIG_FILE} "
                        f"and {WEIGHTS_FILE} (write one with PeftModel.save_pretrained)")
    if not weights.is_file():
        pickles = [f for f in PICKLE_FILES if (folder / f).is_file()]
        if pickles:
            problems.append(
                f"{folder} has only {', '.join(pickles)} (pickle), which fleetlm never loads: it can "
                "run code. Convert it: load it with peft and save_pretrained(..., safe_serialization=True)")
        else:
            problems.append(f"{folder} has no {WEIGHTS_FILE}; re-save the adapter with "
                            "PeftModel.save_pretrained")
    if problems:
        raise AdapterError(name, *problems)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(name, f"{config_path} is not valid JSON ({e}); re-save the adapter") from e
    except OSError as e:
        raise AdapterError(name, f"{config_path} cannot be read ({e})") from e
    if not isinstance(config, dict):
        raise AdapterError(name, f"{config_path} must hold a JSON object, not {type(config).__name__}")
    return config


def _read_header(name: str, path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), str(f.get_slice(k).get_dtype()))
                    for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(name, f"{path} is corrupt or truncated ({e}); copy it again or "
                                 "re-save the adapter") from e


def inspect_folder(name: str, folder: Path, base: LlamaConfig | None, max_rank: int,
                   inside: Path | None = None) -> FolderSpec:
    """Every check short of reading tensor data; raises AdapterError listing all problems.

    ``base=None`` skips the checks against the base model (layer count, in/out sizes).
    ``inside``: a folder every file must really live in (symlinks out of it are refused).
    """
    config = read_config(name, folder, inside)
    problems = config_problems(config)
    if problems:
        raise AdapterError(name, *problems)
    weights = folder / WEIGHTS_FILE
    header = _read_header(name, weights)
    modules, problems = _check_header(config, header, base, max_rank)
    if problems:
        raise AdapterError(name, *problems)
    return FolderSpec(name, folder, config, modules, weights.stat().st_size)


def _check_header(config: Mapping[str, Any], header: Mapping[str, tuple[tuple[int, ...], str]],
                  base: LlamaConfig | None, max_rank: int) -> tuple[dict[str, ModuleSpec], list[str]]:
    p: list[str] = []
    parts: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}  # module -> "A"/"B" -> (key, shape)
    not_lora: list[str] = []
    unknown: dict[str, str] = {}  # module -> first key
    for key, (shape, dtype) in header.items():
        m = _KEY.fullmatch(key)
        if m is None:
            not_lora.append(key)
            continue
        module = m.group("module")
        mm = _MODULE.fullmatch(module)
        if mm is None or mm.group("target") not in LORA_TARGETS or _PARENT[mm.group("target")] != mm.group("parent"):
            unknown.setdefault(module, key)
            continue
        if dtype not in _FLOAT_DTYPES:
            p.append(f"tensor {key} has dtype {dtype}; LoRA weights must be floating point")
        parts.setdefault(module, {})[m.group("ab")] = (key, shape)
    if not_lora:
        shown = ", ".join(not_lora[:3]) + (f" (+{len(not_lora) - 3} more)" if len(not_lora) > 3 else "")
        p.append(f"tensor keys that are not LoRA weights: {shown}; expected "
                 f"base_model.model.<module>.lora_A.weight and .lora_B.weight only ({_FIX_PLAIN})")
    for module, key in unknown.items():
        p.append(f"tensor {key} adapts {module!r}, an unknown target module; fleetlm applies LoRA "
                 f"to {', '.join(LORA_TARGETS)} of model.layers.N only: retrain with target_modules "
                 "limited to those")
    if not header:
        p.append(f"{WEIGHTS_FILE} holds no tensors; re-save the adapter")

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank_keys, alpha_keys = PatternKeys(rank_pattern), PatternKeys(alpha_pattern)
    use_rslora = bool(config.get("use_rslora", False))
    dims = projection_dims(base) if base is not None else None
    modules: dict[str, ModuleSpec] = {}
    shape_problem = False
    too_big: list[tuple[int, str]] = []
    wrong_rank: list[str] = []
    for module in sorted(parts, key=_module_order):
        ab = parts[module]
        if "A" not in ab or "B" not in ab:
            have, miss = ("A", "B") if "A" in ab else ("B", "A")
            p.append(f"{ab[have][0]} has no matching lora_{miss}; the file is incomplete: re-save the adapter")
            continue
        (a_key, a_shape), (b_key, b_shape) = ab["A"], ab["B"]
        if len(a_shape) != 2 or len(b_shape) != 2:
            p.append(f"{a_key} {a_shape} and {b_key} {b_shape} must both be matrices")
            continue
        mm = _MODULE.fullmatch(module)
        assert mm is not None
        layer, target = int(mm.group("layer")), mm.group("target")
        r = a_shape[0]
        if b_shape[1] != r:
            p.append(f"{a_key} has rank {r} but {b_key} has {b_shape[1]} columns; they must agree")
            continue
        r_key = rank_keys.key(module)
        want_r = rank_pattern[r_key] if r_key is not None else config["r"]
        if r != want_r:
            why = f"rank_pattern[{r_key!r}]" if r_key is not None else "r"
            wrong_rank.append(f"{a_key} has rank {r} but adapter_config.json sets {why}={want_r} for it")
        if r > max_rank:
            too_big.append((r, module))
        if dims is not None and base is not None:
            if layer >= base.num_layers:
                p.append(f"{a_key} is for layer {layer}, but the base model has layers "
                         f"0..{base.num_layers - 1}")
                shape_problem = True
                continue
            in_f, out_f = dims[target]
            if a_shape[1] != in_f:
                p.append(f"{a_key}: shape {a_shape}, expected ({r}, {in_f}) for the base model's {target}")
                shape_problem = True
            if b_shape[0] != out_f:
                p.append(f"{b_key}: shape {b_shape}, expected ({out_f}, {r}) for the base model's {target}")
                shape_problem = True
        a_key_ = alpha_keys.key(module)
        alpha = float(alpha_pattern[a_key_] if a_key_ is not None else config["lora_alpha"])
        modules[module] = ModuleSpec(r, alpha, lora_scale(alpha, r, use_rslora), a_shape[1], b_shape[0])
    if wrong_rank:
        more = f" (and {len(wrong_rank) - 1} more modules)" if len(wrong_rank) > 1 else ""
        p.append(f"{wrong_rank[0]}{more}; the config and the weights do not belong together: "
                 "re-save the adapter")
    if too_big:
        r = max(rank for rank, _ in too_big)
        module = next(m for rank, m in too_big if rank == r)  # the first, in layer order
        p.append(f"rank {r} ({module}) exceeds the configured maximum {max_rank} (raise --max-lora-rank)")
    if shape_problem:
        base_name = config.get("base_model_name_or_path")
        p.insert(0, "the adapter does not fit this base model"  # first: the details may be cut
                 + (f" (it was trained on {base_name})" if base_name else "")
                 + "; serve it with the base model it was trained on")
    if base is not None and not p:
        p.extend(_selection_problems(config, set(modules), base))
    return modules, p


def _selection_problems(config: Mapping[str, Any], present: set[str], base: LlamaConfig) -> list[str]:
    """The weights must cover exactly the modules the config selects, as PEFT would."""
    selector = _Selector(config)
    expected = {m for m in module_names(base) if selector.selects(m)}
    missing = sorted(expected - present, key=_module_order)
    extra = sorted(present - expected, key=_module_order)
    p = []
    if missing:
        p.append(f"{CONFIG_FILE} selects {len(missing)} module(s) with no weights in {WEIGHTS_FILE} "
                 f"(e.g. {', '.join(missing[:3])}): the file is incomplete or the adapter was trained "
                 "on a base model with other layers; re-save it")
    if extra:
        p.append(f"{WEIGHTS_FILE} has weights for {len(extra)} module(s) that target_modules/"
                 f"layers_to_transform do not select (e.g. {', '.join(extra[:3])}); fix "
                 f"{CONFIG_FILE} or re-save the adapter")
    return p


def _module_order(module: str) -> tuple[int, int, str]:
    m = _MODULE.fullmatch(module)
    if m is None or m.group("target") not in LORA_TARGETS:
        return (1 << 30, 0, module)
    return (int(m.group("layer")), LORA_TARGETS.index(m.group("target")), module)


def load_folder(name: str, folder: Path, base: LlamaConfig | None, max_rank: int,
                dtype: torch.dtype = torch.float32, inside: Path | None = None) -> LoadedAdapter:
    """Full validation (header, then every tensor finite) and the tensors in ``dtype``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    spec = inspect_folder(name, folder, base, max_rank, inside)
    path = folder / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(name, f"{path} is corrupt or truncated ({e}); copy it again or "
                                 "re-save the adapter") from e
    modules: dict[str, LoraModule] = {}
    bad: list[str] = []
    nbytes = 0
    for module, ms in spec.modules.items():
        tensors = []
        for ab in ("A", "B"):
            key = f"base_model.model.{module}.lora_{ab}.weight"
            if key not in state:  # the file changed since the header was read
                raise AdapterError(name, f"{path} changed while it was read ({key} is gone); retry")
            t = state[key].to(dtype).contiguous()
            if not bool(torch.isfinite(t).all()):
                bad.append(key)
            tensors.append(t)
            nbytes += t.numel() * t.element_size()
        modules[module] = LoraModule(tensors[0], tensors[1], ms.scale)
    if bad:
        shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise AdapterError(name, f"non-finite values (NaN or inf) in {shown} as {str(dtype).removeprefix('torch.')}; "
                                 "the training diverged or the file is damaged: retrain or re-export it")
    return LoadedAdapter(name, spec.rank, modules, dict(spec.config), nbytes)
