"""The adapter store: validation errors, tiers and LRU, add/remove, agreement with PEFT."""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fleetlm.adapters import (
    LORA_TARGETS,
    AdapterError,
    AdapterNotFound,
    AdapterStore,
    LoadedAdapter,
)
from fleetlm.adapters.lru import WarmLRU
from fleetlm.adapters.random import make_random_adapter
from fleetlm.models.config import LlamaConfig
from fleetlm.paths import data_home, default_adapters_dir
from tests.conftest import make_hf_model

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def edit_config(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg))


def edit_weights(folder: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / WEIGHTS))
    fn(state)
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})


def q0(ab: str = "A") -> str:
    return f"base_model.model.model.layers.0.self_attn.q_proj.lora_{ab}.weight"


@pytest.fixture
def store(tmp_path: Path, base_cfg: LlamaConfig) -> AdapterStore:
    return AdapterStore(tmp_path / "store", base_cfg)


@pytest.fixture
def src(tmp_path: Path, base_cfg: LlamaConfig) -> Path:
    """A valid adapter folder outside the store, to be broken by a test."""
    return make_random_adapter(tmp_path / "src" / "good", base_cfg, rank=4, alpha=8)


# --- a valid adapter ---------------------------------------------------------------------


def test_add_get_round_trip(store: AdapterStore, src: Path, base_cfg: LlamaConfig) -> None:
    info = store.add(src)
    assert (info.name, info.rank, info.alpha, info.tier, info.pinned) == ("good", 4, 8.0, "cold", False)
    assert info.target_modules == LORA_TARGETS
    assert info.path == store.root / "good" and info.size_bytes == (src / WEIGHTS).stat().st_size
    assert (info.path.stat().st_mode & 0o777) == 0o755
    loaded = store.get("good")
    assert isinstance(loaded, LoadedAdapter)
    assert len(loaded.modules) == base_cfg.num_layers * len(LORA_TARGETS)
    m = loaded.modules["model.layers.1.self_attn.k_proj"]
    assert m.a.shape == (4, base_cfg.hidden_size) and m.b.shape == (base_cfg.kv_size, 4)
    assert m.scale == 8 / 4 and m.a.dtype == torch.float32
    assert loaded.nbytes == sum(x.a.nbytes + x.b.nbytes for x in loaded.modules.values())
    assert loaded.config["r"] == 4
    assert store.validate("good").tier == "warm"
    assert [a.name for a in store.list()] == ["good"]


def test_store_dtype_converts_tensors(tmp_path: Path, src: Path, base_cfg: LlamaConfig) -> None:
    s32 = AdapterStore(tmp_path / "a", base_cfg)
    s16 = AdapterStore(tmp_path / "b", base_cfg, dtype=torch.bfloat16)
    s32.add(src)
    s16.add(src)
    a32, a16 = s32.get("good"), s16.get("good")
    assert a16.nbytes * 2 == a32.nbytes
    for name, m in a16.modules.items():
        assert m.a.dtype == m.b.dtype == torch.bfloat16
        torch.testing.assert_close(m.a.float(), a32.modules[name].a, rtol=1e-2, atol=1e-4)


def test_rslora_scale(store: AdapterStore, tmp_path: Path, base_cfg: LlamaConfig) -> None:
    make_random_adapter(tmp_path / "rs", base_cfg, rank=16, alpha=8, use_rslora=True)
    store.add(tmp_path / "rs")
    assert all(m.scale == pytest.approx(8 / 4) for m in store.get("rs").modules.values())


def test_layers_to_transform(store: AdapterStore, tmp_path: Path, base_cfg: LlamaConfig) -> None:
    folder = make_random_adapter(tmp_path / "l1", base_cfg, rank=4, targets=("q_proj",))
    edit_config(folder, layers_to_transform=[1])
    edit_weights(folder, lambda s: [s.pop(q0(ab)) for ab in "AB"])
    store.add(folder)
    assert list(store.get("l1").modules) == ["model.layers.1.self_attn.q_proj"]

    # weights for a layer the config leaves out are an error
    make_random_adapter(tmp_path / "l2", base_cfg, rank=4, targets=("q_proj",))
    edit_config(tmp_path / "l2", layers_to_transform=1)
    with pytest.raises(AdapterError, match="do not select .*model.layers.0.self_attn.q_proj"):
        store.add(tmp_path / "l2")


