"""The OpenAI-compatible HTTP server over the engine: one room per step of a request.

In request-path order:

    app.py            create_app(): assembles the FastAPI app, its error handlers, routers
    protocol.py       the OpenAI shapes at the edge: request bodies, usage, SSE framing
    openai_routes.py  thin handlers: /health, /v1/models, /metrics, /v1/chat/completions,
                      /v1/completions
    hybrid.py         Router: a route's policy, PII redaction, upstreams, the ledger
                      (``fleetlm serve --config``)
    upstream_body.py  what an escalated request sends: an allow-list of the validated fields
    pii_fields.py     every free-text field of it redacted, every placeholder of the answer
                      restored (whole or streamed, tool calls included)
    local.py          LocalModel: the local model's path, request in, engine events out,
                      OpenAI JSON and chunks back
    adapters_api.py   /v1/adapters: list, load or upload, and delete adapters in the store
    errors.py         the one map from fleetlm's errors to OpenAI-shaped HTTP errors
    metrics.py        Prometheus metrics of one server
    run.py            a server process: build engine + app + routes, engine on the main
                      thread, HTTP on a second one, drain on SIGTERM (``fleetlm serve``)

This package knows HTTP and the OpenAI wire format. It does not know tokens, batching or
LoRA (the engine's), how adapters are tuned (it reads a tuned adapter's task card through
:mod:`fleetlm.adapters.task_card`, never :mod:`fleetlm.tune`), or the benchmarks.
"""
