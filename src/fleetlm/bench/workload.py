"""The workload of ``fleetlm bench adapters``: prompts, which adapter each request uses,
and a set of random PEFT LoRA adapters to serve.

Everything here is deterministic in its seed, so the engine and every baseline see the
same requests in the same order. This module measures nothing and knows nothing about
engines; it only says what to send.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetlm.bench.common import REFERENCE_TEXT
from fleetlm.errors import ConfigError

POPULARITIES = ("uniform", "zipf")
# rank-16 LoRA on every projection of a Llama block (PEFT's module names)
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MANIFEST = "adapter_set.json"


@dataclass(frozen=True)
class AdapterWorkload:
    num_requests: int = 256
    concurrency: int = 32
    prompt_tokens: int = 64
    max_new_tokens: int = 64
    num_adapters: int = 0  # 0 = no adapters
    popularity: str = "uniform"  # "uniform" | "zipf"
    zipf_s: float = 1.0
    rank: int = 16
    seed: int = 0

    def validate(self) -> None:
        """Raise one ConfigError naming every bad field and what it must be."""
        problems = []
        for name in ("num_requests", "concurrency", "prompt_tokens", "max_new_tokens", "rank"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_adapters < 0:
            problems.append(f"num_adapters={self.num_adapters} must be >= 0 (0 = no adapters)")
        if self.popularity not in POPULARITIES:
            problems.append(f"popularity={self.popularity!r} must be one of {', '.join(POPULARITIES)}")
        if not self.zipf_s > 0:
            problems.append(f"zipf_s={self.zipf_s} must be > 0")
        if problems:
            raise ConfigError("invalid adapter workload: " + "; ".join(problems))

    def assignment(self) -> list[int | None]:
        return assign_adapters(self.num_requests, self.num_adapters, self.popularity, self.seed,
                               self.zipf_s)


def adapter_name(i: int) -> str:
    """The folder (and PEFT adapter) name of adapter ``i``: a000, a001, ..."""
    return f"a{i:03d}"


def make_prompts(tokenizer: Any, n: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    """``n`` prompts of exactly ``prompt_tokens`` token ids: windows of REFERENCE_TEXT
    (repeated as needed) at distinct offsets chosen by ``seed``. Windows are distinct while
    ``n`` is at most the number of tokens in the text; beyond that offsets repeat."""
    text_ids: list[int] = tokenizer(REFERENCE_TEXT, add_special_tokens=False)["input_ids"]
    period = len(text_ids)
    ids = list(text_ids)
    while len(ids) < period + prompt_tokens:  # every offset in [0, period) has a full window
        ids += text_ids
    offsets = list(range(period))
    random.Random(seed).shuffle(offsets)
    return [ids[o:o + prompt_tokens] for o in (offsets[i % period] for i in range(n))]


def assign_adapters(n_requests: int, n_adapters: int, popularity: str, seed: int,
                    zipf_s: float = 1.0) -> list[int | None]:
    """The adapter index of each request, or None for every request when ``n_adapters`` is 0.

    uniform: each adapter ``n_requests // n_adapters`` or one more times, in shuffled order
    (so every adapter is used when ``n_requests >= n_adapters``).
    zipf: drawn independently with P(i) proportional to 1 / (i + 1) ** zipf_s, so a000 is
    the most popular.
    """
    if popularity not in POPULARITIES:
        raise ConfigError(f"popularity={popularity!r} must be one of {', '.join(POPULARITIES)}")
    if n_adapters == 0:
        return [None] * n_requests
    rng = random.Random(seed)
    if popularity == "uniform":
        picks = [i % n_adapters for i in range(n_requests)]
        rng.shuffle(picks)
    else:
        weights = [1.0 / (i + 1) ** zipf_s for i in range(n_adapters)]
        picks = rng.choices(range(n_adapters), weights=weights, k=n_requests)
    return list(picks)


def make_adapter_set(out_dir: Path, base_config: Any, n: int, rank: int = 16, seed: int = 0, *,
                     alpha: float | None = None, std: float = 0.02) -> list[Path]:
    """``n`` PEFT LoRA folders ``out_dir/a000 ..`` for a model of ``base_config`` (a
    :class:`fleetlm.models.config.LlamaConfig`), written by
    :func:`fleetlm.adapters.random.make_random_adapter`: rank ``rank`` on all seven
    projections, ``lora_alpha = 2 * rank`` unless given, A and B both N(0, std^2) -- so,
    unlike PEFT's zero-initialised B, every adapter changes the output.

    Adapter ``i`` depends only on (seed, i) and the spec, not on ``n``: a cached set of 256
    also serves 8. Folders that already exist with the same spec (``adapter_set.json``) are
    reused; a different spec regenerates them.
    """
    from fleetlm.adapters.random import make_random_adapter

    alpha = 2 * rank if alpha is None else alpha
    spec = {"format": 1, "writer": "fleetlm.adapters.random", "base": dataclasses.asdict(base_config),
            "rank": rank, "alpha": alpha, "std": std, "seed": seed, "targets": list(ALL_PROJECTIONS)}
    spec = json.loads(json.dumps(spec))  # tuples -> lists, as they will read back
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / _MANIFEST
    try:
        same = json.loads(manifest.read_text()) == spec
    except (OSError, json.JSONDecodeError):
        same = False
    if not same:
        for old in out_dir.glob("a[0-9][0-9][0-9]*"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        manifest.write_text(json.dumps(spec, indent=2))
    folders = []
    for i in range(n):
        folder = out_dir / adapter_name(i)
        if not (folder / "adapter_config.json").is_file():
            tmp = out_dir / f".{adapter_name(i)}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            make_random_adapter(tmp, base_config, rank=rank, alpha=alpha, targets=ALL_PROJECTIONS,
                                seed=seed * 1_000_003 + i, std=std)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)  # a half-written adapter never looks finished
        folders.append(folder)
    return folders
