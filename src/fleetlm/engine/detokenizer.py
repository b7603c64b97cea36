"""Token ids -> text deltas for streaming, with stop strings cut across token boundaries.

Incremental decoding keeps two offsets into the id list (as vLLM does) so each step
decodes a handful of tokens, not the whole output, and never emits half of a
multi-byte character. Stop strings are searched in the accumulated text, so a stop
string split over several tokens is still found; text that might be the start of a
stop string is held back until it is known not to be one. Stop *tokens* are the
engine's job; this module sees only tokens that belong in the output.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any, stop: list[str] | None = None,
                 skip_special_tokens: bool = True) -> None:
        if tokenizer is None and stop:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer = tokenizer  # None: a weight-only model; every text delta is ""
        self.stop = [s for s in (stop or []) if s]
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all text decoded so far (may extend past a stop string)
        self.emitted = 0  # chars of self.text already returned
        self.stopped = False  # a stop string was found; self.text is cut before it

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to show (maybe "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.emitted - longest + 1)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) != -1]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._take(len(self.text))
            return self._take(len(self.text) - self._partial_stop_len())
        return self._take(len(self.text))

    def _partial_stop_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out

    def flush(self) -> str:
        """At the end of generation: release held-back text (a partial stop string that
        never completed, or trailing bytes of an incomplete character)."""
        out = ""
        if not self.stopped and self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset:])[len(prefix):]
            self.prefix_offset = self.read_offset = len(self.ids)
            out = self._release()
        return out + self._take(len(self.text))
