"""The model side: Llama-family forward, its KV-cache layout, weight loading.

    config.py       LlamaConfig from a Hugging Face config.json
    layers.py       projections (float and int8), RMSNorm, rotary embeddings
    llama.py        the forward for prefill, chunked prefill and batched decode
    kv_cache.py     the preallocated KV cache and the kv-length buckets
    lora_hook.py    the protocol a multi-LoRA batch offers the forward (``lora=``)
    chat.py         chat messages -> prompt token ids (the model's chat template)
    loader.py       a model and tokenizer from an HF folder, a GGUF file, the hub, or an
                    embedded default (registry.py); gguf_convert.py turns GGUF into HF

Models know nothing about scheduling, sampling, requests or where adapters come from: a
forward takes explicit tensors (positions, cache slots, kv_len) and an optional LoRA hook.
Nothing here imports :mod:`fleetlm.engine`.
"""
