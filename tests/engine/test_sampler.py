"""Sampler behaviour on hand-made logits: masks, penalties, seeded draws, logprobs, validation."""

from __future__ import annotations

import math

import pytest
import torch

from fleetlm.engine.sampler import (
    RequestSampler,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
)
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.errors import ConfigError

P4 = [0.5, 0.25, 0.15, 0.1]


def logits_of(*rows: list[float]) -> torch.Tensor:
    """[B, V] logits whose softmax is exactly the given probabilities (up to float32)."""
    return torch.tensor(rows, dtype=torch.float32).log()


def kept(masked: torch.Tensor) -> list[set[int]]:
    """Per row, the ids whose logits were not masked to -inf."""
    return [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in masked]


def assert_kept_values_untouched(before: torch.Tensor, after: torch.Tensor) -> None:
    finite = torch.isfinite(after)
    assert torch.equal(after[finite], before[finite])
    assert torch.all(after[~finite] == float("-inf"))


# --------------------------------------------------------------------------- top-k


@pytest.mark.parametrize(("k", "expected"), [(1, {0}), (2, {0, 1}), (3, {0, 1, 2})])
def test_top_k_keeps_the_k_most_likely(k, expected):
    x = logits_of(P4)
    out = apply_top_k(x, k)
    assert kept(out) == [expected]
    assert_kept_values_untouched(x, out)


@pytest.mark.parametrize("k", [0, 4, 10])
def test_top_k_off_or_at_least_vocab_keeps_everything(k):
    x = logits_of(P4)
    assert torch.equal(apply_top_k(x, k), x)


def test_top_k_batched_rows_are_masked_independently():
    x = logits_of([0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1], [0.05, 0.05, 0.1, 0.8])
    out = apply_top_k(x, 2)
    assert kept(out) == [{1, 3}, {0, 1}, {3, 2}]
    assert_kept_values_untouched(x, out)


def test_top_k_keeps_ties_at_the_boundary():
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0], [3.0, 1.0, 1.0, 1.0]])
    assert kept(apply_top_k(x, 1)) == [{1, 2}, {0}]
    assert kept(apply_top_k(x, 2)) == [{1, 2}, {0, 1, 2, 3}]


# --------------------------------------------------------------------------- top-p


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.3, {0}),
        (0.5, {0}),  # 0.5 reached exactly by the top token alone
        (0.6, {0, 1}),
        (0.75, {0, 1}),  # 0.5 + 0.25 reaches p exactly: the third token is not needed
        (0.76, {0, 1, 2}),
        (0.9, {0, 1, 2}),  # 0.5 + 0.25 + 0.15 reaches p exactly
        (0.95, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(p, expected):
    x = logits_of(P4)
    out = apply_top_p(x, p)
    assert kept(out) == [expected]
    assert_kept_values_untouched(x, out)


def test_top_p_exact_edge_with_dyadic_probabilities():
    # probabilities exact in binary: cumulative sums are exact, so the edge is unambiguous
    x = logits_of([0.125, 0.5, 0.125, 0.25])
    assert kept(apply_top_p(x, 0.5)) == [{1}]
    assert kept(apply_top_p(x, 0.75)) == [{1, 3}]
    just_over = kept(apply_top_p(x, 0.7500001))[0]
    assert len(just_over) == 3 and just_over > {1, 3}  # plus one of the tied 0.125s


def test_top_p_batched_rows_with_different_distributions():
    x = logits_of([0.1, 0.15, 0.25, 0.5], [0.25, 0.25, 0.25, 0.25], [0.97, 0.01, 0.01, 0.01])
    out = apply_top_p(x, 0.75)
    rows = kept(out)
    assert rows[0] == {3, 2}
    assert len(rows[1]) == 3  # uniform: 0.25 * 3 reaches 0.75 (which three is a tie)
    assert rows[2] == {0}
    assert_kept_values_untouched(x, out)


def test_top_p_is_shift_invariant_on_unnormalised_logits():
    x = logits_of(P4) + 7.0
    assert kept(apply_top_p(x, 0.75)) == [{0, 1}]


def test_top_p_ignores_tokens_already_masked():
    x = apply_top_k(logits_of(P4), 2)  # renormalised: 2/3, 1/3
    assert kept(apply_top_p(x, 0.6)) == [{0}]
    assert kept(apply_top_p(x, 0.7)) == [{0, 1}]


# --------------------------------------------------------------------------- min-p


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [(0.0, {0, 1, 2, 3}), (0.1, {0, 1, 2, 3}), (0.25, {0, 1, 2}), (0.4, {0, 1}), (0.6, {0}), (1.0, {0})],
)
def test_min_p_drops_tokens_below_fraction_of_top(min_p, expected):
    x = logits_of(P4)
    out = apply_min_p(x, min_p)
    assert kept(out) == [expected]
    assert_kept_values_untouched(x, out)


