"""Errors of the adapter store. Every message names the adapter, the problem and the fix."""

from __future__ import annotations

from typing import Any

from fleetlm.errors import FleetLMError

MAX_SHOWN = 8  # an adapter for another base model can have hundreds of misshapen tensors


class AdapterError(FleetLMError):
    """An adapter cannot be stored, listed or loaded.

    ``problems`` holds every problem found (validation collects them all before raising);
    the message is ``adapter 'NAME': problem; problem ...``.
    """

    def __init__(self, adapter: str, *problems: str) -> None:
        if not problems:
            raise ValueError("AdapterError needs at least one problem")
        self.adapter = adapter
        self.problems = list(problems)
        shown = "; ".join(problems[:MAX_SHOWN])
        if len(problems) > MAX_SHOWN:
            shown += f"; ... and {len(problems) - MAX_SHOWN} more problems"
        super().__init__(f"adapter {adapter!r}: {shown}")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with its own arguments (an engine replica's refusal crosses processes)."""
        return type(self), (self.adapter, *self.problems), self.__dict__


class AdapterNotFound(AdapterError):
    """No adapter of that name is in the store."""
