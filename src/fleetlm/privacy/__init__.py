"""PII round trip: redact personal data to ``<TYPE_N>`` placeholders before text leaves
the machine (router escalation, tuning data), restore the values in what comes back.

    redactor = PiiRedactor()                       # free; the model loads on first use
    mapping = PiiMapping()
    texts = [redactor.redact(m, mapping)[0] for m in messages]   # one mapping per request
    answer = restore(remote_answer, mapping)       # or StreamRestorer(mapping) for streams

Importing this package imports neither presidio nor spaCy. Privacy knows text, entity
types and placeholders; it knows nothing about the served models, routes, HTTP or where the text goes (its own
learned recognizer, in learned/, is a detector like spaCy).
"""

from fleetlm.privacy.config import DEFAULT_ENTITIES, PiiConfig
from fleetlm.privacy.detect import PiiDetectionError, PiiModelNotInstalled, PiiSpan
from fleetlm.privacy.mapping import PLACEHOLDER_RE, PiiMapping, format_placeholder
from fleetlm.privacy.pii import PiiRedactor
from fleetlm.privacy.restore import StreamRestorer, restore

__all__ = [
    "DEFAULT_ENTITIES",
    "PLACEHOLDER_RE",
    "PiiConfig",
    "PiiDetectionError",
    "PiiMapping",
    "PiiModelNotInstalled",
    "PiiRedactor",
    "PiiSpan",
    "StreamRestorer",
    "format_placeholder",
    "restore",
]
