"""The errors of PII detection, in a module of their own so that the detector
(detect.py) and the learned recognizer it loads (learned/) can both raise them without
importing each other. ``fleetlm.privacy`` and ``fleetlm.privacy.detect`` re-export them.

This module knows nothing but the error classes.
"""

from __future__ import annotations

from fleetlm.errors import FleetLMError


class PiiDetectionError(FleetLMError):
    """Detection failed, so the text was not redacted: it must not be sent on or stored."""


class PiiModelNotInstalled(PiiDetectionError):
    """A model detection needs is not installed; the message says which package to install."""
