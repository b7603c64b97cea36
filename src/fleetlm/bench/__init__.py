"""Benchmarks behind ``fleetlm bench``: each compares against its baselines in one run,
prints a table and writes JSON. Timing lives here, never in unit tests.

    decode.py        single-stream decode and TTFT: fleetlm vs transformers vs llama.cpp
    adapters.py      many adapters in one batch: the engine vs transformers + PEFT
    hf_baselines.py  the transformers / PEFT baselines ``adapters.py`` runs
    workload.py      the adapters benchmark's requests and random adapters
    serve.py         the HTTP server's overhead, and llama-cpp-python's server
    tune.py          ``fleetlm tune`` end to end, and its loop against transformers' Trainer
    route.py         routers on RouteLLM's recorded outcomes or on the CLINC150 adapter
    pii.py           PII detection precision / recall / F2 on a labelled dataset
    rss.py           peak resident memory over a block of code
    common.py        fixed prompts, medians, environment facts, JSON out

The top of the house: benchmarks import the packages they measure, and only the command
line (``fleetlm.cli``) imports them; nothing in serving, routing or tuning knows they exist.
Long stages report through :mod:`fleetlm.progress` (plain lines when not on a terminal).
"""
