"""Redaction: detected PII becomes ``<TYPE_N>`` placeholders, consistently per request.

:class:`PiiRedactor` is what the router (before escalating a request to a remote
model) and the tuning pipeline (before training data is stored or sent to a teacher)
call. Within one :class:`PiiMapping` a value always gets the same placeholder, across
all texts redacted with it (all messages of a chat request); exact whole-word repeats
of a value already detected are replaced too, even where the detector missed them.
Training rows get the same placeholder syntax as serving, so a tuned adapter sees at
training time exactly what it will see at serving time.

Fail closed: if detection fails, :class:`PiiDetectionError` is raised and no text --
redacted or not -- is returned.

Construction is free: presidio and spaCy are imported and the model loaded on the
first call (or :meth:`PiiRedactor.load`), once per process. This module knows nothing
about HTTP, chat formats or datasets; it maps strings to strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from fleetlm.privacy.config import PiiConfig
from fleetlm.privacy.detect import (
    PiiDetectionError,
    PiiSpan,
    detect_batches,
    get_analyzer,
    merge_overlaps,
)
from fleetlm.privacy.mapping import PiiMapping
from fleetlm.privacy.spans import whole_word_matches

__all__ = ["PiiDetectionError", "PiiRedactor", "PiiSpan"]


class PiiRedactor:
    """Detects PII with presidio + spaCy en_core_web_sm and swaps it for placeholders.

    Thread-safe; instances are cheap and share one analyzer per process and model.
    """

    def __init__(self, config: PiiConfig | None = None) -> None:
        self.config = config if config is not None else PiiConfig()

    def load(self) -> PiiRedactor:
        """Build the analyzer now (e.g. at server start, to fail early); returns self."""
        get_analyzer(self.config)
        return self

    # --- one request ----------------------------------------------------------------

    def redact(self, text: str, mapping: PiiMapping | None = None) -> tuple[str, PiiMapping]:
        """``text`` with its PII replaced, and the mapping that restores it. Pass the same
        mapping for every text of one request to get consistent placeholders."""
        mapping = mapping if mapping is not None else PiiMapping()
        for redacted, _ in self.iter_redact([text], mapping):
            return redacted, mapping
        raise AssertionError("unreachable: one text in, one out")

    # --- many texts (the tuning pipeline) -------------------------------------------------

    def redact_many(self, texts: Iterable[str], mapping: PiiMapping | None = None) -> list[str]:
        """Each text redacted with a fresh mapping (placeholders restart at _1 per text,
        as at serving time), or all with ``mapping`` when one is given (then each text is
        also searched for every value seen so far). Batched through spaCy's nlp.pipe."""
        return [redacted for redacted, _ in self.iter_redact(texts, mapping)]

    def iter_redact(self, texts: Iterable[str], mapping: PiiMapping | None = None
                    ) -> Iterator[tuple[str, PiiMapping]]:
        """(redacted text, its mapping) per text as detection batches complete; the
        mapping's counts() are what a ledger records."""
        for text, spans in detect_batches(texts, self.config):
            m = mapping if mapping is not None else PiiMapping()
            m.reserve_literals(text)
            parts: list[str] = []
            pos = 0
            for s in self._plan(text, spans, m):
                parts.append(text[pos:s.start])
                parts.append(m.placeholder_for(text[s.start:s.end], s.entity_type))
                pos = s.end
            parts.append(text[pos:])
            yield "".join(parts), m

    def iter_spans(self, texts: Iterable[str]) -> Iterator[list[PiiSpan]]:
        """The spans redact() would replace in each text (fresh mapping per text):
        detections merged with whole-word repeats, sorted, non-overlapping."""
        for text, spans in detect_batches(texts, self.config):
            yield self._plan(text, spans, PiiMapping())

    # --- internals --------------------------------------------------------------------

    def _plan(self, text: str, spans: list[PiiSpan], mapping: PiiMapping) -> list[PiiSpan]:
        """Detected spans plus repeats of known values, overlaps merged."""
        if not self.config.redact_repeats:
            return spans
        values: dict[str, str] = {}  # value -> entity type
        for value, entity_type in mapping.known_values():
            values.setdefault(value, entity_type)
        for s in spans:
            values.setdefault(text[s.start:s.end], s.entity_type)
        # repeats score 0.0: where one overlaps a detection, merge_overlaps keeps the
        # detection's type (and covers the union of both)
        extra = [PiiSpan(a, b, entity_type, 0.0)
                 for value, entity_type in values.items() if len(value.strip()) >= 2
                 for a, b in whole_word_matches(text, value)]
        return merge_overlaps([*spans, *extra]) if extra else spans
