"""A Gemma 3 GGUF's tokenizer as a Hugging Face fast tokenizer.

transformers (5.x) turns a ``gemma3`` GGUF's vocabulary into a Unigram model whose
scores are llama.cpp's BPE merge ranks, and that model cuts every word into single
characters ("The" -> T, h, e). The file holds a SentencePiece BPE vocabulary (scores =
-rank), so it is rebuilt here as what it is: byte-level-fallback BPE whose merges come
from the scores (transformers' ``generate_merges``), spaces as U+2581, ``<bos>`` first;
control tokens (``<start_of_turn>``, ...) are special, user-defined ones (runs of newlines
or spaces, ``<table>``, ...) ordinary text that is never split (so decoding with
``skip_special_tokens`` keeps the newlines).

The base model ships without a chat template; :data:`GEMMA_CHAT_TEMPLATE` is Gemma's
turn format (``<start_of_turn>user`` / ``model`` ... ``<end_of_turn>``), a system message
going at the head of the first user turn, so ``fleetlm tune`` and chat requests can use
it. This module knows GGUF's tokenizer fields and nothing about weights.
"""

from __future__ import annotations

from typing import Any

# Gemma's turn markup; a system message's text opens the first user turn
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] | trim + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n"
    "{% if role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types kept whole


def _array(reader: Any, key: str) -> list[Any]:
    f = reader.fields[key]
    return [f.parts[i] for i in f.data]


def gemma3_tokenizer(reader: Any) -> Any:
    """A ``PreTrainedTokenizerFast`` of a Gemma 3 GGUF (gguf.GGUFReader ``reader``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    tokens = [bytes(p).decode("utf-8") for p in _array(reader, "tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in _array(reader, "tokenizer.ggml.scores")]
    types = [int(p[0]) for p in _array(reader, "tokenizer.ggml.token_type")]
    vocab = {t: i for i, t in enumerate(tokens)}
    special = [t for t, k in zip(tokens, types, strict=True) if k == CONTROL]
    whole = [t for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED]
    merges = generate_merges(vocab, dict(zip(tokens, scores, strict=True)),
                             skip_tokens=[*special, *whole])

    def token_id(key: str, default: int) -> int:
        f = reader.fields.get(key)
        return int(f.parts[f.data[0]][0]) if f is not None else default

    bos = tokens[token_id("tokenizer.ggml.bos_token_id", 2)]
    eos = tokens[token_id("tokenizer.ggml.eos_token_id", 1)]
    unk = tokens[token_id("tokenizer.ggml.unknown_token_id", 3)]
    pad = tokens[token_id("tokenizer.ggml.padding_token_id", 0)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True,
                               fuse_unk=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in whole])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        chat_template=GEMMA_CHAT_TEMPLATE, add_bos_token=True)
