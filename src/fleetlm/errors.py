"""Exceptions that users see. Each message names the thing at fault and the fix."""


class FleetLMError(Exception):
    """Base class for every error fleetlm raises on purpose."""


class ModelLoadError(FleetLMError):
    """A model could not be loaded: the message names the path and the problem."""


class ConfigError(FleetLMError):
    """A setting is invalid: the message names the field and the fix."""
