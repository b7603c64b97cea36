"""The hybrid router: small model first, a large OpenAI-compatible upstream when the small
one is unsure, personal data stripped on the way out, every request written to a ledger.

    config.py       the typed routes config (``fleetlm serve --config FILE``)
    policies.py     request -> score in [0, 1]; one ``decide(score, threshold)``
    calibrate.py    thresholds from data quantiles (``fleetlm route calibrate``)
    classifier.py   the trained router behind the ``classifier`` policy
    upstream.py     async client of the large upstreams: retries, timeouts, fallback chain
    ledger.py       SQLite (WAL) ledger of every request: decision, tokens, cost, PII counts
    report.py       the savings report's --since parsing and cost-over-time plot

Importing this package imports none of its modules (no httpx, no sqlite, no YAML).
"""
