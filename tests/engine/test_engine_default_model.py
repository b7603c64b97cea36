"""Slow: the engine on the real default model with random adapters, against transformers +
PEFT (adapter merged into the weights), greedy, float32, token for token."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from fleetlm.adapters import AdapterStore
from fleetlm.adapters.random import make_random_adapter
from fleetlm.engine.engine import Engine, EngineConfig
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.models.loader import load_model

pytestmark = pytest.mark.slow
NEW = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lm = load_model("smollm2-135m", dtype="float32")
    root = tmp_path_factory.mktemp("adapters")
    make_random_adapter(root / "all7", lm.config, rank=8, alpha=16, seed=1, std=0.05)
    make_random_adapter(root / "attn-rs", lm.config, rank=16, alpha=8, seed=2, std=0.05,
                        use_rslora=True, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    return lm, root


def _peft_greedy(folder, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _hf_greedy(folder, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_engine_matches_transformers_peft_merged(setup):
    lm, root = setup
    store = AdapterStore(root, lm.config, dtype=torch.float32, max_rank=16)
    engine = Engine(lm, EngineConfig(max_running=4, max_len=256, max_hot_adapters=2), store=store)
    river = "The history of the river town began"
    cases = [(river, "all7"), ("def fibonacci(n):", "attn-rs"), (river, None), (river, "attn-rs"),
             ("Three facts about the moon:", "all7")]
    prompts = [lm.tokenizer(t)["input_ids"] for t, _ in cases]
    got: dict[str, list[int]] = defaultdict(list)

    def on_event(ev):
        if ev.token_id is not None:
            got[ev.request_id].append(ev.token_id)

    # five requests, four rows: one waits and joins when a row frees (continuous batching)
    ids = [engine.submit(p, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True),
                         adapter=a, callback=on_event)
           for p, (_, a) in zip(prompts, cases, strict=True)]
    while engine.step():
        pass
    outs = [got[rid] for rid in ids]
    for out, p, (text, a) in zip(outs, prompts, cases, strict=True):
        ref = _hf_greedy(lm.folder, p) if a is None else _peft_greedy(lm.folder, root / a, p)
        assert out == ref, (text, a)
    # same prompt, three models: the adapters really change the answer
    assert outs[0] != outs[2] and outs[3] != outs[2] and outs[0] != outs[3]
