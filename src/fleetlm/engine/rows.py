"""Which KV-cache row each running sequence lives in, kept so decodes are rows 0..n-1.

The batched decode step reads the cache through a view of its first ``n`` rows (no
gather): a gathered read of scattered rows copies every key and value the batch
attends over, each step -- at 32 sequences of 256 positions on SmolLM2 that is about
190 MB per step, more than the int8 weights themselves. So the allocator keeps an
invariant instead: decoding sequences occupy rows ``[0, num_decoding)`` and prefilling
sequences take rows from the top. Keeping it costs a one-off copy of one sequence's
keys and values when a sequence finishes prefill (it moves down to the first free
decode row) and when a decoding sequence leaves (the last decode row moves into the
hole). Each copy is at most one sequence long, once per sequence lifetime, not per step.

Plain Python, no torch: the runner performs the returned :class:`Move`\\ s on the cache.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Move:
    """Copy positions [0, length) of row ``src`` to row ``dst`` (``swap``: exchange the
    first ``length`` positions of both rows; the other row's length is ``other_length``)."""

    src: int
    dst: int
    length: int
    swap: bool = False
    other_length: int = 0


class RowAllocator:
    def __init__(self, num_rows: int) -> None:
        if num_rows <= 0:
            raise ValueError(f"num_rows must be positive, got {num_rows}")
        self.num_rows = num_rows
        self.owner: list[str | None] = [None] * num_rows
        self.row_of: dict[str, int] = {}
        self.num_decoding = 0

    @property
    def num_free(self) -> int:
        return self.num_rows - len(self.row_of)

    def decoding(self) -> list[str]:
        """Decoding sequences in row order (row i of the decode batch)."""
        return [o for o in self.owner[: self.num_decoding] if o is not None]

    def add_prefill(self, seq_id: str) -> int:
        """A row for a new (prefilling) sequence: the highest free row."""
        if seq_id in self.row_of:
            raise ValueError(f"sequence {seq_id!r} already has row {self.row_of[seq_id]}")
        for row in range(self.num_rows - 1, self.num_decoding - 1, -1):
            if self.owner[row] is None:
                self.owner[row] = seq_id
                self.row_of[seq_id] = row
                return row
        raise RuntimeError("no free KV row: the scheduler admitted more sequences than rows")

    def start_decoding(self, seq_id: str, length: int, lengths: dict[str, int]) -> list[Move]:
        """Move a sequence whose prefill finished (``length`` positions written) to row
        ``num_decoding``. ``lengths`` gives the written length of any other sequence."""
        src = self.row_of[seq_id]
        dst = self.num_decoding
        assert src >= dst, "a prefilling sequence sits above the decode rows"
        moves: list[Move] = []
        if src != dst:
            other = self.owner[dst]
            if other is None:
                moves.append(Move(src, dst, length))
                self.owner[src] = None
            else:  # another prefilling sequence sits there: exchange the two rows
                moves.append(Move(src, dst, length, swap=True, other_length=lengths[other]))
                self.owner[src] = other
                self.row_of[other] = src
            self.owner[dst] = seq_id
            self.row_of[seq_id] = dst
        self.num_decoding += 1
        return moves

    def remove(self, seq_id: str, lengths: dict[str, int]) -> list[Move]:
        """Free a sequence's row; a hole among the decode rows is filled by the last one."""
        row = self.row_of.pop(seq_id)
        self.owner[row] = None
        if row >= self.num_decoding:
            return []
        last = self.num_decoding - 1
        self.num_decoding -= 1
        if row == last:
            return []
        mover = self.owner[last]
        assert mover is not None
        self.owner[last] = None
        self.owner[row] = mover
        self.row_of[mover] = row
        return [Move(last, row, lengths[mover])]

    def check(self) -> None:
        """Internal invariants (used by tests)."""
        for sid, row in self.row_of.items():
            assert self.owner[row] == sid
        assert sum(o is not None for o in self.owner) == len(self.row_of)
        assert all(o is not None for o in self.owner[: self.num_decoding])
