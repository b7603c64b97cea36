"""The hybrid router: small model first, a large OpenAI-compatible upstream when the small
one is unsure, personal data stripped on the way out, every request written to a ledger;
and the same router offline (train, calibrate, evaluate, report).

    config.py            the typed routes config (``fleetlm serve --config FILE``)
    policies.py          request -> score in [0, 1]; one ``decide(score, threshold)``
    calibrate.py         thresholds from data quantiles; outcomes and threshold files
    classifier.py        the trained router behind the ``classifier`` policy; embedders
    hidden_states.py     a base model's hidden states as a prompt embedding
    evaluate.py          routing curves, APGR, CPT, the report table and plot
    upstream.py          async client of the large upstreams: retries, timeouts, fallback chain
    ledger.py            the ledger of every request (state store: SQLite or PostgreSQL):
                         decision, tokens, cost, PII counts; a tenant's spend
    report.py            the savings report: --since, the table, its notes, the cost plot

The offline commands' work (``fleetlm route train|calibrate|eval``):

    options.py           their settings checked, every problem at once
    outcome_scores.py    an outcomes file's prompts embedded (with progress) and scored
    training.py          ``route train``: fit, cross-validate, report, save
    calibration_runs.py  ``route calibrate``: a threshold from outcomes or the ledger
    evaluation_runs.py   ``route eval``: the report, plot and JSON

The router knows nothing of HTTP or of the server that calls it (``fleetlm.server.hybrid``
wires it in), nothing of typer, and nothing of the benchmarks. Importing this package
imports none of its modules (no httpx, no sqlite, no YAML).
"""
