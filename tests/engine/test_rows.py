"""KV-row bookkeeping (no torch): decodes stay in rows 0..n-1 through joins and leaves."""

from __future__ import annotations

import random

import pytest

from fleetlm.engine.rows import RowAllocator


def _simulate(alloc: RowAllocator, moves, data):
    """Apply moves to a model of the cache: row -> list of written tokens."""
    for m in moves:
        if m.swap:
            a, b = data[m.src][: m.length], data[m.dst][: m.other_length]
            data[m.dst], data[m.src] = list(a), list(b)
        else:
            data[m.dst] = list(data[m.src][: m.length])


def test_prefill_rows_come_from_the_top_and_decodes_from_the_bottom():
    alloc = RowAllocator(4)
    assert alloc.add_prefill("a") == 3
    assert alloc.add_prefill("b") == 2
    moves = alloc.start_decoding("b", 5, {"a": 3, "b": 5})
    assert [(m.src, m.dst, m.length) for m in moves] == [(2, 0, 5)]
    assert alloc.decoding() == ["b"]
    alloc.check()


def test_finishing_prefill_swaps_with_a_prefilling_sequence_in_the_way():
    alloc = RowAllocator(2)
    alloc.add_prefill("a")  # row 1
    alloc.add_prefill("b")  # row 0
    moves = alloc.start_decoding("a", 7, {"a": 7, "b": 3})
    assert len(moves) == 1 and moves[0].swap and moves[0].other_length == 3
    assert alloc.row_of == {"a": 0, "b": 1}
    alloc.check()


def test_a_leaving_decode_is_replaced_by_the_last_decode_row():
    alloc = RowAllocator(3)
    lengths = {}
    for sid in "abc":
        alloc.add_prefill(sid)
        lengths[sid] = 4
        alloc.start_decoding(sid, 4, lengths)
    assert alloc.decoding() == ["a", "b", "c"]
    moves = alloc.remove("a", lengths)
    assert [(m.src, m.dst) for m in moves] == [(2, 0)]
    assert alloc.decoding() == ["c", "b"]
    assert alloc.remove("b", lengths) == []  # the last decode row leaves: nothing moves
    alloc.check()


def test_full_allocator_refuses():
    alloc = RowAllocator(1)
    alloc.add_prefill("a")
    with pytest.raises(RuntimeError, match="no free KV row"):
        alloc.add_prefill("b")
    with pytest.raises(ValueError):
        RowAllocator(0)


@pytest.mark.parametrize("seed", range(5))
def test_random_joins_and_leaves_keep_every_sequence_data(seed):
    """Model each row's contents; after any mix of events, every sequence still finds
    exactly its own tokens in its row and decodes occupy rows 0..n-1."""
    rng = random.Random(seed)
    n = 6
    alloc = RowAllocator(n)
    data: list[list[str]] = [[] for _ in range(n)]
    lengths: dict[str, int] = {}
    state: dict[str, str] = {}
    for step in range(400):
        live = list(state)
        op = rng.random()
        if op < 0.3 and alloc.num_free:
            sid = f"s{step}"
            row = alloc.add_prefill(sid)
            data[row] = []
            lengths[sid] = 0
            state[sid] = "prefill"
        elif op < 0.6 and live:
            sid = rng.choice(live)
            row = alloc.row_of[sid]
            data[row] = data[row][: lengths[sid]] + [sid]
            lengths[sid] += 1
            if state[sid] == "prefill" and rng.random() < 0.4:
                _simulate(alloc, alloc.start_decoding(sid, lengths[sid], lengths), data)
                state[sid] = "decode"
        elif live:
            sid = rng.choice(live)
            _simulate(alloc, alloc.remove(sid, lengths), data)
            del state[sid], lengths[sid]
        alloc.check()
        assert sorted(alloc.decoding()) == sorted(s for s, st in state.items() if st == "decode")
        for sid, row in alloc.row_of.items():
            assert data[row][: lengths[sid]] == [sid] * lengths[sid], (step, sid)
