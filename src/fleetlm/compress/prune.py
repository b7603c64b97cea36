"""``fleetlm prune``: calibration-data pruning of a Llama-family model.

    report = prune(PruneSettings(model="exported/banking77/hf", data=Path("rows.jsonl"),
                                 out=Path("pruned"), mlp=0.5, layers=2))

What the calibration rows decide, and what goes:

- ``unstructured`` (a fraction) and ``two_four``: Wanda's score, ``|W_ij| * ||x_j||``
  (the weight times the norm of its input channel over the calibration tokens). The lowest
  scores of each output row are zeroed: that fraction of each row, or 2 of every 4
  consecutive inputs. The model keeps its shapes: zeros, not a smaller model.
- ``mlp`` (a fraction of the intermediate channels): each layer's channels are scored by
  ``||x_k|| * sum_i |W_down[i, k]|`` (the down projection's input norm times its weights).
  The same number of channels is removed from every layer (Hugging Face configs have one
  ``intermediate_size``), the lowest-scoring ones in each layer: rows of gate and up,
  columns of down.
- ``kv_groups`` (a count per layer): whole grouped-query groups, one KV head and the query
  heads that read it, scored by the norm of their output through ``o_proj``. The same count
  from every layer.
- ``layers`` (a count): whole decoder layers, those that change the hidden state least
  (``1 - cos(h_in, h_out)`` averaged over the calibration tokens: ShortGPT's block
  influence).

Structured pruning makes the model smaller and faster; follow it with ``fleetlm distill``
(the unpruned model as teacher) to win back what it lost. The result is a Hugging Face
folder with ``prune.json``: the parameters before and after, and what went from each layer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from fleetlm.config import StrictModel
from fleetlm.errors import ConfigError


class PruneSettings(StrictModel):
    model: str
    data: Path  # calibration rows, as fleetlm distill reads them
    out: Path
    unstructured: float = Field(0.0, ge=0.0, lt=1.0)
    two_four: bool = False
    mlp: float = Field(0.0, ge=0.0, lt=1.0)
    kv_groups: int = Field(0, ge=0)
    layers: int = Field(0, ge=0)
    calibration_rows: int = Field(128, ge=1)
    max_len: int = Field(128, ge=8)


class _Norms:
    """Running sums of squared inputs, per input channel, of the hooked linear layers; and
    each decoder layer's block influence."""

    def __init__(self) -> None:
        self.sq: dict[str, torch.Tensor] = {}
        self.influence: dict[int, list[float]] = {}

    def linear_hook(self, name: str) -> Callable[..., None]:
        def hook(_m: Any, args: tuple[torch.Tensor, ...], _out: Any) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = (x * x).sum(0)
            self.sq[name] = self.sq[name] + s if name in self.sq else s
        return hook

    def layer_hook(self, idx: int) -> Callable[..., None]:
        def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            h_in = (args[0] if args else kwargs["hidden_states"]).detach().float()
            h_out = (out[0] if isinstance(out, tuple) else out).detach().float()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            self.influence.setdefault(idx, []).append(float((1 - cos).mean()))
        return hook

    def norm(self, name: str) -> torch.Tensor:
        return self.sq[name].sqrt()


def _calibrate(model: Any, rows: list[list[int]]) -> _Norms:
    norms = _Norms()
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_hook(norms.layer_hook(i), with_kwargs=True))
        for name, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                handles.append(m.register_forward_hook(norms.linear_hook(f"{i}.{name}")))
    try:
        with torch.inference_mode():
            for r in rows:
                model(input_ids=torch.tensor([r]))
    finally:
        for h in handles:
            h.remove()
    return norms


def _wanda(model: Any, norms: _Norms, fraction: float, two_four: bool) -> int:
    """Zero the lowest Wanda scores of every projection's rows; the weights zeroed."""
    zeroed = 0
    for i, layer in enumerate(model.model.layers):
        for name, m in layer.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            w = m.weight.data
            score = w.abs().float() * norms.norm(f"{i}.{name}")[None, :]
            if two_four:
                g = score.reshape(w.shape[0], -1, 4)
                drop = torch.zeros_like(g, dtype=torch.bool)
                drop.scatter_(2, g.argsort(dim=2)[:, :, :2], True)
                mask = drop.reshape(w.shape)
            else:
                k = int(w.shape[1] * fraction)
                if k == 0:
                    continue
                idx = score.argsort(dim=1)[:, :k]
                mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)
            w[mask] = 0
            zeroed += int(mask.sum())
    return zeroed


def _prune_mlp(model: Any, norms: _Norms, fraction: float) -> list[list[int]]:
    """Remove the same number of intermediate channels from every layer; those removed."""
    inter = model.config.intermediate_size
    drop_n = int(inter * fraction)
    removed = []
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        score = norms.norm(f"{i}.mlp.down_proj") * mlp.down_proj.weight.abs().float().sum(0)
        drop = score.argsort()[:drop_n]
        keep = torch.ones(inter, dtype=torch.bool)
        keep[drop] = False
        for proj in (mlp.gate_proj, mlp.up_proj):
            _set_linear(proj, proj.weight.data[keep], None if proj.bias is None else
                        proj.bias.data[keep])
        _set_linear(mlp.down_proj, mlp.down_proj.weight.data[:, keep],
                    None if mlp.down_proj.bias is None else mlp.down_proj.bias.data)
        removed.append(sorted(int(c) for c in drop))
    model.config.intermediate_size = inter - drop_n
    return removed


