"""The learned recognizer's forward, fused: the same logits as the merged transformers
``BertForTokenClassification`` in eval mode, with each layer's query, key and value
projections as one linear layer (one [hidden, 3 x hidden] product instead of three, and,
once quantised, one int8 quantisation of the layer's input instead of three) and the
attention through ``scaled_dot_product_attention`` with the padding mask as a boolean.

``FusedTagger(model)`` copies nothing it does not change: the embeddings, output
projections, layer norms and tag head are the model's own modules. It is what the int8
path quantises and traces (model.py); the transformers model stays the float32
reference it is tested against (tests/privacy/test_learned_model.py).

This module knows BERT's layout; nothing about tags, texts or presidio.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _Layer(nn.Module):
    def __init__(self, layer: Any) -> None:
        super().__init__()
        attn = layer.attention.self
        self.heads = int(attn.num_attention_heads)
        self.head_dim = int(attn.attention_head_size)
        hidden = self.heads * self.head_dim
        self.qkv = nn.Linear(hidden, 3 * hidden)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([attn.query.weight, attn.key.weight,
                                             attn.value.weight]))
            self.qkv.bias.copy_(torch.cat([attn.query.bias, attn.key.bias, attn.value.bias]))
        self.out = layer.attention.output.dense
        self.norm1 = layer.attention.output.LayerNorm
        self.up = layer.intermediate.dense
        self.act = layer.intermediate.intermediate_act_fn
        self.down = layer.output.dense
        self.norm2 = layer.output.LayerNorm

    def forward(self, h: Tensor, keep: Tensor) -> Tensor:
        b, t, hidden = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        h = self.norm1(h + self.out(a.transpose(1, 2).reshape(b, t, hidden)))
        return self.norm2(h + self.down(self.act(self.up(h))))


class FusedTagger(nn.Module):
    """(input_ids, attention_mask, token_type_ids) [B, T] -> tag logits [B, T, tags]."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        if model.training:
            raise ValueError("FusedTagger: put the model in eval mode first (it has no "
                             "dropout)")
        if getattr(model.config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("FusedTagger: only BERT's absolute position embeddings")
        self.embeddings = model.bert.embeddings
        self.layers = nn.ModuleList(_Layer(layer) for layer in model.bert.encoder.layer)
        self.classifier = model.classifier

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                token_type_ids: Tensor) -> Tensor:
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]: a query sees no padding
        for layer in self.layers:
            h = layer(h, keep)
        return self.classifier(h)
