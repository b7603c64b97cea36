"""Runs one engine step on the model: a batched decode and a batched chunked prefill.

The runner owns the tensors the scheduler only counts: the KV cache (one row per running
sequence, see :mod:`fleetlm.engine.rows` for why decodes are kept in rows 0..n-1), the
hot adapters' stacked LoRA buffers (:class:`~fleetlm.engine.multi_lora.MultiLoraBuffers`)
and the per-sequence count of positions written. A step is at most two forwards:

- decode: every decoding sequence feeds its last token, ``[n, 1]`` over cache rows
  ``0..n-1`` read through a view;
- prefill: the step's prompt chunks as a padded ``[m, S]`` rectangle over their rows.

Padding tokens (short prefill rows) are written to a scratch cache position past every
position attention reads, so they never disturb a real sequence. Each token carries its
adapter's hot slot (or -1) into the forward through a :class:`LoraContext`; a forward in
which no token uses an adapter skips LoRA entirely.

The runner knows nothing about queues, sampling or text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fleetlm.engine.lora import NO_ADAPTER
from fleetlm.engine.multi_lora import LoraContext, MultiLoraBuffers
from fleetlm.engine.rows import Move, RowAllocator
from fleetlm.errors import ConfigError
from fleetlm.models.kv_cache import KV_BUCKET, bucket
from fleetlm.models.llama import LlamaForCausalLM

# Attention reads cache positions [0, kv_len) with kv_len rounded up to this. The runner
# runs eagerly, so a fine bucket costs nothing in compilation and saves reading (and
# masking) positions no sequence has reached: at 32 sequences, attention over 256
# positions took 2.2x as long as over 128 (SDPA, bf16).
RUNNER_KV_BUCKET = 32


@dataclass(frozen=True)
class DecodeItem:
    seq_id: str
    token: int  # the last sampled token, fed at ``position``
    position: int
    adapter_slot: int = NO_ADAPTER


@dataclass(frozen=True)
class PrefillItem:
    seq_id: str
    tokens: Sequence[int]  # prompt tokens [start, start + len)
    start: int
    adapter_slot: int = NO_ADAPTER
    last: bool = False  # the prompt's last chunk: its logits are wanted, then it decodes
    all_logits: bool = False  # logits at every token of the chunk (prompt logprobs, echo)
    verify: bool = False  # a speculative check of drafted tokens, not a prompt's chunk


@dataclass
class StepOutput:
    decode_logits: Tensor | None  # [len(decode), vocab] float32, in the decode items' order
    prefill_logits: Tensor | None  # [len(prefill), vocab] float32 at each chunk's last token
    # seq_id -> [len(chunk), vocab] float32 at every token, for items with all_logits
    chunk_logits: dict[str, Tensor] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, *, num_rows: int, max_len: int,
                 max_hot_adapters: int = 0, max_lora_rank: int = 16,
                 lora_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.max_len = max_len
        # positions [0, bucket(max_len)) for sequences, then one scratch position for padding
        self.cache_len = bucket(max_len, KV_BUCKET) + 1
        self.scratch = self.cache_len - 1
        if model.rope_cos.shape[0] < self.cache_len:
            raise ConfigError(
                f"max_len={max_len} needs {self.cache_len} rotary positions but the model was "
                f"loaded with {model.rope_cos.shape[0]}; lower max_len or load with more positions"
            )
        self.cache = model.allocate_cache(num_rows, self.cache_len)
        self.rows = RowAllocator(num_rows)
        self.lengths: dict[str, int] = {}  # positions written in the cache, per sequence
        self.lora = (MultiLoraBuffers(model.config, max_hot_adapters, max_lora_rank,
                                      lora_dtype or model.dtype)
                     if max_hot_adapters > 0 else None)
        if self.lora is not None and self.cache.k[0].device.type == "cpu":
            from fleetlm.kernels import lora_sgmv

            lora_sgmv.load()  # build (once, ~20 s) now rather than inside the first forward

    # -- rows -------------------------------------------------------------------------

    def admit(self, seq_id: str) -> None:
        self.rows.add_prefill(seq_id)
        self.lengths[seq_id] = 0

    def release(self, seq_id: str) -> None:
        """Free a sequence's cache row at once (finished, cancelled or failed)."""
        if seq_id not in self.rows.row_of:
            return
        self._apply(self.rows.remove(seq_id, self.lengths))
        del self.lengths[seq_id]

    def _apply(self, moves: list[Move]) -> None:
        for m in moves:
            for t in (*self.cache.k, *self.cache.v):
                if m.swap:
                    keep = t[m.dst, :, : m.other_length].clone()
                    t[m.dst, :, : m.length] = t[m.src, :, : m.length]
                    t[m.src, :, : m.other_length] = keep
                else:
                    t[m.dst, :, : m.length] = t[m.src, :, : m.length]

    # -- prefix cache -----------------------------------------------------------------

    def load_prefix(self, seq_id: str, kv: Tensor, n: int) -> None:
        """Copy the keys and values of a cached prefix (``kv`` [layers, 2, Hkv, >= n, D])
        into positions [0, n) of a just-admitted sequence's row."""
        if self.lengths.get(seq_id) != 0:
            raise RuntimeError(f"{seq_id}: a prefix loads into a fresh row only")
        row = self.rows.row_of[seq_id]
        for layer, (k, v) in enumerate(zip(self.cache.k, self.cache.v, strict=True)):
            k[row, :, :n].copy_(kv[layer, 0, :, :n])
            v[row, :, :n].copy_(kv[layer, 1, :, :n])
        self.lengths[seq_id] = n

    def read_prefix(self, seq_id: str, n: int) -> Tensor:
        """A copy of positions [0, n) of a sequence's keys and values [layers, 2, Hkv, n, D]."""
        if self.lengths.get(seq_id, 0) < n:
            raise RuntimeError(f"{seq_id}: only {self.lengths.get(seq_id, 0)} positions written")
        row = self.rows.row_of[seq_id]
        return torch.stack([torch.stack((k[row, :, :n], v[row, :, :n]))
                            for k, v in zip(self.cache.k, self.cache.v, strict=True)])

    # -- adapters ---------------------------------------------------------------------

    def load_adapter(self, slot: int, adapter: object) -> None:
        if self.lora is None:
            raise ConfigError("this engine has no adapter slots (max_hot_adapters=0)")
        self.lora.load(slot, adapter)  # type: ignore[arg-type]

    def _lora(self, token_slots: list[int]) -> LoraContext | None:
        if self.lora is None or all(s == NO_ADAPTER for s in token_slots):
            return None
        return self.lora.context(torch.tensor(token_slots, dtype=torch.long))

    def warmup(self) -> None:
        """Run one decode step of each kind the compiled model keeps a graph for (one row
        and several; with adapters and without), so no request waits for compilation.

        Only before any sequence is admitted: the steps use rows 0..1 at the scratch
        position, which no sequence ever reads.
        """
        if self.lengths:
            raise RuntimeError("warmup() must run before any sequence is admitted")
        sizes = [1, 2] if self.rows.num_rows >= 2 else [1]
        adapters = [NO_ADAPTER] + ([0] if self.lora is not None else [])
        kv_len = min(2 * RUNNER_KV_BUCKET, self.scratch)
        with torch.inference_mode():
            for slot in adapters:
                for b in sizes:
                    ids = torch.zeros(b, 1, dtype=torch.long)
                    pos = torch.full((b, 1), self.scratch, dtype=torch.long)
                    self.model(ids, pos, self.cache, None, kv_len, None, self._lora([slot] * b))

    # -- the step ---------------------------------------------------------------------

    def execute(self, decode: Sequence[DecodeItem], prefill: Sequence[PrefillItem]) -> StepOutput:
        with torch.inference_mode():
            dl = self._decode(decode) if decode else None
            pl, chunks = self._prefill(prefill) if prefill else (None, {})
        for item in decode:
            self.lengths[item.seq_id] = item.position + 1
        for p in prefill:
            self.lengths[p.seq_id] = p.start + len(p.tokens)
        for p in prefill:  # after every length is known: a move may swap two prefill rows
            if p.last:
                self._apply(self.rows.start_decoding(p.seq_id, self.lengths[p.seq_id], self.lengths))
        return StepOutput(dl, pl, chunks)

    def _decode(self, items: Sequence[DecodeItem]) -> Tensor:
        order = self.rows.decoding()
        by_id = {it.seq_id: it for it in items}
        if len(order) != len(items) or set(order) != set(by_id):
            raise RuntimeError("decode items must be exactly the sequences in decode rows")
        rows = [by_id[s] for s in order]
        ids = torch.tensor([[it.token] for it in rows], dtype=torch.long)
        pos = torch.tensor([[it.position] for it in rows], dtype=torch.long)
        kv_len = bucket(max(it.position for it in rows) + 1, RUNNER_KV_BUCKET)
        lora = self._lora([it.adapter_slot for it in rows])
        logits = self.model(ids, pos, self.cache, None, kv_len, None, lora)[:, 0]
        if [it.seq_id for it in items] == order:
            return logits
        index = {s: i for i, s in enumerate(order)}  # back to the caller's order
        return logits[torch.tensor([index[it.seq_id] for it in items])]

    def _prefill(self, items: Sequence[PrefillItem]) -> tuple[Tensor, dict[str, Tensor]]:
        m = len(items)
        width = max(len(p.tokens) for p in items)
        ids = torch.zeros(m, width, dtype=torch.long)
        pos = torch.full((m, width), self.scratch, dtype=torch.long)
        token_slots = [NO_ADAPTER] * (m * width)
        for i, p in enumerate(items):
            n = len(p.tokens)
            if n == 0 or p.start + n > self.max_len:
                raise ValueError(f"bad prefill chunk for {p.seq_id}: start {p.start}, {n} tokens")
            ids[i, :n] = torch.tensor(p.tokens, dtype=torch.long)
            pos[i, :n] = torch.arange(p.start, p.start + n)
            token_slots[i * width: i * width + n] = [p.adapter_slot] * n
        slots = torch.tensor([self.rows.row_of[p.seq_id] for p in items], dtype=torch.long)
        kv_len = bucket(max(p.start + len(p.tokens) for p in items), RUNNER_KV_BUCKET)
        last = torch.tensor([len(p.tokens) - 1 for p in items], dtype=torch.long)
        lora = self._lora(token_slots)
        # prompt chunks take the PyTorch path whatever their length, so how a prompt is
        # chunked (or partly served from the prefix cache) does not change its result;
        # speculative checks may take the native stack, as the decode steps they stand for
        prompt = not all(p.verify for p in items)
        if not any(p.all_logits for p in items):
            return self.model(ids, pos, self.cache, slots, kv_len, last, lora, prompt=prompt), {}
        # the LM head on the last token of each chunk, and on every token of the chunks
        # that want them -- not on the padding of the whole [m, width] block
        rows: list[int] = []
        cols: list[int] = []
        spans: dict[str, tuple[int, int]] = {}
        ends = []
        for i, p in enumerate(items):
            n = len(p.tokens)
            if p.all_logits:
                spans[p.seq_id] = (len(rows), n)
                rows += [i] * n
                cols += list(range(n))
                ends.append(len(rows) - 1)
            else:
                rows.append(i)
                cols.append(n - 1)
                ends.append(len(rows) - 1)
        index = (torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long))
        flat = self.model(ids, pos, self.cache, slots, kv_len, index, lora, prompt=prompt)
        chunks = {sid: flat[a: a + n] for sid, (a, n) in spans.items()}
        return flat[torch.tensor(ends, dtype=torch.long)], chunks