# --- agreement with PEFT -----------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {},
    {"use_rslora": True, "rank": 8},
    {"rank_pattern": {"layers.1.self_attn.q_proj": 2, "down_proj": 6},
     "alpha_pattern": {"v_proj": 3.0, r"layers\.0\.mlp\.up_proj": 5}},
], ids=["plain", "rslora", "patterns"])
def test_peft_loads_random_adapter_and_merges_the_same(
        tmp_path: Path, base_cfg: LlamaConfig, kw: dict[str, Any]) -> None:
    from peft import PeftModel

    folder = make_random_adapter(tmp_path / "rnd", base_cfg, **{"rank": 4, "alpha": 16, **kw})
    store = AdapterStore(tmp_path / "store", base_cfg)
    store.add(folder)
    ours = store.get("rnd")

    base = make_hf_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (missing adapter keys, ...) fails
        pm = PeftModel.from_pretrained(base, str(folder))
    res = pm.load_adapter(str(folder), adapter_name="check")
    assert res.missing_keys == [] and res.unexpected_keys == []
    pm.delete_adapter("check")
    for name, m in ours.modules.items():
        layer = pm.get_submodule(f"base_model.model.{name}")
        assert layer.scaling["default"] == pytest.approx(m.scale), name
    merged = pm.merge_and_unload().state_dict()
    for name, m in ours.modules.items():
        expected = before[f"{name}.weight"] + m.scale * (m.b @ m.a)
        torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)


