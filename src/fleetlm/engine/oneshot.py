"""One request through the batching engine, as a stream of token events: the path of
``fleetlm generate --adapter`` (the single-stream :mod:`fleetlm.engine.generate` applies no
adapter; the engine does).

It builds a one-row engine sized for the request and steps it on the caller's thread. It
knows nothing of tokenization, chat templates or the terminal: prompt ids in, events out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any


def stream_with_adapter(lm: Any, ids: list[int], params: Any, adapter: str,
                        adapters_dir: Path | None, max_lora_rank: int) -> Iterator[Any]:
    """The token events (text, token_id, finish_reason) of ``ids`` generated with
    ``adapter`` from the store at ``adapters_dir`` (default: the user data folder's); an
    error event is raised."""
    from fleetlm.adapters import AdapterStore
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.paths import default_adapters_dir

    store = AdapterStore(adapters_dir or default_adapters_dir(), lm.config, dtype=lm.model.dtype,
                         max_rank=max_lora_rank)
    engine = Engine(lm, EngineConfig(max_running=1, max_len=len(ids) + params.max_tokens + 1,
                                     max_hot_adapters=1, max_lora_rank=max_lora_rank), store=store)
    events: list[Any] = []
    engine.submit(ids, params, adapter=adapter, callback=events.append)
    while True:
        busy = engine.step()
        while events:
            ev = events.pop(0)
            if ev.error is not None:
                raise ev.error
            if ev.token_id is not None or ev.finish_reason is not None:
                yield ev
        if not busy:
            return
