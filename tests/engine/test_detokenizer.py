"""Streaming detokenization with a byte-level fake tokenizer: deltas, UTF-8 splits, stop strings."""

from __future__ import annotations

import random

import pytest

from fleetlm.engine.detokenizer import Detokenizer


class ByteTokenizer:
    """Ids map to byte strings; decoding concatenates the bytes and replaces bad UTF-8.

    A multi-byte character split over tokens therefore decodes to "\\ufffd" until its
    last byte arrives, as real byte-level BPE tokenizers do.
    """

    def __init__(self) -> None:
        self.pieces: list[bytes] = [b"<eos>"]
        self.special = {0}
        self.longest_decode = 0

    def id(self, piece: bytes) -> int:
        if piece not in self.pieces:
            self.pieces.append(piece)
        return self.pieces.index(piece)

    def ids(self, *pieces: bytes) -> list[int]:
        return [self.id(p) for p in pieces]

    def decode(self, ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = True) -> str:
        assert clean_up_tokenization_spaces is False  # cleanup would change emitted text
        self.longest_decode = max(self.longest_decode, len(ids))
        data = b"".join(self.pieces[i] for i in ids if not (skip_special_tokens and i in self.special))
        return data.decode("utf-8", errors="replace")


@pytest.fixture
def tok() -> ByteTokenizer:
    return ByteTokenizer()


def stream(tok: ByteTokenizer, pieces: list[bytes], stop: list[str] | None = None,
           **kw) -> tuple[list[str], Detokenizer]:
    d = Detokenizer(tok, stop=stop, **kw)
    return [d.push(i) for i in tok.ids(*pieces)], d


def split_bytes(data: bytes, rng: random.Random) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 4)
        out.append(data[i:i + n])
        i += n
    return out


TEXT = "Grüße, € 5 — naïve café 😀 ok! 日本語 ✓"


# --------------------------------------------------------------------------- plain streaming


@pytest.mark.parametrize("seed", range(20))
def test_deltas_concatenate_to_the_full_text(tok, seed):
    pieces = split_bytes(TEXT.encode(), random.Random(seed))
    deltas, d = stream(tok, pieces)
    tail = d.flush()
    assert "".join(deltas) + tail == TEXT
    assert tail == ""  # the text ends on a complete character: nothing was held back
    for delta in deltas:
        assert "\ufffd" not in delta  # never half a character


def test_multibyte_character_is_emitted_only_when_complete(tok):
    deltas, _ = stream(tok, [b"a", b"\xe2", b"\x82", b"\xacb", b"\xf0\x9f", b"\x98", b"\x80", b"c"])
    assert deltas == ["a", "", "", "€b", "", "", "😀", "c"]


def test_each_delta_is_emitted_as_soon_as_it_is_complete(tok):
    deltas, _ = stream(tok, [b"Hello", b",", b" wor", b"ld"])
    assert deltas == ["Hello", ",", " wor", "ld"]


def test_decode_window_stays_small(tok):
    """Incremental: each step decodes a few tokens, not the whole output so far."""
    deltas, d = stream(tok, [b"ab "] * 300)
    assert "".join(deltas) == "ab " * 300
    assert tok.longest_decode <= 3


def test_special_tokens_are_skipped_unless_asked(tok):
    pieces = [b"hi", b"<eos>", b" there"]
    skipped, _ = stream(tok, pieces)
    assert "".join(skipped) == "hi there"
    kept, _ = stream(tok, pieces, skip_special_tokens=False)
    assert "".join(kept) == "hi<eos> there"


def test_flush_releases_an_incomplete_character_at_the_end(tok):
    deltas, d = stream(tok, [b"a", b"\xe2\x82"])
    assert deltas == ["a", ""]
    assert d.flush() == "\ufffd"
    assert d.flush() == ""


def test_flush_without_stop_or_pending_bytes_is_empty(tok):
    deltas, d = stream(tok, [b"abc"])
    assert deltas == ["abc"]
    assert d.flush() == ""


def test_stop_prefix_is_not_held_back_without_stop_strings(tok):
    deltas, _ = stream(tok, [b"ST", b"OP"])
    assert deltas == ["ST", "OP"]


# --------------------------------------------------------------------------- stop strings


def test_stop_string_inside_one_token(tok):
    deltas, d = stream(tok, [b"Hello ", b"xxSTOPyy", b" more"], stop=["STOP"])
    assert deltas == ["Hello ", "xx", ""]
    assert d.stopped
    assert d.flush() == ""


