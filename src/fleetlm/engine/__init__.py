"""The inference engine: requests in, tokens out, many adapters batched in one forward.

    engine.py           Engine: submit/stream requests; one thread runs the steps
    scheduler.py        who runs this step, which prompt chunks, which adapters are hot
                        (plain Python bookkeeping, no torch)
    rows.py             which KV-cache row each running sequence holds
    runner.py           one step on the model: batched decode + batched chunked prefill
    multi_lora.py       the hot adapters' stacked buffers, and the LoraContext the model
                        receives (it satisfies fleetlm.models.lora_hook.LoraHook)
    lora.py             the per-token multi-LoRA arithmetic and its reference twin
    sampler.py          logits -> next token (penalties, temperature, top-k/p, min-p)
    sampling_params.py  one request's sampling settings, validated
    structured.py       a token mask that keeps output inside a JSON schema or choices
    detokenizer.py      token ids -> text deltas, stop strings across token boundaries
    generate.py         single-stream generation (``fleetlm generate``, ``bench decode``)
    oneshot.py          one request through the batching engine (``generate --adapter``)

The engine knows nothing about HTTP, chat templates, routing or tuning, and nothing about
adapter files: the model's forward and KV layout are :mod:`fleetlm.models`', adapters
arrive validated from :mod:`fleetlm.adapters`.
"""