def test_real_peft_save_with_patterns(tmp_path: Path, base_cfg: LlamaConfig) -> None:
    """A folder written by PEFT itself: tensors and per-module scales as PEFT has them."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 4, "down_proj": 2},
                     alpha_pattern={"v_proj": 3}, task_type="CAUSAL_LM")
    pm = get_peft_model(make_hf_model("llama"), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)  # PEFT starts B at zero
    pm.save_pretrained(tmp_path / "peft-sql")
    store = AdapterStore(tmp_path / "store", base_cfg)
    info = store.add(tmp_path / "peft-sql", name="sql")
    assert info.target_modules == ("q_proj", "v_proj", "down_proj") and info.rank == 8
    ours = store.get("sql")
    assert len(ours.modules) == 6
    for name, m in ours.modules.items():
        layer = pm.get_submodule(f"base_model.model.{name}")
        assert m.scale == pytest.approx(layer.scaling["default"]), name
        torch.testing.assert_close(m.a, layer.lora_A["default"].weight.detach())
        torch.testing.assert_close(m.b, layer.lora_B["default"].weight.detach())
    assert ours.modules["model.layers.1.self_attn.q_proj"].a.shape[0] == 4
    assert ours.modules["model.layers.0.self_attn.v_proj"].scale == pytest.approx(3 / 8)
    assert ours.modules["model.layers.0.mlp.down_proj"].scale == pytest.approx(16 / 2)


# --- every validation failure, with its message --------------------------------------------


def _other_base(base: LlamaConfig, **kw: Any) -> LlamaConfig:
    return replace(base, **kw)


BREAKERS: dict[str, tuple[Callable[[Path, LlamaConfig], None], list[str]]] = {
    "no-config": (lambda f, b: (f / CONFIG).unlink(), ["has no adapter_config.json"]),
    "bad-json": (lambda f, b: (f / CONFIG).write_text("{r: 4,"), ["not valid JSON"]),
    "json-list": (lambda f, b: (f / CONFIG).write_text("[1]"), ["must hold a JSON object"]),
    "no-weights": (lambda f, b: (f / WEIGHTS).unlink(), ["has no adapter_model.safetensors"]),
    "pickle-only": (lambda f, b: (f / WEIGHTS).rename(f / "adapter_model.bin"),
                    ["adapter_model.bin (pickle)", "never loads", "safe_serialization=True"]),
    "truncated": (lambda f, b: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:-64]),
                  ["corrupt or truncated"]),
    "garbage": (lambda f, b: (f / WEIGHTS).write_bytes(b"not safetensors at all"),
                ["corrupt or truncated"]),
    "peft-type": (lambda f, b: edit_config(f, peft_type="PREFIX_TUNING"), ["peft_type is 'PREFIX_TUNING'"]),
    "task-type": (lambda f, b: edit_config(f, task_type="SEQ_CLS"), ["task_type is 'SEQ_CLS'", "CAUSAL_LM"]),
    "dora": (lambda f, b: edit_config(f, use_dora=True), ["use_dora is set", "DoRA"]),
    "bias": (lambda f, b: edit_config(f, bias="all"), ["bias='all'", "bias='none'"]),
    "modules-to-save": (lambda f, b: edit_config(f, modules_to_save=["lm_head"]), ["modules_to_save"]),
    "fan-in-fan-out": (lambda f, b: edit_config(f, fan_in_fan_out=True), ["fan_in_fan_out=true"]),
    "pissa": (lambda f, b: edit_config(f, init_lora_weights="pissa_niter_4"),
              ["changes the base weights", "path_initial_model_for_weight_conversion"]),
    "bad-r": (lambda f, b: edit_config(f, r="4"), ["r='4' must be a positive integer"]),
    "unknown-target-config": (lambda f, b: edit_config(f, target_modules=["q_proj", "lm_head", "embed_tokens"]),
                              ["unknown target modules lm_head, embed_tokens", "q_proj, k_proj"]),
    "regex-target-head": (lambda f, b: edit_config(f, target_modules=r".*(q_proj|lm_head)"),
                          ["matches lm_head"]),
    "unknown-target-tensor": (
        lambda f, b: edit_weights(f, lambda s: s.update({
            "base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(4, 128)})),
        ["adapts 'model.embed_tokens', an unknown target module"]),
    "not-lora-key": (
        lambda f, b: edit_weights(f, lambda s: s.update({
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": torch.zeros(2, 2)})),
        ["not LoRA weights", "q_proj.base_layer.weight"]),
    "a-without-b": (lambda f, b: edit_weights(f, lambda s: s.pop(q0("B"))),
                    [f"{q0('A')} has no matching lora_B"]),
    "rank-vs-config": (lambda f, b: edit_config(f, r=2), ["has rank 4 but adapter_config.json sets r=2"]),
    "missing-module": (lambda f, b: edit_weights(f, lambda s: [s.pop(q0(ab)) for ab in "AB"]),
                       ["selects 1 module(s) with no weights", "model.layers.0.self_attn.q_proj"]),
    "non-finite": (lambda f, b: edit_weights(f, lambda s: s[q0("B")].__setitem__((0, 0), float("nan"))),
                   ["non-finite values", q0("B")]),
    "int-dtype": (lambda f, b: edit_weights(f, lambda s: s.__setitem__(q0("A"), s[q0("A")].to(torch.int32))),
                  ["dtype I32", "floating point"]),
}


@pytest.mark.parametrize("case", list(BREAKERS))
def test_validation_failure(case: str, store: AdapterStore, src: Path, base_cfg: LlamaConfig) -> None:
    breaker, needles = BREAKERS[case]
    breaker(src, base_cfg)
    with pytest.raises(AdapterError) as e:
        store.add(src, name="broken")
    assert e.value.adapter == "broken"
    msg = str(e.value)
    assert msg.startswith("adapter 'broken': ")
    for needle in needles:
        assert needle in msg, msg
    assert list(store.root.iterdir()) == []  # a failed add leaves nothing behind

    # the same folder placed in the store by hand: get refuses it, the rest keeps working
    make_random_adapter(store.root / "fine", base_cfg, rank=4)
    shutil.copytree(src, store.root / "broken")
    with pytest.raises(AdapterError) as e2:
        store.get("broken")
    assert e2.value.adapter == "broken"
    assert store.get("fine").rank == 4
    good, bad = store.scan()
    if case == "no-config":  # not adapter-looking: not listed at all
        assert [a.name for a in good] == ["fine"] and bad == []
    else:
        assert [a.name for a in good] == (["fine"] if case != "non-finite" else ["broken", "fine"])
        assert [b.adapter for b in bad] == ([] if case == "non-finite" else ["broken"])
    assert store.stats()["load_errors"] == 1


def test_problems_are_collected(store: AdapterStore, src: Path) -> None:
    edit_config(src, use_dora=True, bias="all", peft_type="LORA", task_type="SEQ_2_SEQ_LM")
    with pytest.raises(AdapterError) as e:
        store.add(src)
    assert len(e.value.problems) == 3


def test_rank_over_maximum(tmp_path: Path, base_cfg: LlamaConfig) -> None:
    folder = make_random_adapter(tmp_path / "sql", base_cfg, rank=16, targets=("q_proj",))
    store = AdapterStore(tmp_path / "store", base_cfg, max_rank=8)
    with pytest.raises(AdapterError, match=r"adapter 'sql': rank 16 \(model.layers.0.self_attn.q_proj\) "
                                           r"exceeds the configured maximum 8 \(raise --max-lora-rank\)"):
        store.add(folder)


def test_other_base_model_shapes(tmp_path: Path, store: AdapterStore, base_cfg: LlamaConfig) -> None:
    wider = _other_base(base_cfg, hidden_size=128, head_dim=32)
    make_random_adapter(tmp_path / "wide", wider, rank=4, base_model="org/wider-model")
    with pytest.raises(AdapterError) as e:
        store.add(tmp_path / "wide")
    msg = str(e.value)
    assert f"{q0('A')}: shape (4, 128), expected (4, 64) for the base model's q_proj" in msg
    assert "trained on org/wider-model" in msg and "more problems" in msg


def test_layer_beyond_base(tmp_path: Path, store: AdapterStore, base_cfg: LlamaConfig) -> None:
    make_random_adapter(tmp_path / "deep", _other_base(base_cfg, num_layers=3), rank=4,
                        targets=("o_proj",))
    with pytest.raises(AdapterError, match=r"layers.2.self_attn.o_proj.lora_A.weight is for layer 2, "
                                           r"but the base model has layers 0..1"):
        store.add(tmp_path / "deep")


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "", "x" * 65, ".", "..", ".hidden", "a b", "sql:v2"])
def test_bad_names(store: AdapterStore, src: Path, name: str) -> None:
    for call in (lambda: store.resolve(name), lambda: store.get(name), lambda: store.remove(name),
                 lambda: store.add(src, name=name)):
        with pytest.raises(AdapterError, match="invalid adapter name: use 1-64 letters"):
            call()
    assert not store.exists(name)


def test_unknown_adapter(store: AdapterStore, base_cfg: LlamaConfig) -> None:
    make_random_adapter(store.root / "known", base_cfg, rank=2)
    with pytest.raises(AdapterNotFound, match=r"adapter 'nope': no such adapter in .*known: known"):
        store.get("nope")
    with pytest.raises(AdapterNotFound):
        store.remove("nope")


def test_symlink_out_of_root_refused(tmp_path: Path, store: AdapterStore, src: Path) -> None:
    os.symlink(src, store.root / "escape")
    with pytest.raises(AdapterError, match="symlink to .* outside the adapter store"):
        store.get("escape")
    # a file inside an in-store folder that links out is refused too
    inner = store.root / "inner"
    inner.mkdir()
    shutil.copy(src / CONFIG, inner / CONFIG)
    os.symlink(src / WEIGHTS, inner / WEIGHTS)
    with pytest.raises(AdapterError, match="symlink to .* outside the adapter store"):
        store.get("inner")
    assert store.list() == []
    store.remove("escape")  # unlinks the link, leaves its target alone
    assert not (store.root / "escape").exists() and (src / WEIGHTS).is_file()


def test_not_a_folder(store: AdapterStore, src: Path) -> None:
    with pytest.raises(AdapterError, match="is not a folder .pass the folder that holds it"):
        store.add(src / CONFIG, name="x")
    with pytest.raises(AdapterError, match="is not a folder"):
        store.add(src.parent / "nothing-here")


# --- add / remove ------------------------------------------------------------------------


def test_add_remove_overwrite(store: AdapterStore, tmp_path: Path, base_cfg: LlamaConfig) -> None:
    changed: list[str] = []
    store.subscribe(changed.append)
    a = make_random_adapter(tmp_path / "v1", base_cfg, rank=4, seed=1)
    b = make_random_adapter(tmp_path / "v2", base_cfg, rank=8, seed=2)
    (a / "README.md").write_text("model card")
    store.add(a, name="sql")
    assert (store.root / "sql" / "README.md").read_text() == "model card"
    with pytest.raises(AdapterError, match="already in .*--overwrite"):
        store.add(b, name="sql")
    store.get("sql")
    assert store.add(b, name="sql", overwrite=True).rank == 8
    assert changed == ["sql"] and store.warm_names() == []  # the stale warm copy is gone
    assert store.get("sql").rank == 8
    store.pin("sql")
    with pytest.raises(AdapterError, match="pinned"):
        store.remove("sql")
    with pytest.raises(AdapterError, match="pinned"):
        store.add(a, name="sql", overwrite=True)
    store.unpin("sql")
    store.remove("sql")
    assert changed == ["sql", "sql"]
    assert not store.exists("sql") and store.warm_names() == [] and list(store.root.iterdir()) == []


def test_failed_copy_leaves_nothing(store: AdapterStore, src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fleetlm.adapters.store as store_mod

    def fail(a: Any, b: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.shutil, "copyfile", fail)
    with pytest.raises(AdapterError, match="could not copy .*No space left"):
        store.add(src)
    assert list(store.root.iterdir()) == []


def test_remove_works_without_base_config(tmp_path: Path, src: Path, base_cfg: LlamaConfig) -> None:
    AdapterStore(tmp_path / "s", base_cfg).add(src)
    bare = AdapterStore(tmp_path / "s", None)
    assert [a.name for a in bare.list()] == ["good"]
    with pytest.raises(AdapterError, match="without the base model's config"):
        bare.get("good")
    bare.remove("good")
    assert not bare.exists("good")


def test_constructor_checks(tmp_path: Path, base_cfg: LlamaConfig) -> None:
    from fleetlm.errors import ConfigError

    with pytest.raises(ConfigError, match="--max-lora-rank must be positive"):
        AdapterStore(tmp_path / "s", base_cfg, max_rank=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--adapters-dir"):
        AdapterStore(tmp_path / "file", base_cfg)


# --- the warm tier -----------------------------------------------------------------------


def _fill(store: AdapterStore, base_cfg: LlamaConfig, names: str) -> int:
    for i, n in enumerate(names):
        make_random_adapter(store.root / n, base_cfg, rank=4, targets=("q_proj",), seed=i)
    return store.get(names[0]).nbytes


def test_lru_eviction_order(tmp_path: Path, base_cfg: LlamaConfig) -> None:
    probe = AdapterStore(tmp_path / "probe", base_cfg)
    size = _fill(probe, base_cfg, "a")
    store = AdapterStore(tmp_path / "s", base_cfg, warm_budget_bytes=int(2.5 * size))
    _fill(store, base_cfg, "abcd")
    store.evict("a")
    for n in "abc":
        store.get(n)
    assert store.warm_names() == ["b", "c"]  # a was least recent
    store.get("b")  # hit: b becomes most recent
    store.get("d")
    assert store.warm_names() == ["b", "d"]
    assert store.warm_bytes() == 2 * size
    st = store.stats()
    assert (st["hits"], st["loads"], st["evictions"], st["warm_count"]) == (1, 5, 3, 2)


def test_pin_prevents_eviction(tmp_path: Path, base_cfg: LlamaConfig) -> None:
    size = _fill(AdapterStore(tmp_path / "probe", base_cfg), base_cfg, "a")
    store = AdapterStore(tmp_path / "s", base_cfg, warm_budget_bytes=int(1.5 * size))
    _fill(store, base_cfg, "abc")
    store.evict("a")
    store.pin("a")
    store.get("b")
    store.get("c")
    assert store.warm_names() == ["a", "c"]
    assert store.validate("a").pinned and store.validate("a").tier == "warm"
    assert store.evict("a") is False
    store.unpin("a")  # over budget: a, the least recent, goes now
    assert store.warm_names() == ["c"]
    store.get("b")
    assert store.warm_names() == ["b"]


def test_evict_then_get_reloads_identical(store: AdapterStore, src: Path) -> None:
    store.add(src)
    first = store.get("good")
    assert store.get("good") is first
    assert store.evict("good") and not store.evict("good")
    assert store.validate("good").tier == "cold"
    again = store.get("good")
    assert again is not first and store.stats()["loads"] == 2
    for name, m in first.modules.items():
        assert torch.equal(m.a, again.modules[name].a) and torch.equal(m.b, again.modules[name].b)
        assert m.scale == again.modules[name].scale


def test_concurrent_get_add_list(store: AdapterStore, tmp_path: Path, base_cfg: LlamaConfig) -> None:
    for i in range(3):
        make_random_adapter(tmp_path / f"c{i}", base_cfg, rank=2, targets=("v_proj",), seed=i)
    store.add(tmp_path / "c0")
    errors: list[BaseException] = []

    def engine() -> None:
        try:
            for _ in range(50):
                store.get("c0")
                store.evict("c0")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=engine)
    t.start()
    for i in (1, 2):
        store.add(tmp_path / f"c{i}")
        store.list()
        store.remove(f"c{i}")
    t.join()
    assert errors == [] and [a.name for a in store.list()] == ["c0"]


def test_warm_lru_bookkeeping() -> None:
    lru: WarmLRU[str] = WarmLRU(budget_bytes=10)
    assert lru.put("a", "A", 4) == [] and lru.put("b", "B", 4) == []
    assert lru.get("a") == "A"  # a is now most recent
    assert lru.put("c", "C", 4) == ["b"]
    assert lru.names() == ["a", "c"] and lru.nbytes == 8
    lru.pin("a")
    assert lru.put("d", "D", 4) == ["c"]
    assert lru.put("big", "X", 20) == ["d"]  # the newest stays even over budget
    assert lru.names() == ["a", "big"] and lru.nbytes == 24
    assert lru.unpin("a") == ["a", "big"]  # big alone is over budget: kept only while newest
    assert lru.put("e", "E", 1) == [] and lru.names() == ["e"]
    assert lru.peek("missing") is None and not lru.drop("missing")
    with pytest.raises(ValueError):
        WarmLRU(-1)


# --- paths -------------------------------------------------------------------------------


def test_default_adapters_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLEETLM_HOME", str(tmp_path / "home"))
    assert default_adapters_dir() == tmp_path / "home" / "adapters"
    monkeypatch.delenv("FLEETLM_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_adapters_dir() == tmp_path / "xdg" / "fleetlm" / "adapters"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_home() == tmp_path / ".local" / "share" / "fleetlm"


@pytest.mark.parametrize("kw", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.o_proj", "model.layers.1.mlp.up_proj"]},
    {"target_modules": r"model\.layers\.[01]\.mlp\.(gate|down)_proj"},
    {"target_modules": ["k_proj", "down_proj"], "layers_to_transform": [1]},
    {"target_modules": ["k_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "k_proj", "gate_proj"], "exclude_modules": ["model.layers.0.self_attn.k_proj"]},
    {"target_modules": ["q_proj", "up_proj"], "exclude_modules": r".*layers\.1\..*"},
])
def test_module_selection_matches_peft(base_cfg: LlamaConfig, kw: dict[str, Any]) -> None:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from fleetlm.adapters.peft_format import _selected, module_names

    peft_cfg = LoraConfig(**kw)
    ours = {m for m in module_names(base_cfg) if _selected(peft_cfg.to_dict(), m)}
    # PEFT returns True, a re.Match, or a falsy None/False/_ExcludedModule
    theirs = {m for m in module_names(base_cfg) if check_target_module_exists(peft_cfg, m)}
    assert ours == theirs and ours


def test_pattern_key_matches_peft(base_cfg: LlamaConfig) -> None:
    from peft.utils.other import get_pattern_key

    from fleetlm.adapters.peft_format import module_names, pattern_key

    patterns = ["layers.1.self_attn.q_proj", "down_proj", r"layers\.0\.mlp\..*", "proj", "v_proj"]
    for m in module_names(base_cfg):
        ours = pattern_key(patterns, m)
        assert (ours if ours is not None else m) == get_pattern_key(patterns, m), m


def test_validate_is_cached_until_files_change(store: AdapterStore, src: Path) -> None:
    store.add(src)
    assert store.validate("good").rank == 4
    (store.root / "good" / CONFIG).write_text("{broken")
    with pytest.raises(AdapterError, match="not valid JSON"):
        store.validate("good")
