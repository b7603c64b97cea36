"""Compiled decode steps for :class:`~fleetlm.models.llama.LlamaForCausalLM`.

A decode step (one new token per row, rows ``0..B-1`` of the KV cache) runs the same 30
or so small layers every time, and eagerly most of its time is Python and operator
dispatch, not arithmetic. Two kinds of ``torch.compile`` graph remove that:

- **the whole layer stack, for one row without adapters** (single-stream decoding, the
  latency a user feels): one call per step. Compiling it takes about a minute for
  SmolLM2-135M on 2 cores the first time, seconds afterwards (inductor's on-disk cache).
- **one decoder layer, for everything else** (batches of 2 or more rows, adapters):
  regional compilation -- a layer sees its own cache and LoRA buffers as arguments and
  never its index, so all layers share one graph and compiling costs one layer. The
  ~0.15 ms of Dynamo per layer call is small beside a batch's matmuls.

Batch size and the attended length (the mask's last dimension) are dynamic in both, so no step recompiles (Dynamo keeps a
graph for a batch of one apart from the one for larger batches, as it must). Prefill
stays eager: its GEMMs dominate, and its shapes would multiply the graphs.

If compiling or running a graph fails (no C++ compiler, an unsupported op), the model
logs it once and decodes eagerly from then on; the eager pass rewrites the same cache
positions, so the step's result is unaffected. ``FLEETLM_COMPILE=0`` turns compilation
off. Inductor's cache lives in ``$TORCHINDUCTOR_CACHE_DIR``, by default
``~/.cache/fleetlm/inductor`` (:func:`use_cache_dir`), so it survives reboots.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch import nn

    from fleetlm.models.kv_cache import KVCache
    from fleetlm.models.lora_hook import LoraHook

log = logging.getLogger(__name__)

ENV_VAR = "FLEETLM_COMPILE"
_FALSE = {"0", "false", "no", "off"}


def compile_disabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() in _FALSE


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fleetlm" / "inductor"


def use_cache_dir() -> str:
    """Point inductor's cache at :func:`default_cache_dir` unless the user chose another
    place; the directory in use. Torch writes its own default (a folder under /tmp, lost at
    reboot) into ``$TORCHINDUCTOR_CACHE_DIR`` the first time anything asks for the cache,
    which can happen before the first compile (a plain ``setdefault`` then never took
    effect), so torch's default counts as unset here."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(torch_default()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(default_cache_dir())
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


# Compiled graphs of one code object (a decoder layer's forward) share torch's cache of
# them across every model of the process: each model compiled in it (fleetlm select tunes
# and serves one base after another; bench decode compiles a model per dtype) adds its
# own entries, about four per model (one stream; batches with and without adapters). At
# torch's default of 8 the second or third model fell back to eager decoding.
RECOMPILE_LIMIT = 64


def raise_recompile_limit() -> None:
    """Let torch keep RECOMPILE_LIMIT graphs per code object (never lowers a higher
    limit the user set)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(int(cfg.recompile_limit), RECOMPILE_LIMIT)


def run_layers(layers: Sequence[Callable[..., Tensor]], x: Tensor, cos: Tensor, sin: Tensor,
               positions: Tensor, mask: Tensor, cache: KVCache, slots: Tensor | None,
               lora: LoraHook | None) -> Tensor:
    """The decoder stack: each layer gets its own cache tensors and LoRA hook."""
    for i, layer in enumerate(layers):
        hook = lora.layer(i) if lora is not None else None
        x = layer(x, cos, sin, positions, mask, cache.k[i], cache.v[i], slots, hook)
    return x


class CompiledDecode:
    """The compiled graphs of one model's decode step (see the module docstring)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        use_cache_dir()
        raise_recompile_limit()
        eager = list(layers)

        def whole(*args: object) -> Tensor:
            return run_layers(eager, *args)  # type: ignore[arg-type]

        # dynamic=None: static except the dimensions _mark_dynamic names (everything dynamic
        # would "duck-size": a batch of 2 equal to the 2 KV heads, or a kv_len of 64 equal
        # to head_dim, becomes one symbol and then a constant, and the graph specialises)
        self._single = torch.compile(whole, dynamic=None, fullgraph=True)
        self._layers = [torch.compile(layer, dynamic=None, fullgraph=True) for layer in eager]
        self.failed = False

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, mask: Tensor,
                 cache: KVCache, lora: LoraHook | None) -> Tensor | None:
        """The decoder stack's output for a decode step, or None once compiling failed
        (the caller then runs it eagerly)."""
        if self.failed:
            return None
        _mark_dynamic(x, cos, sin, positions, mask, lora)
        try:
            if x.shape[0] == 1 and lora is None:
                return self._single(x, cos, sin, positions, mask, cache, None, None)
            return run_layers(self._layers, x, cos, sin, positions, mask, cache, None, lora)
        except Exception as e:  # inductor needs a C++ toolchain; eager always works
            log.warning("compiled decode failed (%s: %s); decoding eagerly from now on",
                        type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
            self.failed = True
            return None


def _mark_dynamic(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, mask: Tensor,
                  lora: LoraHook | None) -> None:
    """The batch (rows) and the attended length (the mask's last dimension) vary from
    step to step; every other size is fixed by the model and the cache."""
    mark = torch._dynamo.maybe_mark_dynamic
    if x.shape[0] > 1:
        for t in (x, cos, sin, positions, mask):
            mark(t, 0)
        slots = getattr(getattr(lora, "batch", None), "token_slots", None)
        if isinstance(slots, Tensor):
            mark(slots, 0)
    mark(mask, 3)