def test_stop_string_spanning_two_tokens(tok):
    deltas, d = stream(tok, [b"ab", b"cST", b"OPd", b"e"], stop=["STOP"])
    assert deltas == ["ab", "c", "", ""]
    assert d.stopped and d.text == "abc"


def test_stop_string_spanning_three_tokens(tok):
    deltas, d = stream(tok, [b"one S", b"T", b"O", b"P two"], stop=["STOP"])
    assert deltas == ["one ", "", "", ""]
    assert d.stopped


def test_stop_string_starting_mid_token(tok):
    deltas, d = stream(tok, [b"abST", b"OPcd"], stop=["STOP"])
    assert deltas == ["ab", ""]
    assert d.stopped


def test_stop_string_at_the_very_start(tok):
    deltas, d = stream(tok, [b"ST", b"OP", b"x"], stop=["STOP"])
    assert deltas == ["", "", ""]
    assert d.stopped and d.flush() == ""


def test_false_stop_prefix_is_emitted_once_disproved(tok):
    deltas, d = stream(tok, [b"abST", b"ay", b" S", b"T", b"O", b"X"], stop=["STOP"])
    assert deltas == ["ab", "STay", " ", "", "", "STOX"]
    assert not d.stopped


def test_false_prefix_followed_by_a_real_stop(tok):
    deltas, d = stream(tok, [b"ST", b"STOP", b"z"], stop=["STOP"])
    assert deltas == ["", "ST", ""]
    assert d.stopped


def test_overlapping_prefix_is_held_only_as_long_as_needed(tok):
    # "aab" is the stop: "aa" might begin it; "aaa" keeps the last two "a"s in doubt
    deltas, d = stream(tok, [b"xa", b"a", b"a", b"c"], stop=["aab"])
    assert deltas == ["x", "", "a", "aac"]
    assert not d.stopped


def test_earliest_of_several_stop_strings_wins(tok):
    for stops in (["END", "##"], ["##", "END"]):
        deltas, d = stream(tok, [b"a##bENDc"], stop=stops)
        assert deltas == ["a"], stops
        deltas, d = stream(tok, [b"aEN", b"D##"], stop=stops)
        assert deltas == ["a", ""], stops
        assert d.text == "a"


def test_each_of_several_stop_strings_is_honoured(tok):
    stops = ["<|end|>", "\n\nUser:"]
    deltas, _ = stream(tok, [b"Sure.", b"\n\n", b"User", b":", b" hi"], stop=stops)
    assert "".join(deltas) == "Sure."
    deltas, _ = stream(tok, [b"Sure.", b"<|", b"end", b"|>", b"x"], stop=stops)
    assert "".join(deltas) == "Sure."
    deltas, d = stream(tok, [b"Sure.", b"\n\n", b"<|", b"x"], stop=stops)
    assert "".join(deltas) == "Sure.\n\n<|x"


def test_stop_string_with_a_split_multibyte_character(tok):
    # "caf" + half of "é" decodes with a replacement char, so the whole token waits
    deltas, d = stream(tok, [b"caf\xc3", b"\xa9!", b"x"], stop=["é!"])
    assert deltas == ["", "caf", ""]
    assert d.stopped and d.text == "caf"
    assert d.push(tok.id(b"more")) == ""


def test_flush_releases_held_back_partial_stop(tok):
    deltas, d = stream(tok, [b"Hi S", b"T"], stop=["STOP"])
    assert deltas == ["Hi ", ""]
    assert d.flush() == "ST"
    assert d.flush() == ""


def test_flush_finds_a_stop_completed_by_pending_bytes(tok):
    # the last token ends in an incomplete character, so it was never decoded in push()
    deltas, d = stream(tok, [b"ab", b"ST", b"OP\xe2"], stop=["STOP"])
    assert deltas == ["ab", "", ""]
    assert d.flush() == ""
    assert d.stopped and d.text == "ab"


def test_nothing_is_emitted_after_a_stop(tok):
    deltas, d = stream(tok, [b"ok", b"STOP", b"after", b"\xe2\x82\xac", b"STOP"], stop=["STOP"])
    assert deltas == ["ok", "", "", "", ""]
    assert d.flush() == ""
    assert d.text == "ok"


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_always_cut_at_the_first_stop(tok, seed):
    text = "Grüße € naïve <|end|> not this <|end|> nor this"
    rng = random.Random(seed)
    deltas, d = stream(tok, split_bytes(text.encode(), rng), stop=["<|end|>", "nor"])
    out = "".join(deltas) + d.flush()
    assert out == "Grüße € naïve "
    assert d.stopped
