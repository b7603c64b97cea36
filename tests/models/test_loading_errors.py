"""Loading: every bad input is a ModelLoadError naming the path and the problem; int8; GGUF."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fleetlm.errors import ModelLoadError
from fleetlm.models import gguf_convert
from fleetlm.models.layers import Int8Linear, Linear
from fleetlm.models.loader import load_model
from tests.conftest import make_hf_model


@pytest.fixture
def llama_dir(tiny_checkpoints, tmp_path) -> Path:
    """A private copy of the tiny llama checkpoint that a test may corrupt."""
    folder = tmp_path / "llama"
    shutil.copytree(tiny_checkpoints["llama"], folder)
    return folder


def load(path: Path | str, **kw):
    return load_model(str(path), **{"dtype": "float32", "with_tokenizer": False, **kw})


def load_error(path: Path | str, **kw) -> str:
    with pytest.raises(ModelLoadError) as info:
        load(path, **kw)
    return str(info.value)


def edit_weights(folder: Path, edit) -> None:
    f = folder / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f), metadata={"format": "pt"})


def test_the_copied_checkpoint_loads(llama_dir):
    """Sanity: the errors below come from the corruption, not from the copy."""
    assert load(llama_dir).config.num_layers == 2


# --------------------------------------------------------------------------- where


def test_nonexistent_path():
    msg = load_error("/nonexistent/x")
    assert "/nonexistent/x" in msg and "no such file or folder" in msg


def test_folder_without_config_or_gguf(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = load_error(empty)
    assert str(empty) in msg and "no config.json" in msg and "no .gguf" in msg


def test_folder_with_several_gguf_files_asks_for_one(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (folder / name).write_bytes(b"GGUF")
    msg = load_error(folder)
    assert str(folder) in msg and "2 .gguf files" in msg


def test_weights_without_config(llama_dir):
    (llama_dir / "config.json").unlink()
    msg = load_error(llama_dir)
    assert str(llama_dir) in msg and "no config.json" in msg


# --------------------------------------------------------------------------- config.json


def test_non_llama_architecture(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    msg = load_error(llama_dir)
    assert str(llama_dir / "config.json") in msg
    assert "unsupported architecture" in msg and "'gpt2'" in msg and "GPT2LMHeadModel" in msg


def test_config_not_json(llama_dir):
    (llama_dir / "config.json").write_text("{not json")
    msg = load_error(llama_dir)
    assert str(llama_dir / "config.json") in msg and "not valid JSON" in msg


def test_config_missing_required_keys(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    del cfg["hidden_size"], cfg["num_hidden_layers"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    msg = load_error(llama_dir)
    assert str(llama_dir / "config.json") in msg
    assert "missing required keys" in msg and "hidden_size" in msg and "num_hidden_layers" in msg


def test_unsupported_activation(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    msg = load_error(llama_dir)
    assert str(llama_dir / "config.json") in msg and "hidden_act='gelu'" in msg


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda b: b"\x00garbage!" * 200, id="garbage"),
        pytest.param(lambda b: b[: len(b) // 2], id="truncated-half"),
        pytest.param(lambda b: b[:-1], id="truncated-one-byte"),
        pytest.param(lambda b: b[:4], id="truncated-header"),
        pytest.param(lambda b: b"", id="empty"),
    ],
)
def test_corrupt_safetensors(llama_dir, corrupt):
    f = llama_dir / "model.safetensors"
    f.write_bytes(corrupt(f.read_bytes()))
    msg = load_error(llama_dir)
    assert str(f) in msg and "corrupt or unreadable safetensors" in msg


def test_tensor_with_wrong_shape(llama_dir):
    name = "model.layers.0.self_attn.q_proj.weight"

    def edit(state):
        state[name] = torch.zeros(60, 64)

    edit_weights(llama_dir, edit)
    msg = load_error(llama_dir)
    assert str(llama_dir) in msg
    assert f"{name}: shape (60, 64) but the config implies (64, 64)" in msg
    assert "k_proj" not in msg and "v_proj" not in msg  # only the culprit is named


def test_misshapen_parts_that_stack_to_the_right_total_are_caught(llama_dir):
    """q/k/v (and gate/up) are stacked into one fused weight; each part is checked alone."""
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"

    def edit(state):
        state[q] = torch.zeros(48, 64)  # 48 + 48 + 32 rows == 64 + 32 + 32
        state[k] = torch.zeros(48, 64)

    edit_weights(llama_dir, edit)
    msg = load_error(llama_dir)
    assert f"{q}: shape (48, 64) but the config implies (64, 64)" in msg
    assert f"{k}: shape (48, 64) but the config implies (32, 64)" in msg


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.weight",
                                  "model.layers.0.self_attn.k_proj.weight",
                                  "model.layers.1.mlp.up_proj.weight"])
def test_missing_tensor(llama_dir, name):
    edit_weights(llama_dir, lambda state: state.pop(name))
    msg = load_error(llama_dir)
    assert str(llama_dir) in msg and f"missing tensor {name}" in msg
    assert "unexpected" not in msg  # the missing tensor's siblings are not to blame


def test_unexpected_tensor(llama_dir):
    def edit(state):
        state["model.layers.0.mystery.weight"] = torch.zeros(3)

    edit_weights(llama_dir, edit)
    msg = load_error(llama_dir)
    assert str(llama_dir) in msg and "unexpected tensors" in msg and "mystery" in msg


def test_every_problem_is_listed_at_once(llama_dir):
    def edit(state):
        state.pop("model.norm.weight")
        state["model.embed_tokens.weight"] = torch.zeros(100, 64)

    edit_weights(llama_dir, edit)
    msg = load_error(llama_dir)
    assert "missing tensor model.norm.weight" in msg
    assert "model.embed_tokens.weight: shape (100, 64) but the config implies (128, 64)" in msg


class _Trap:
    """Unpickling this creates a folder: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_checkpoint_is_never_loaded(llama_dir, tmp_path):
    (llama_dir / "model.safetensors").unlink()
    marker = tmp_path / "pickle-was-executed"
    (llama_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    msg = load_error(llama_dir)
    assert str(llama_dir) in msg and "no *.safetensors" in msg
    assert "pytorch_model.bin" in msg and "pickled weights are never loaded" in msg
    assert not marker.exists()


# --------------------------------------------------------------------------- GGUF files


def test_file_that_is_not_gguf(llama_dir):
    f = llama_dir / "model.safetensors"
    msg = load_error(f)
    assert str(f) in msg and "must be .gguf" in msg


def test_gguf_with_garbage_content(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETLM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"this is not a gguf file at all" * 10)
    msg = load_error(f)
    assert str(f) in msg and "not a readable GGUF file" in msg
    # the failed conversion leaves nothing in the cache that could pass for a model
    leftovers = list((tmp_path / "cache" / "converted").iterdir())
    assert leftovers == []


def test_gguf_of_another_architecture(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("FLEETLM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(f), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = load_error(f)
    assert str(f) in msg and "'gpt2'" in msg and "not in the Llama family" in msg


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("dtype", ["float16", "fp32", ""])
def test_invalid_dtype(llama_dir, dtype):
    msg = load_error(llama_dir, dtype=dtype)
    assert "--dtype" in msg and repr(dtype) in msg and "float32" in msg


@pytest.mark.parametrize("quantize", ["int3", "INT8", "fp8"])
def test_invalid_quantize(llama_dir, quantize):
    msg = load_error(llama_dir, quantize=quantize)
    assert "--quantize" in msg and repr(quantize) in msg and "int8" in msg


# --------------------------------------------------------------------------- int8


def _last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[1]
    with torch.inference_mode():
        cache = model.allocate_cache(1, 64)
        return model(ids, torch.arange(n)[None], cache, torch.tensor([0]), 32, torch.tensor([n - 1]))[0]


@pytest.mark.parametrize("family", ["llama", "qwen2-bias", "smollm2-tied"])
def test_int8_logits_close_to_float32(tiny_checkpoints, family):
    folder = tiny_checkpoints[family]
    ref = load(folder)
    q = load(folder, quantize="int8")
    assert q.quantize == "int8"
    float_names = {n for n, m in ref.model.named_modules() if isinstance(m, Linear)}
    int8_names = {n for n, m in q.model.named_modules() if isinstance(m, Int8Linear)}
    assert "lm_head" in float_names and len(float_names) >= 1 + 2 * 3  # attention, MLP per layer
    assert int8_names == float_names  # every projection, the LM head included
    assert not any(isinstance(m, Linear) for m in q.model.modules())
    assert all(m.weight.dtype == torch.int8 for m in q.model.modules() if isinstance(m, Int8Linear))
    assert q.model.model.embed_tokens.weight.dtype == torch.float32  # embeddings stay float
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 20))
    a, b = _last_logits(ref.model, ids), _last_logits(q.model, ids)
    assert not torch.equal(a, b)  # really quantised
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert a.argmax() == b.argmax()


# --------------------------------------------------------------------------- GGUF round trip

_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (rotate-half -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path: Path, hf) -> list[str]:
    """A llama GGUF (F32 tensors) from ``hf``, with a tiny gpt2-style BPE vocabulary."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = hf.config
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(32, 127)] + ["he", "Ġt", "ll", "hell", "<s>", "</s>"]
    tokens += [f"<extra_{i}>" for i in range(len(tokens), cfg.vocab_size)]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    types[tokens.index("<s>")] = types[tokens.index("</s>")] = gguf.TokenType.CONTROL

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["h e", "Ġ t", "l l", "he ll"])
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    for name, t in hf.state_dict().items():
        a = t.float().numpy()
        if name in _GGUF_GLOBAL:
            gname = _GGUF_GLOBAL[name]
        else:
            _, _, idx, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            gname = f"blk.{idx}.{_GGUF_LAYER[module]}.{suffix}"
            if module == "self_attn.q_proj":
                a = _llama_cpp_permute(a, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = _llama_cpp_permute(a, cfg.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


def test_gguf_round_trip_matches_transformers(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLEETLM_CACHE", str(cache))
    hf = make_hf_model("llama")
    src = tmp_path / "src"
    src.mkdir()
    path = src / "tiny.gguf"
    tokens = _write_tiny_gguf(path, hf)

    loaded = load_model(str(path), dtype="float32")
    assert loaded.folder.parent == cache / "converted"
    assert loaded.config.num_heads == 4 and loaded.config.num_kv_heads == 2
    assert not loaded.config.tie_word_embeddings
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 16))
    with torch.inference_mode():
        ref = hf(ids).logits
        kv = loaded.model.allocate_cache(1, 32)
        got = loaded.model(ids, torch.arange(16)[None], kv, torch.tensor([0]), 16, None)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)

    tok = loaded.tokenizer
    assert tok.decode(tok.encode("hello there", add_special_tokens=False)) == "hello there"
    assert tok.convert_ids_to_tokens(tok.encode("hell", add_special_tokens=False)) == ["hell"]
    assert loaded.stop_token_ids == [tokens.index("</s>")]

    # a second load (here through the folder holding the one .gguf) reuses the conversion
    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again instead of read from the cache")

    def no_second_read(*args, **kwargs):
        raise AssertionError("the GGUF was hashed again instead of its digest remembered")

    monkeypatch.setattr(gguf_convert, "convert_gguf", no_second_conversion)
    with monkeypatch.context() as m:
        m.setattr(gguf_convert.hashlib, "file_digest", no_second_read)
        again = load_model(str(src), dtype="float32", with_tokenizer=False)
    assert again.folder == loaded.folder
    assert [p.name for p in (cache / "converted").iterdir()] == [loaded.folder.name]

    # the same file in another place (another checkout, a fresh virtual environment)
    # reuses the conversion: the cache is keyed by content, not by path
    elsewhere = tmp_path / "other-checkout"
    elsewhere.mkdir()
    shutil.copy2(path, elsewhere / "tiny.gguf")
    assert load_model(str(elsewhere / "tiny.gguf"), dtype="float32",
                      with_tokenizer=False).folder == loaded.folder


def test_conversion_prunes_folders_of_deleted_ggufs(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLEETLM_CACHE", str(cache))
    src = tmp_path / "src"
    src.mkdir()
    path = src / "tiny.gguf"
    _write_tiny_gguf(path, make_hf_model("llama"))
    root = cache / "converted"
    other = tmp_path / "other.gguf"  # another live GGUF of the same stem's family
    other.write_bytes(b"x")
    folders = {
        "tiny-000000000000": {"gguf": str(tmp_path / "gone" / "tiny.gguf"),
                              "key": gguf_convert.KEY_SCHEME},  # its checkout was deleted
        "tiny-111111111111": {"gguf": str(path)},  # the old path-and-mtime key: redundant
        "tiny-222222222222": {"gguf": str(other), "key": gguf_convert.KEY_SCHEME},  # live
    }
    for name, info in folders.items():
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
        (root / name / "fleetlm_source.json").write_text(json.dumps(info))
    loaded = load_model(str(path), dtype="float32", with_tokenizer=False)
    assert sorted(p.name for p in root.iterdir()) == sorted([loaded.folder.name,
                                                             "tiny-222222222222"])
    written = json.loads((loaded.folder / "fleetlm_source.json").read_text())
    assert written == {"gguf": str(path.resolve()), "key": gguf_convert.KEY_SCHEME}
