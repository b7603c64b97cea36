"""Models leave fleetlm, and get smaller: merge an adapter into its base and export it as
a Hugging Face folder and GGUF files (``fleetlm export``), prune (``fleetlm prune``) and
distil (``fleetlm distill``); docs/compress.md.

    merge.py       base + adapter -> merged weights; the Hugging Face folder
    gguf_write.py  merged weights -> GGUF (f32, f16, q8_0, q4_0) with the gguf package
    export.py      ExportSettings and export(): both, with export.json
    prune.py       calibration-data pruning: Wanda zeros, MLP channels, KV groups, layers
    distill.py     a student trained on a teacher's logits (KL at a temperature)
"""
