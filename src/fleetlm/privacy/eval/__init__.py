"""Hand-labelled PII evaluation data: ``support_v1``, a second test set beside presidio's
synthetic one (issue 14, "Privacy v2"), so detection is not only measured on the
generator's templates.

What it is: close to 400 customer-support texts (support-ticket notes, e-mail sentences,
chat messages) written one by one by hand, with every piece of personal data labelled by
hand, in 18 types (PERSON, EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, IBAN_CODE, US_SSN,
IP_ADDRESS, URL, DOMAIN_NAME, STREET_ADDRESS, GPE, ZIP_CODE, DATE_TIME, ORGANIZATION,
US_BANK_NUMBER, US_DRIVER_LICENSE, US_PASSPORT, AGE). Names come from many cultures, with
diacritics, particles, nicknames, lower-case chat spelling and names that are also common
words; about one text in eight holds no personal data, and some hold capitalised words
that are not personal data (weekdays, products, "Visa", "Customer Service"). The people
and their numbers are invented (card numbers pass Luhn, IBANs pass mod-97, SSNs avoid the
ranges never issued; fictional phone ranges where a country has them); organisations,
places and street names are real names used in invented situations. The labelling rules
and the counts (``build.py --stats``) are in README.md beside this file.

Format: presidio's synthetic-set format (a JSON list of rows with ``full_text``,
``masked``, ``spans`` of ``entity_type``/``entity_value``/``start_position``/
``end_position``, ``template_id``, ``metadata``), with the synthetic set's type names, so
``fleetlm bench pii --data`` and its scorer read both. ``template_id`` is the line number in
``support_v1.txt``; ``metadata`` is ``{"source": "fleetlm-handlabelled-v1", "style":
"ticket" | "email" | "chat"}``.

License: written by the fleetlm authors for this project; Apache-2.0, like the project.

Rebuild (stdlib only, checks every line and fails with line numbers): edit
``support_v1.txt``, then ``python3 -m fleetlm.privacy.eval.build`` from ``src/`` (or
``python3 src/fleetlm/privacy/eval/build.py``); ``--check`` fails when the JSON is stale.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["support_v1_path"]


def support_v1_path() -> Path:
    """The installed ``support_v1.json`` (shipped as package data)."""
    return Path(__file__).resolve().parent / "support_v1.json"
