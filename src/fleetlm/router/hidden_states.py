"""Prompt embeddings from a fleetlm base model's own hidden states, for the ``classifier``
router: ``base:smollm2-135m`` is the embedded SmolLM2-135M's final-norm hidden states,
mean-pooled over the prompt's tokens and L2-normalised.

The forward is fleetlm's own Llama (``LlamaForCausalLM(..., return_hidden=True)``: every layer,
the final RMSNorm, no LM head), on the same weights the server serves; transformers only
tokenizes. Texts are tokenized as the model's tokenizer does by default, truncated to
``max_length`` tokens, sorted by length and run in right-padded batches: attention is causal and
every row's positions start at 0, so no real token sees a pad token and a prompt's embedding
does not depend on what it is batched with. Uses torch's current thread count: the caller
decides (``torch.set_num_threads``).

This module knows nothing about classifiers, thresholds or where embeddings are cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from fleetlm.models.llama import LlamaForCausalLM

BASE_PREFIX = "base:"


def hidden_state_spec(model_id: str) -> str | None:
    """The fleetlm model spec (a name, folder or .gguf file) of an embedding id
    ``base:SPEC``; None for any other id."""
    if model_id.startswith(BASE_PREFIX) and len(model_id) > len(BASE_PREFIX):
        return model_id[len(BASE_PREFIX):]
    return None


class HiddenStateEmbedder:
    """Mean-pooled, L2-normalised final hidden states of a fleetlm Llama-family model."""

    def __init__(self, model: LlamaForCausalLM, tokenizer: Any, model_id: str,
                 max_length: int = 256, batch_size: int = 16) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer  # transformers tokenizer: text -> input_ids
        self.model_id = model_id
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def load(cls, spec: str, max_length: int = 256, batch_size: int = 16,
             device: str = "cpu") -> HiddenStateEmbedder:
        """Load ``spec`` (what ``fleetlm serve --model`` takes) in float32. The id is
        ``base:SPEC``, with a local path made absolute so a saved router finds it again."""
        from fleetlm.models.loader import load_model
        from fleetlm.models.registry import EMBEDDED_MODELS

        lm = load_model(spec, dtype="float32", device=device)
        path = Path(spec).expanduser()
        name = spec if spec in EMBEDDED_MODELS or not path.exists() else str(path.resolve())
        return cls(lm.model, lm.tokenizer, BASE_PREFIX + name, max_length=max_length,
                   batch_size=batch_size)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [list(ids) for ids in enc["input_ids"]]

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """(len(texts), hidden) float32; a text with no tokens embeds as zeros."""
        import torch

        ids = self.token_ids(texts)
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        device = self.model.model.embed_tokens.weight.device
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = [i for i in order[start:start + self.batch_size] if ids[i]]
                if not idx:
                    continue
                B, S = len(idx), max(len(ids[i]) for i in idx)
                input_ids = torch.zeros(B, S, dtype=torch.long)  # pad with id 0: never attended
                real = torch.zeros(B, S, dtype=torch.bool)
                for row, i in enumerate(idx):
                    input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                    real[row, :len(ids[i])] = True
                positions = torch.arange(S).expand(B, S)
                cache = self.model.allocate_cache(B, S)
                hidden = self.model(input_ids.to(device), positions.to(device), cache, None, S,
                                    return_hidden=True).float()  # (B, S, hidden)
                mask = real.to(device).unsqueeze(-1).to(hidden.dtype)  # (B, S, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1)  # (B, hidden)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.cpu().numpy()
        return out