def test_min_p_threshold_is_relative_to_each_rows_top_token():
    x = logits_of([0.5, 0.25, 0.15, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4])
    assert kept(apply_min_p(x, 0.7)) == [{0}, {0, 1, 2, 3}, {2, 3}]


# --------------------------------------------------------------------------- at least one survives


@pytest.mark.parametrize("seed", range(5))
def test_every_mask_keeps_at_least_the_top_token(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 50, generator=g) * 10
    x[0, 1:] = x[0, 0]  # a row of exact ties
    x[1, :] = x[1, 0]
    x[1, 3] = x[1, 0] + 30  # one overwhelming token: everything else ~0 probability
    for out in (apply_top_k(x, 1), apply_top_p(x, 1e-9), apply_top_p(x, 0.0), apply_min_p(x, 1.0),
                apply_min_p(apply_top_p(apply_top_k(x, 1), 1e-9), 1.0)):
        finite = torch.isfinite(out)
        assert finite.any(-1).all()
        # what survives includes a most likely token (with ties, any one of them)
        assert torch.equal(x.masked_fill(~finite, float("-inf")).amax(-1), x.amax(-1))


# --------------------------------------------------------------------------- penalties


def test_repetition_penalty_divides_seen_positive_and_multiplies_seen_negative():
    x = torch.tensor([2.0, -2.0, 2.0, -2.0, 0.0, 3.0])
    seen = torch.tensor([True, True, False, False, True, True])
    out = apply_repetition_penalty(x, seen, 2.0)
    assert out.tolist() == [1.0, -4.0, 2.0, -2.0, 0.0, 1.5]


def test_repetition_penalty_below_one_rewards_seen_tokens():
    x = torch.tensor([2.0, -2.0, 1.0])
    seen = torch.tensor([True, True, False])
    assert apply_repetition_penalty(x, seen, 0.5).tolist() == [4.0, -1.0, 1.0]


def test_repetition_penalty_batched():
    x = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    seen = torch.tensor([[True, False], [False, True]])
    assert apply_repetition_penalty(x, seen, 4.0).tolist() == [[0.25, -1.0], [1.0, -4.0]]


def test_repetition_penalty_of_one_is_identity():
    x = torch.tensor([2.0, -2.0])
    assert torch.equal(apply_repetition_penalty(x, torch.tensor([True, True]), 1.0), x)


def test_presence_and_frequency_penalties_openai_rule():
    x = torch.tensor([1.0, 1.0, 1.0, -1.0])
    counts = torch.tensor([0, 1, 3, 2], dtype=torch.int32)
    out = apply_presence_frequency(x, counts, presence=0.5, frequency=0.25)
    # logit - presence * [count > 0] - frequency * count
    assert out.tolist() == [1.0, 0.25, -0.25, -2.0]
    assert out.dtype == torch.float32
    only_presence = apply_presence_frequency(x, counts, presence=0.5, frequency=0.0)
    assert only_presence.tolist() == [1.0, 0.5, 0.5, -1.5]
    only_frequency = apply_presence_frequency(x, counts, presence=0.0, frequency=0.5)
    assert only_frequency.tolist() == [1.0, 0.5, -0.5, -2.0]
    negative = apply_presence_frequency(x, counts, presence=-1.0, frequency=0.0)
    assert negative.tolist() == [1.0, 2.0, 2.0, 0.0]


# --------------------------------------------------------------------------- RequestSampler


def draws(sampler: RequestSampler, logits: torch.Tensor, n: int) -> list[int]:
    return [sampler.sample(logits).token_id for _ in range(n)]


FLAT16 = torch.linspace(0.0, 1.0, 16)  # 16 plausible tokens


def test_same_seed_reproduces_the_same_tokens():
    params = SamplingParams(temperature=1.0, seed=1234)
    a = draws(RequestSampler(params, 16, []), FLAT16, 50)
    b = draws(RequestSampler(params, 16, []), FLAT16, 50)
    assert a == b
    assert len(set(a)) > 4  # really sampled, not greedy


def test_different_seed_gives_a_different_sequence():
    a = draws(RequestSampler(SamplingParams(seed=1), 16, []), FLAT16, 50)
    b = draws(RequestSampler(SamplingParams(seed=2), 16, []), FLAT16, 50)
    assert a != b


def test_seeded_request_is_unaffected_by_other_requests_and_global_rng():
    params = SamplingParams(seed=7, top_p=0.9)
    alone = draws(RequestSampler(params, 16, []), FLAT16, 30)
    mine = RequestSampler(params, 16, [])
    other = RequestSampler(SamplingParams(seed=8), 16, [])
    mixed = []
    for i in range(30):
        torch.manual_seed(i)  # someone reseeding the global generator
        torch.rand(3)
        other.sample(FLAT16)
        mixed.append(mine.sample(FLAT16).token_id)
    assert mixed == alone


