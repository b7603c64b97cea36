"""Fixtures of the export and compression tests: a tiny Llama with a small tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def small_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer of ~400 tokens trained here
    (SmolLM2's 49k-token vocabulary makes every GGUF read take seconds), special tokens and
    a chat template: the shape of SmolLM2's tokenizer, small."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fleetlm.bench.harness import save_tiny_llama

    folder = tmp_path_factory.mktemp("small-base")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = ["Refund my card, please: order 12345!", "Où est ma carte? Hello world.",
            "The quick brown fox jumps over the lazy dog 0987654321."] * 50
    bpe.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", additional_special_tokens=SPECIAL[1:])
    tok.chat_template = CHAT_TEMPLATE
    return save_tiny_llama(folder, tok, hidden_size=64, intermediate_size=96,
                           max_position_embeddings=256)
