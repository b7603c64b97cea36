"""The adapter store: PEFT LoRA folders on disk (cold), validated and loaded into an LRU
in RAM (warm), handed to the engine, which keeps the hot ones in its stacked buffers.

    peft_format.py  read + validate one PEFT folder against the base model's config, and
                    PEFT's scale rule (lora_scale)
    user_regex.py   the regexes an adapter's config carries, compiled by RE2 (linear time)
    lru.py          warm-tier bookkeeping (byte budget, pins), no tensors
    folders.py      temporary names, the atomic replace, clean-up of crash leftovers
    store.py        AdapterStore: names, tiers, add/remove, thread-safe
    task_card.py    the task file a tuned adapter carries, read by tuning and serving alike
    random.py       random PEFT-format adapters for tests and benchmarks
    listing.py      the store as ``fleetlm adapters`` shows it (base config, JSON, table)

Adapters know the base model's config (shapes, layer count) but nothing about the engine
that serves them, its slots or its batching, nor about how an adapter was trained.
"""

from fleetlm.adapters.errors import AdapterError, AdapterNotFound
from fleetlm.adapters.peft_format import (
    ADAPTER_NAME_RE,
    LORA_TARGETS,
    LoadedAdapter,
    LoraModule,
)
from fleetlm.adapters.store import AdapterInfo, AdapterStore

__all__ = [
    "ADAPTER_NAME_RE",
    "LORA_TARGETS",
    "AdapterError",
    "AdapterInfo",
    "AdapterNotFound",
    "AdapterStore",
    "LoadedAdapter",
    "LoraModule",
]
