"""Slow tests on the real embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""

from __future__ import annotations

import pytest
import torch

from fleetlm.engine.generate import Generator
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.models.loader import load_model
from fleetlm.models.registry import resolve_embedded

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm_f32():
    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="module")
def hf_reference():
    """transformers' own GGUF loader (not our converter) as the reference."""
    from transformers import AutoModelForCausalLM

    path = resolve_embedded("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def _chat_ids(lm, question: str) -> list[int]:
    out = lm.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_greedy_32_tokens_match_transformers_generate(smollm_f32, hf_reference):
    prompts = ["The history of the river town began", "def fibonacci(n):"]
    gen = Generator(smollm_f32, max_len=256)
    for text in prompts:
        ids = smollm_f32.tokenizer(text)["input_ids"]
        ours = gen.generate(ids, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
        with torch.inference_mode():
            ref = hf_reference.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                        do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        pad_token_id=smollm_f32.tokenizer.pad_token_id or 0)
        assert ours.token_ids == ref[0, len(ids):].tolist(), text


def test_prefill_logits_match_transformers(smollm_f32, hf_reference):
    ids = smollm_f32.tokenizer("A quick check of every logit on a real checkpoint.")["input_ids"]
    m = smollm_f32.model
    with torch.inference_mode():
        cache = m.allocate_cache(1, 64)
        ours = m(torch.tensor([ids]), torch.arange(len(ids))[None], cache, torch.tensor([0]), 64)
        ref = hf_reference(torch.tensor([ids])).logits
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)


def test_chat_template_answers_paris(smollm_f32):
    gen = Generator(smollm_f32, max_len=256)
    ids = _chat_ids(smollm_f32, "What is the capital of France?")
    out = gen.generate(ids, SamplingParams(max_tokens=24, temperature=0.0))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model ends its turn with <|im_end|>
    assert "<|im_end|>" not in out.text


def test_int8_and_bfloat16_still_answer(smollm_f32):
    for dtype, quant in (("bfloat16", "none"), ("auto", "int8")):
        lm = load_model("smollm2-135m", dtype=dtype, quantize=quant)
        out = Generator(lm, max_len=128).generate(
            _chat_ids(lm, "What is the capital of France?"),
            SamplingParams(max_tokens=24, temperature=0.0))
        assert "Paris" in out.text, (dtype, quant, out.text)


def test_stop_string_and_logprobs_on_real_tokenizer(smollm_f32):
    gen = Generator(smollm_f32, max_len=256)
    ids = smollm_f32.tokenizer("1, 2, 3, 4, 5,")["input_ids"]
    full = gen.generate(ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3))
    assert all(lp is not None and lp <= 0 for lp in full.logprobs)
    assert all(len(t) == 3 and t[0][1] >= t[1][1] >= t[2][1] for t in full.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert [t[0][0] for t in full.top_logprobs] == full.token_ids
    assert " 7" in full.text
    cut = gen.generate(ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[" 7"]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(" 7")]


def test_seeded_sampling_reproduces(smollm_f32):
    gen = Generator(smollm_f32, max_len=128)
    ids = smollm_f32.tokenizer("Once upon a time")["input_ids"]
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    a, b = gen.generate(ids, p), gen.generate(ids, p)
    c = gen.generate(ids, SamplingParams(**{**p.__dict__, "seed": 99}))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_compiled_decode_matches_eager(smollm_f32):
    """torch.compile (or its eager fallback) must not change greedy output."""
    ids = smollm_f32.tokenizer("The compiled path and the eager path")["input_ids"]
    p = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    eager = Generator(smollm_f32, max_len=256).generate(ids, p)
    gen = Generator(smollm_f32, max_len=256, compile=True)
    gen.warmup((len(ids) + 1,))
    assert gen.compiled, "torch.compile fell back to eager (is a C++ compiler installed?)"
    assert gen.generate(ids, p).token_ids == eager.token_ids
