"""Exceptions that users see. Each message names the thing at fault and the fix."""


class FleetLMError(Exception):
    """Base class for every error fleetlm raises on purpose."""


class ModelLoadError(FleetLMError):
    """A model could not be loaded: the message names the path and the problem."""


class ConfigError(FleetLMError):
    """A setting is invalid: the message names the field and the fix.

    ``param`` is the request field at fault (``temperature``, ``messages``, ``model``...)
    when the setting came from a request; the HTTP layer reports it as the error's
    ``param`` as it is, never parsed back out of the message."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class StateError(FleetLMError):
    """The state store (keys, tenants, audit log, ledger) cannot be used as asked: the
    message names the option, field or command at fault and the fix. Defined here so the
    HTTP error map needs no import of fleetlm.state; ``fleetlm.state.StateError`` is this."""


class EngineBusy(FleetLMError):
    """The request queue is full; retry later (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailable(FleetLMError):
    """No engine could take or finish the request: the replica serving it died, or none
    could be started (HTTP 503 with Retry-After; the request may be retried)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s
