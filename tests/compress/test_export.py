"""fleetlm export: the merge against PEFT's, and the files read back (ours and transformers')."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fleetlm.adapters.random import make_random_adapter
from fleetlm.compress.export import ExportSettings, export
from fleetlm.compress.gguf_write import gguf_name, permute
from fleetlm.models.gguf_convert import _hf_name, _unpermute, convert_gguf
from fleetlm.models.loader import load_model, read_config
from tests.conftest import make_hf_model


@pytest.fixture(scope="module")
def adapter(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # wide enough that the merge moves the logits visibly (checked below)
    return make_random_adapter(tmp_path_factory.mktemp("ad") / "support-bot",
                               read_config(small_base), rank=4, alpha=8, std=0.2, seed=3)


@pytest.fixture(scope="module")
def exported(small_base: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    export(ExportSettings(model=str(small_base), adapter=str(adapter), out=out,
                          gguf=["f32", "f16", "q8_0", "q4_0"]), say=lambda m: None)
    return out


IDS = torch.tensor([[1, 250, 87, 17, 9, 321, 88, 300, 12, 7, 301, 45]])


def _ours(folder: Path, ids: torch.Tensor = IDS) -> torch.Tensor:
    lm = load_model(str(folder), dtype="float32", quantize="none", with_tokenizer=False)
    n = ids.shape[1]
    with torch.inference_mode():
        cache = lm.model.allocate_cache(1, 64)
        return lm.model(ids, torch.arange(n)[None], cache, torch.tensor([0]), n, None)[0]


def _read_back(gguf_file: Path, like: Path, dest: Path) -> Path:
    """The GGUF's tensors as a model folder with ``like``'s config, read the way
    ``gguf_convert`` reads them (names, dequantisation, q/k rows) but without its slow
    tokenizer rebuild; ``fleetlm_source.json`` names the file, as a conversion does."""
    import shutil

    import gguf
    from safetensors.torch import save_file

    cfg = json.loads((like / "config.json").read_text())
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    tensors = {}
    for t in gguf.GGUFReader(str(gguf_file)).tensors:
        w = gguf.dequantize(t.data, t.tensor_type)
        part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if part in heads:
            w = _unpermute(w, heads[part])
        tensors[_hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32))
    dest.mkdir(parents=True)
    shutil.copy2(like / "config.json", dest / "config.json")
    save_file(tensors, str(dest / "model.safetensors"))
    (dest / "fleetlm_source.json").write_text(json.dumps({"gguf": str(gguf_file)}))
    return dest


def _peft_merged(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                              attn_implementation="eager")
    merged = PeftModel.from_pretrained(hf, adapter).merge_and_unload().eval()
    with torch.inference_mode():
        return merged(IDS).logits[0]


def test_permute_is_the_inverse_of_the_readers_unpermute() -> None:
    w = np.random.default_rng(0).standard_normal((4 * 8, 5)).astype(np.float32)
    assert not np.array_equal(permute(w, 4), w)
    np.testing.assert_array_equal(_unpermute(permute(w, 4), 4), w)
    assert gguf_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_hf_folder_is_peft_merge_and_unload(small_base: Path, adapter: Path,
                                            exported: Path) -> None:
    ref = _peft_merged(small_base, adapter)
    base_only = _ours(small_base)
    assert (ref - base_only).abs().max() > 0.05  # the adapter matters: the test can fail
    got = _ours(exported / "hf")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # transformers reads the folder too, with the same tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(exported / "hf", dtype=torch.float32).eval()
    with torch.inference_mode():
        torch.testing.assert_close(hf(IDS).logits[0], ref, atol=1e-4, rtol=0)
    text = "Refund my card, please: order 12345!"
    assert (AutoTokenizer.from_pretrained(exported / "hf")(text)["input_ids"]
            == AutoTokenizer.from_pretrained(small_base)(text)["input_ids"])
    meta = json.loads((exported / "hf" / "fleetlm_export.json").read_text())
    assert meta["adapter"] == str(adapter)


@pytest.mark.parametrize("qtype, atol", [("f32", 1e-4), ("f16", 5e-2)])
def test_gguf_reads_back_to_the_merged_logits(exported: Path, tmp_path: Path,
                                              qtype: str, atol: float) -> None:
    folder = _read_back(exported / f"support-bot-{qtype}.gguf", exported / "hf", tmp_path / qtype)
    torch.testing.assert_close(_ours(folder), _ours(exported / "hf"), atol=atol, rtol=0)


# (type, steps per block's largest magnitude, the largest error in steps): q8_0 rounds to
# the nearest of +-127 steps (half a step, plus the step's own float16 rounding); q4_0's
# 16 levels run from -8 to +7 steps, so the end opposite the largest value clips by a step
@pytest.mark.parametrize("qtype, levels, bound", [("q8_0", 127, 0.6), ("q4_0", 8, 1.05)])
def test_quantised_gguf_weights_are_within_a_step_of_the_merge(
        exported: Path, tmp_path: Path, qtype: str, levels: int, bound: float) -> None:
    """Every matrix read back lies within the format's error of its block's scale (a wrong
    name, transposition or q/k permutation would be off by far more)."""
    from fleetlm.models.loader import read_state_dict

    folder = _read_back(exported / f"support-bot-{qtype}.gguf", exported / "hf", tmp_path / qtype)
    got, want = read_state_dict(folder), read_state_dict(exported / "hf")
    assert set(want) <= set(got)
    for name, w in want.items():
        g = got[name]
        if w.ndim == 1:
            torch.testing.assert_close(g, w, atol=0, rtol=0)
            continue
        blocks = w.reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / levels
        err = (g.reshape(-1, 32) - blocks).abs()
        ratio = float((err / step.clamp_min(1e-12)).max())
        assert ratio <= bound, (name, ratio)
    sizes = {t: (exported / f"support-bot-{t}.gguf").stat().st_size for t in ("f32", "q4_0")}
    assert sizes["q4_0"] < sizes["f32"] / 3


def test_gguf_tokenizer_round_trips_and_a_gguf_base_keeps_its_fields(
        exported: Path, small_base: Path, tmp_path: Path) -> None:
    """The GGUF's tokenizer encodes text as the original and keeps the chat template; and
    the embedded models' path: a folder converted from a GGUF (fleetlm_source.json names
    the file) is exported with that file's tokenizer.* fields verbatim."""
    import gguf
    from transformers import AutoTokenizer

    src = exported / "support-bot-f32.gguf"
    convert_gguf(src, tmp_path / "back")  # rebuilds the tokenizer, writes fleetlm_source.json
    back = AutoTokenizer.from_pretrained(tmp_path / "back")
    orig = AutoTokenizer.from_pretrained(small_base)
    text = "Hello world, 123! Où est ma carte?\n<|im_start|>user"
    assert back(text)["input_ids"] == orig(text)["input_ids"]
    assert back.chat_template == orig.chat_template
    assert back.eos_token_id == orig.eos_token_id

    export(ExportSettings(model=str(tmp_path / "back"), out=tmp_path / "again", hf=False,
                          gguf=["q8_0"], name="again"), say=lambda m: None)

    def fields(p: Path) -> dict[str, object]:
        r = gguf.GGUFReader(str(p))
        return {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}

    assert fields(tmp_path / "again" / "again-q8_0.gguf") == fields(src)
    listing = json.loads((tmp_path / "again" / "export.json").read_text())
    assert [f["kind"] for f in listing["files"]] == ["gguf q8_0"]


