"""The learned model as a presidio recognizer (``LearnedRecognizer``), so its spans go
through presidio's analyzer with the pattern recognizers' ones: the same thresholds,
duplicate removal and allow-lists.

presidio calls a recognizer one text at a time. To run the model batched, the detector
calls :meth:`LearnedRecognizer.precomputed` with the whole batch's predictions (made
outside the analyzer's lock) around its per-text loop; ``analyze`` then only looks its
text up. A text it was not handed (a direct ``AnalyzerEngine.analyze`` call) is predicted
on the spot. The hand-over is a ContextVar, so concurrent batches in other threads never
see each other's predictions.

Scores are the model's mean tag probability over the span's word pieces (not presidio's
flat 0.85 for spaCy), so ``PiiConfig.score_threshold`` applies to them too.

This module imports presidio: only detect.py imports it, when the analyzer is built.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from presidio_analyzer import AnalysisExplanation, LocalRecognizer, RecognizerResult

from fleetlm.privacy.learned.labels import LEARNED_TYPES, CharSpan
from fleetlm.privacy.learned.model import LearnedNer

_PRECOMPUTED: ContextVar[dict[str, list[CharSpan]] | None] = ContextVar(
    "fleetlm_learned_precomputed", default=None)


class LearnedRecognizer(LocalRecognizer):  # type: ignore[misc]
    """PERSON, LOCATION, ORGANIZATION, DATE_TIME, NRP and (in files trained since it was
    added) TITLE from the fine-tuned MiniLM: the types its weights file was trained on."""

    NAME = "LearnedRecognizer"
    EXPLANATION = "Identified as {} by fleetlm's learned recognizer (MiniLM + LoRA)"

    def __init__(self, ner: LearnedNer, supported_language: str = "en") -> None:
        self.ner = ner
        self.types = tuple(t for t in LEARNED_TYPES if f"B-{t}" in ner.meta.labels)
        super().__init__(supported_entities=list(self.types),
                         supported_language=supported_language, name=self.NAME)

    def load(self) -> None:
        """Nothing: the model is loaded before the recognizer is built."""

    @staticmethod
    @contextmanager
    def precomputed(texts: Sequence[str], spans: Sequence[list[CharSpan]]) -> Iterator[None]:
        """Within the block, ``analyze(text)`` answers from ``spans`` (aligned with texts)."""
        token = _PRECOMPUTED.set(dict(zip(texts, spans, strict=True)))
        try:
            yield
        finally:
            _PRECOMPUTED.reset(token)

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None
                ) -> list[RecognizerResult]:
        table = _PRECOMPUTED.get()
        spans = table.get(text) if table is not None else None
        if spans is None:
            spans = self.ner.predict([text])[0]
        wanted = set(entities) if entities else set(self.types)
        return [RecognizerResult(
            entity_type=s.entity_type, start=s.start, end=s.end, score=s.score,
            analysis_explanation=AnalysisExplanation(
                recognizer=self.NAME, original_score=s.score,
                textual_explanation=self.EXPLANATION.format(s.entity_type)),
            recognition_metadata={RecognizerResult.RECOGNIZER_NAME_KEY: self.NAME,
                                  RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id})
            for s in spans if s.entity_type in wanted]
