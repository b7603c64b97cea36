"""Our Llama-family forward against transformers on tiny random configs (float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fleetlm.models.loader import load_model
from tests.conftest import FAMILIES

ATOL = 1e-4


def _hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(params=sorted(FAMILIES))
def pair(request, tiny_checkpoints):
    folder = tiny_checkpoints[request.param]
    ours = load_model(str(folder), dtype="float32", with_tokenizer=False)
    return request.param, ours.model, _hf(folder)


def test_prefill_logits_match(pair):
    family, ours, hf = pair
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, 24))
    with torch.inference_mode():
        ref = hf(ids).logits
        cache = ours.allocate_cache(1, 64)
        got = ours(ids, torch.arange(24)[None], cache, torch.tensor([0]), 32, None)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("slot", [torch.tensor([1]), None], ids=["slot1-gather", "slot0-view"])
def test_decode_with_cache_matches(pair, slot):
    """Prefill 10 tokens (in two chunks), then decode 14 one at a time from the cache."""
    family, ours, hf = pair
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (1, 24))
    with torch.inference_mode():
        ref = hf(ids).logits[0]
        cache = ours.allocate_cache(2, 64)
        ours(ids[:, :6], torch.arange(6)[None], cache, slot, 8, None)
        out = ours(ids[:, 6:10], torch.arange(6, 10)[None], cache, slot, 16, torch.tensor([3]))
        torch.testing.assert_close(out[0], ref[9], atol=ATOL, rtol=0)
        for t in range(10, 24):
            step = ours(ids[:, t:t + 1], torch.tensor([[t]]), cache, slot, 32, torch.tensor([0]))
            torch.testing.assert_close(step[0], ref[t], atol=ATOL, rtol=0)


def test_batched_decode_rows_are_independent(pair):
    """Two sequences of different lengths decode in one batch, each matching transformers."""
    family, ours, hf = pair
    torch.manual_seed(3)
    a = torch.randint(0, 128, (1, 12))
    b = torch.randint(0, 128, (1, 7))
    with torch.inference_mode():
        ref_a, ref_b = hf(a).logits[0], hf(b).logits[0]
        cache = ours.allocate_cache(3, 64)
        # prefill both rows in one padded batch: row b is padded at the end
        ids = torch.zeros(2, 11, dtype=torch.long)
        ids[0], ids[1, :6] = a[0, :11], b[0, :6]
        pos = torch.arange(11).repeat(2, 1)
        slots = torch.tensor([2, 0])
        last = ours(ids, pos, cache, slots, 16, torch.tensor([10, 5]))
        torch.testing.assert_close(last[0], ref_a[10], atol=ATOL, rtol=0)
        torch.testing.assert_close(last[1], ref_b[5], atol=ATOL, rtol=0)
        step = ours(torch.tensor([[a[0, 11]], [b[0, 6]]]), torch.tensor([[11], [6]]), cache, slots, 16,
                    torch.tensor([0, 0]))
        torch.testing.assert_close(step[0], ref_a[11], atol=ATOL, rtol=0)
        torch.testing.assert_close(step[1], ref_b[6], atol=ATOL, rtol=0)


def test_config_flags_reach_the_model(tiny_checkpoints):
    cfgs = {f: load_model(str(p), dtype="float32", with_tokenizer=False).config
            for f, p in tiny_checkpoints.items()}
    assert cfgs["qwen2-bias"].attention_bias and not cfgs["llama"].attention_bias
    assert cfgs["qwen3-qknorm"].qk_norm and cfgs["qwen3-qknorm"].head_dim == 32
    assert cfgs["mistral-window"].sliding_window == 8
    assert cfgs["smollm2-tied"].tie_word_embeddings
    assert cfgs["llama3-rope"].rope_scaling["rope_type"] == "llama3"
    g = cfgs["gemma3"]
    assert g.sliding_layers == (True, False, True) and g.sliding_window == 4
    assert g.attn_scale == pytest.approx(24**-0.5) and g.hidden_act == "gelu_pytorch_tanh"
    assert g.rope_theta == 1_000_000.0 and g.rope_local_theta == 10000.0
    assert not any((cfgs["llama"].embed_scale, cfgs["llama"].sandwich_norms,
                    cfgs["llama"].two_kinds))
