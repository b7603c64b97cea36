"""``fleetlm tune``: raw rows -> cleaned, anonymised, expanded, filtered -> LoRA -> evaluated -> published.

    config.py      the typed tune config (YAML, read through fleetlm.config)
    pipeline.py    the stages in order, each cached by what it depends on; progress lines
    load.py        data files -> rows (records.py: the one row type)
    prepare.py     clean, deduplicate, anonymise
    synthesize.py  ask a teacher endpoint for more rows; filter.py keeps the good ones
    format.py      rows -> prompt token ids with the loss on the answer only
    train.py       the LoRA / full fine-tuning loop
    evaluate.py    score the tuned adapter and the untuned base on the validation rows
    card.py        the model card published beside the adapter

Tuning writes standard PEFT adapter folders into an adapter store and uses the engine
only as a client (to evaluate). It knows nothing about the server's insides or routing: a
teacher, or a running server to publish to, is reached over its OpenAI-style HTTP API.
"""