def _prune_kv_groups(model: Any, norms: _Norms, n: int) -> list[list[int]]:
    """Remove ``n`` grouped-query groups (a KV head and its query heads) from every layer."""
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per = heads // kv
    if n >= kv:
        raise ConfigError(f"kv_groups: {n} would remove every KV head of {kv}; at most "
                          f"{kv - 1}", param="kv_groups")
    removed = []
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        x = norms.norm(f"{i}.self_attn.o_proj")  # [heads * d]
        o = a.o_proj.weight.abs().float() * x[None, :]
        score = o.sum(0).reshape(kv, per * d).sum(1)
        drop = score.argsort()[:n]
        keep_kv = torch.ones(kv, dtype=torch.bool)
        keep_kv[drop] = False
        keep_q = keep_kv.repeat_interleave(per * d)
        keep_k = keep_kv.repeat_interleave(d)
        for proj, keep in ((a.q_proj, keep_q), (a.k_proj, keep_k), (a.v_proj, keep_k)):
            _set_linear(proj, proj.weight.data[keep], None if proj.bias is None else
                        proj.bias.data[keep])
        _set_linear(a.o_proj, a.o_proj.weight.data[:, keep_q],
                    None if a.o_proj.bias is None else a.o_proj.bias.data)
        removed.append(sorted(int(g) for g in drop))
    cfg.num_attention_heads = heads - n * per
    cfg.num_key_value_heads = kv - n
    cfg.head_dim = d
    return removed


def _set_linear(m: torch.nn.Linear, w: torch.Tensor, b: torch.Tensor | None) -> None:
    m.weight = torch.nn.Parameter(w.clone())
    m.out_features, m.in_features = w.shape
    if b is not None:
        m.bias = torch.nn.Parameter(b.clone())


def _drop_layers(model: Any, norms: _Norms, n: int) -> list[int]:
    count = len(model.model.layers)
    if n >= count:
        raise ConfigError(f"layers: {n} would remove every layer of {count}; at most "
                          f"{count - 1}", param="layers")
    influence = {i: sum(v) / len(v) for i, v in norms.influence.items()}
    drop = sorted(sorted(influence, key=lambda i: influence[i])[:n])
    kept = [layer for i, layer in enumerate(model.model.layers) if i not in drop]
    model.model.layers = torch.nn.ModuleList(kept)
    for j, layer in enumerate(kept):  # transformers' caches index layers by position
        layer.self_attn.layer_idx = j
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types)
                                    if i not in drop]
    return drop


def prune(s: PruneSettings, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Calibrate, prune as asked (see the module), write the folder; the report."""
    from fleetlm.compress.distill import load_hf, read_rows
    from fleetlm.compress.merge import write_hf_folder

    if not (s.unstructured or s.two_four or s.mlp or s.kv_groups or s.layers):
        raise ConfigError("nothing to prune: give --unstructured, --two-four, --mlp, "
                          "--kv-groups or --layers", param="mlp")
    if s.unstructured and s.two_four:
        raise ConfigError("--unstructured and --two-four both choose the zeros; give one",
                          param="two_four")
    t0 = time.perf_counter()
    model, tok, folder = load_hf(s.model)
    model.eval()
    if tok is None:
        raise ConfigError(f"model: {folder} has no tokenizer to read the calibration rows "
                          "with; use a folder with tokenizer.json", param="model")
    rows = read_rows(s.data, tok, s.max_len)[:s.calibration_rows]
    if not rows:
        raise ConfigError(f"data: {s.data} has no usable rows", param="data")
    before = model.num_parameters()  # a tied head counted once
    norms = _calibrate(model, rows)
    report: dict[str, Any] = {"model": s.model, "calibration_rows": len(rows),
                              "parameters_before": before}
    if s.unstructured or s.two_four:
        report["zeroed_weights"] = _wanda(model, norms, s.unstructured, s.two_four)
    if s.mlp:
        report["mlp_channels_removed"] = _prune_mlp(model, norms, s.mlp)
    if s.kv_groups:
        report["kv_groups_removed"] = _prune_kv_groups(model, norms, s.kv_groups)
    if s.layers:
        report["layers_removed"] = _drop_layers(model, norms, s.layers)
    report["parameters_after"] = model.num_parameters()
    report["config"] = {k: getattr(model.config, k) for k in (
        "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    say(f"parameters: {before / 1e6:.1f}M -> {report['parameters_after'] / 1e6:.1f}M "
        f"({1 - report['parameters_after'] / before:.1%} fewer)"
        + (f", {report['zeroed_weights']:,} weights zeroed" if "zeroed_weights" in report else ""))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = dict(report["config"])
    if s.kv_groups:
        config["head_dim"] = model.config.head_dim
    if getattr(model.config, "layer_types", None):
        config["layer_types"] = list(model.config.layer_types)
    write_hf_folder(folder, state, s.out, {"pruned_from": s.model, **report}, config=config)
    (s.out / "prune.json").write_text(json.dumps(report, indent=2))
    return report