def test_sampled_frequencies_follow_the_distribution():
    logits = logits_of(P4)[0]
    s = RequestSampler(SamplingParams(seed=0), 4, [])
    counts = torch.bincount(torch.tensor(draws(s, logits, 4000)), minlength=4).float() / 4000
    torch.testing.assert_close(counts, torch.tensor(P4), atol=0.03, rtol=0)


def test_sampling_never_picks_truncated_tokens():
    logits = logits_of(P4)[0]
    assert set(draws(RequestSampler(SamplingParams(seed=0, top_k=2), 4, []), logits, 300)) == {0, 1}
    assert set(draws(RequestSampler(SamplingParams(seed=0, top_p=0.75), 4, []), logits, 300)) == {0, 1}
    assert set(draws(RequestSampler(SamplingParams(seed=0, min_p=0.25), 4, []), logits, 300)) == {0, 1, 2}


def test_temperature_sharpens_and_flattens():
    logits = logits_of(P4)[0]
    cold = draws(RequestSampler(SamplingParams(seed=0, temperature=0.25), 4, []), logits, 1000)
    hot = draws(RequestSampler(SamplingParams(seed=0, temperature=4.0), 4, []), logits, 1000)
    # T=0.25: p ∝ p^4 -> token 0 has 0.5^4 / sum = ~0.93; T=4: p ∝ p^0.25 -> 0.31, 0.26, 0.23, 0.21
    # (T=1 would give 0.5 and 0.1)
    assert cold.count(0) / 1000 > 0.88
    assert hot.count(0) / 1000 < 0.36
    assert 0.16 < hot.count(3) / 1000 < 0.25


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=1.5)])
def test_greedy_picks_argmax_without_a_generator(params):
    s = RequestSampler(params, 6, [])
    assert s.generator is None
    logits = torch.tensor([0.1, 0.3, 2.0, 1.99, -5.0, 0.0])
    assert draws(s, logits, 5) == [2] * 5
    assert s.sample(torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0, 5.5])).token_id == 5


def test_tiny_temperature_behaves_like_argmax():
    logits = torch.tensor([1.0, 0.9, 0.95, -1.0])
    s = RequestSampler(SamplingParams(temperature=1e-3, seed=3), 4, [])
    assert s.generator is not None
    assert draws(s, logits, 50) == [0] * 50


@pytest.mark.parametrize("temperature", [1e-37, 1e-40])
def test_vanishing_temperature_does_not_overflow(temperature):
    """Valid temperatures so small that logit / T overflows float32 still pick the top token."""
    logits = torch.tensor([40.0, 39.0, -50.0, 0.0])
    s = RequestSampler(SamplingParams(temperature=temperature, seed=0).validate(), 4, [])
    assert draws(s, logits, 5) == [0] * 5


def test_sample_ignores_padded_vocab_columns():
    logits = torch.tensor([0.0, 1.0, 0.5, 100.0])  # column 3 is padding beyond vocab_size
    assert RequestSampler(SamplingParams(temperature=0.0), 3, []).sample(logits).token_id == 1
    assert set(draws(RequestSampler(SamplingParams(seed=0), 3, []), logits, 100)) <= {0, 1, 2}


def test_logprobs_are_log_softmax_of_raw_logits_with_sorted_top_k():
    raw = torch.tensor([1.0, 3.0, -0.5, 2.0, 0.0])
    params = SamplingParams(temperature=0.5, seed=0, repetition_penalty=1.5, logprobs=3)
    s = RequestSampler(params, 5, prompt_ids=[1])
    ref = torch.log_softmax(raw, -1)
    for _ in range(10):
        r = s.sample(raw)
        assert r.logprob == pytest.approx(float(ref[r.token_id]), abs=1e-6)
        assert [t for t, _ in r.top_logprobs] == [1, 3, 0]
        assert [v for _, v in r.top_logprobs] == pytest.approx(ref[[1, 3, 0]].tolist(), abs=1e-6)
        vals = [v for _, v in r.top_logprobs]
        assert vals == sorted(vals, reverse=True)


def test_logprobs_off_and_zero():
    raw = torch.tensor([0.0, 1.0])
    off = RequestSampler(SamplingParams(temperature=0.0), 2, []).sample(raw)
    assert off.logprob is None and off.top_logprobs == []
    zero = RequestSampler(SamplingParams(temperature=0.0, logprobs=0), 2, []).sample(raw)
    assert zero.top_logprobs == []
    assert zero.logprob == pytest.approx(-math.log1p(math.exp(-1.0)), abs=1e-6)