def test_refusals_name_the_fix(small_base: Path, tmp_path: Path,
                               tiny_checkpoints: dict[str, Path]) -> None:
    from fleetlm.errors import ConfigError, ModelLoadError

    with pytest.raises(ConfigError, match="adapters list"):
        export(ExportSettings(model=str(small_base), adapter="no-such", out=tmp_path / "a",
                              adapters_dir=tmp_path), say=lambda m: None)
    with pytest.raises(ModelLoadError, match="'mistral' is not exported to GGUF.*--gguf none"):
        export(ExportSettings(model=str(tiny_checkpoints["mistral-window"]), out=tmp_path / "b",
                              gguf=["f16"]), say=lambda m: None)
    assert not (tmp_path / "b").exists()  # refused before anything was written
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        export(ExportSettings(model=str(tiny_checkpoints["llama"]), out=tmp_path / "c",
                              gguf=["f16"]), say=lambda m: None)
    assert not list((tmp_path / "c").glob("*.gguf*"))  # no temporary file left behind
    # without a GGUF, a folder with no tokenizer exports fine
    export(ExportSettings(model=str(tiny_checkpoints["llama"]), out=tmp_path / "d", gguf=[]),
           say=lambda m: None)
    small = IDS % 128  # the 128-token vocabulary of tiny_checkpoints
    torch.testing.assert_close(_ours(tmp_path / "d" / "hf", small),
                               _ours(tiny_checkpoints["llama"], small))