def test_repetition_penalty_changes_greedy_choice_from_prompt():
    logits = torch.tensor([2.0, 1.9, -1.0])
    plain = RequestSampler(SamplingParams(temperature=0.0), 3, prompt_ids=[0])
    assert plain.sample(logits).token_id == 0
    penalised = RequestSampler(SamplingParams(temperature=0.0, repetition_penalty=1.2), 3, prompt_ids=[0])
    assert penalised.sample(logits).token_id == 1  # 2.0 / 1.2 < 1.9


def test_repetition_penalty_pushes_negative_seen_logits_further_down():
    logits = torch.tensor([-1.0, -1.1, -5.0])
    s = RequestSampler(SamplingParams(temperature=0.0, repetition_penalty=1.2), 3, prompt_ids=[0])
    assert s.sample(logits).token_id == 1  # -1.0 * 1.2 < -1.1 (dividing would have raised it)


def test_repetition_penalty_covers_generated_tokens():
    logits = torch.tensor([3.0, 2.0, 1.4])
    s = RequestSampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), 3, prompt_ids=[])
    # 0 (3.0); then 0 is seen: 1.5 < 2.0 -> 1; then 1 is seen too: 1.5 > 1.4 > 1.0 -> 0
    assert draws(s, logits, 4) == [0, 1, 0, 0]


def test_frequency_penalty_grows_with_each_repeat():
    logits = torch.tensor([3.0, 2.0, -10.0])
    s = RequestSampler(SamplingParams(temperature=0.0, frequency_penalty=0.4), 3, prompt_ids=[0, 0, 0])
    # prompt tokens do not count; token 0 loses 0.4 per use: 3.0, 2.6, 2.2, 1.8 < 2.0 ...
    assert draws(s, logits, 8) == [0, 0, 0, 1, 0, 1, 0, 1]


def test_presence_penalty_is_paid_once():
    logits = torch.tensor([3.0, 2.5, 0.0])
    s = RequestSampler(SamplingParams(temperature=0.0, presence_penalty=1.0), 3, [])
    assert draws(s, logits, 5) == [0, 1, 0, 0, 0]


def test_penalties_off_allocate_no_state():
    s = RequestSampler(SamplingParams(seed=0), 10, [1, 2])
    assert s.counts is None and s.seen is None


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "kwargs", "vocab"),
    [
        ("max_tokens", {"max_tokens": 0}, None),
        ("temperature", {"temperature": -0.1}, None),
        ("temperature", {"temperature": 100.5}, None),
        ("temperature", {"temperature": float("nan")}, None),
        ("top_k", {"top_k": -1}, None),
        ("top_p", {"top_p": 0.0}, None),
        ("top_p", {"top_p": 1.01}, None),
        ("min_p", {"min_p": -0.01}, None),
        ("min_p", {"min_p": 1.5}, None),
        ("repetition_penalty", {"repetition_penalty": 0.0}, None),
        ("presence_penalty", {"presence_penalty": 2.5}, None),
        ("frequency_penalty", {"frequency_penalty": -2.01}, None),
        ("logprobs", {"logprobs": 21}, None),
        ("logprobs", {"logprobs": -1}, None),
        ("stop:", {"stop": ["ok", ""]}, None),
        ("stop:", {"stop": ["s"] * 17}, None),
        ("stop_token_ids", {"stop_token_ids": [3, 128]}, 128),
        ("stop_token_ids", {"stop_token_ids": [-1]}, 128),
    ],
)
def test_each_invalid_field_is_named(field, kwargs, vocab):
    with pytest.raises(ConfigError) as info:
        SamplingParams(**kwargs).validate(vocab_size=vocab)
    msg = str(info.value)
    assert field in msg
    others = {"max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
              "presence_penalty", "frequency_penalty", "logprobs", "stop_token_ids"} - {field}
    assert not [o for o in others if o in msg], msg


def test_several_invalid_fields_are_listed_in_one_error():
    params = SamplingParams(max_tokens=0, top_p=2.0, logprobs=50, presence_penalty=-3.0)
    with pytest.raises(ConfigError) as info:
        params.validate()
    msg = str(info.value)
    for name in ("max_tokens=0", "top_p=2.0", "logprobs=50", "presence_penalty=-3.0"):
        assert name in msg


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"max_tokens": 1, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
        {"temperature": 100.0, "top_p": 1e-6, "min_p": 1.0, "repetition_penalty": 0.01},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0, "logprobs": 0},
        {"logprobs": 20, "stop": ["x"] * 16, "stop_token_ids": [0, 127]},
    ],
)
def test_boundary_values_are_valid(kwargs):
    params = SamplingParams(**kwargs)
    assert params.validate(vocab_size=128) is params


def test_stop_token_ids_are_not_range_checked_without_vocab():
    SamplingParams(stop_token_ids=[10**6]).validate()