def test_cli_export_and_its_errors(small_base: Path, adapter: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fleetlm", "export", *args],
                              capture_output=True, text=True, timeout=300)

    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="q5_k: not a GGUF type"):
        ExportSettings(out=tmp_path / "x", gguf=["f16", "q5_k"])
    from fleetlm.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing to export"):
        export(ExportSettings(model=str(small_base), out=tmp_path / "y", hf=False, gguf=[]),
               say=lambda m: None)
    r = run("--model", str(small_base), "--adapter", str(adapter), "--out", str(tmp_path / "z"),
            "--gguf", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "gguf q8_0" in r.stdout and (tmp_path / "z" / "support-bot-q8_0.gguf").is_file()
    assert (tmp_path / "z" / "hf" / "model.safetensors").is_file()


def test_tied_and_untied_heads(tmp_path: Path) -> None:
    """An untied head is exported as output.weight and read back as lm_head."""
    from transformers import AutoTokenizer

    from fleetlm.models.loader import resolve_source

    folder = tmp_path / "untied"
    make_hf_model("llama").save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    # (the tokenizer is larger than the 128-token model: its first 128 tokens are written)
    tok.save_pretrained(folder)
    export(ExportSettings(model=str(folder), out=tmp_path / "o", gguf=["f32"], name="u"),
           say=lambda m: None)
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "o" / "u-f32.gguf")).tensors}
    assert "output.weight" in names and "token_embd.weight" in names


@pytest.mark.parametrize("qtype", ["f32", "f16"])
def test_llama_cpp_loads_the_gguf_and_decodes_the_same_greedy_tokens(
        exported: Path, qtype: str) -> None:
    """llama.cpp's own server (`make llama-server`, or $FLEETLM_LLAMA_SERVER) on the exported
    file: the same greedy continuation of the same token ids as fleetlm on the merged folder."""
    import httpx

    from fleetlm.bench.export import _greedy_reference
    from fleetlm.bench.serve import find_llama_server, llama_server_process

    binary = find_llama_server(None)
    if binary is None:
        pytest.skip("no llama-server binary: `make llama-server` builds one (about 15 min on "
                    "2 cores), or set FLEETLM_LLAMA_SERVER")
    prompt, n = IDS[0].tolist(), 12
    (want,) = _greedy_reference(exported / "hf", [prompt], n)
    with llama_server_process(binary, exported / f"support-bot-{qtype}.gguf", 64, 1, 1) as url:
        r = httpx.post(url.removesuffix("/v1") + "/completion", timeout=60, json={
            "prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1,
            "ignore_eos": True, "return_tokens": True, "cache_prompt": False})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == want
