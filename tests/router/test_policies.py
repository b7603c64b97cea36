"""Policies: the score convention, the one threshold rule, and each policy's score."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fleetlm.router.policies import (
    AlwaysLarge,
    AlwaysSmall,
    ClassifierPolicy,
    ConfidencePolicy,
    Policy,
    RandomPolicy,
    RouteContext,
    Rule,
    RulesPolicy,
    decide,
    flatten_messages,
    score_from_strong_win_rate,
)


def ctx(prompt: str = "hi", **kw: object) -> RouteContext:
    return RouteContext(prompt=prompt, **kw)  # type: ignore[arg-type]


# --- decide ---------------------------------------------------------------------------------


def test_decide_score_at_or_above_threshold_stays_small() -> None:
    assert decide(0.7, 0.7) == "small"
    assert decide(0.71, 0.7) == "small"
    assert decide(0.69, 0.7) == "large"
    assert decide(0.0, 0.0) == "small"  # threshold 0 never escalates
    assert decide(0.999, 1.0) == "large"
    assert decide(1.0, 1.0) == "small"


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_decide_rejects_thresholds_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match="threshold must be in"):
        decide(0.5, bad)


def test_strong_win_rate_conversion_is_the_complement() -> None:
    assert score_from_strong_win_rate(0.25) == pytest.approx(0.75)
    arr = score_from_strong_win_rate(np.array([0.0, 1.0, 0.4]))
    assert arr.tolist() == pytest.approx([1.0, 0.0, 0.6])
    # RouteLLM: escalate iff win_rate >= t; fleetlm: escalate iff score < 1 - t (score >= 1-t
    # keeps it small), so the two agree except exactly at the boundary
    for w in (0.1, 0.3, 0.5, 0.9):
        assert (decide(score_from_strong_win_rate(w), 1 - 0.45) == "large") == (w > 0.45)


# --- baselines ------------------------------------------------------------------------------


def test_always_policies() -> None:
    assert decide(AlwaysSmall().score(ctx()), 0.999) == "small"
    assert decide(AlwaysLarge().score(ctx()), 0.001) == "large"
    for p in (AlwaysSmall(), AlwaysLarge(), RandomPolicy(), RulesPolicy([])):
        assert isinstance(p, Policy)
        assert p.needs_answer is False


def test_random_is_reproducible_per_prompt_and_seed() -> None:
    a, b = RandomPolicy(seed=1), RandomPolicy(seed=1)
    assert a.score(ctx("what is 2+2")) == b.score(ctx("what is 2+2"))
    assert a.score(ctx("what is 2+2")) != a.score(ctx("what is 2+3"))
    assert RandomPolicy(seed=2).score(ctx("what is 2+2")) != a.score(ctx("what is 2+2"))


def test_random_is_roughly_uniform() -> None:
    p = RandomPolicy(seed=0)
    s = np.array([p.score(ctx(f"prompt number {i}")) for i in range(4000)])
    assert s.min() >= 0.0 and s.max() < 1.0
    counts, _ = np.histogram(s, bins=10, range=(0, 1))
    assert counts.min() > 330 and counts.max() < 470  # expected 400 each, sd ~19
    assert abs(s.mean() - 0.5) < 0.02


# --- rules ----------------------------------------------------------------------------------


def test_rules_first_match_wins_then_default() -> None:
    rules = RulesPolicy([
        Rule(route="large", keywords=("prove", "derive")),
        Rule(route="small", regex=r"(?i)^\s*(hi|hello)\b"),
        Rule(route="large", min_chars=50),
        Rule(route="small", max_chars=10),
    ], default="small")
    assert rules.score(ctx("Hello, please PROVE this")) == 0.0  # rule 1 before rule 2
    assert rules.score(ctx("hello there " + "x" * 60)) == 1.0  # rule 2 before rule 3
    assert rules.score(ctx("y" * 60)) == 0.0  # rule 3
    assert rules.score(ctx("short")) == 1.0  # rule 4
    assert rules.match("a medium sized question") is None
    assert RulesPolicy(rules.rules, default="large").score(ctx("a medium sized question")) == 0.0


def test_rule_conditions_are_anded() -> None:
    r = Rule(route="large", keywords=("sql",), min_chars=20)
    assert not r.matches("sql?")
    assert r.matches("write me a SQL query that joins two tables")
    assert not r.matches("write me a python script please")


def test_rule_validation_names_every_problem() -> None:
    with pytest.raises(ValueError) as e:
        Rule(route="medium", regex="(unclosed", min_chars=-1)  # type: ignore[arg-type]
    msg = str(e.value)
    assert "route must be" in msg and "does not compile" in msg and "min_chars" in msg
    with pytest.raises(ValueError, match="at least one of"):
        Rule(route="small")
    with pytest.raises(ValueError, match="not one string"):
        Rule(route="small", keywords="oops")  # type: ignore[arg-type]


# --- confidence -----------------------------------------------------------------------------


def test_confidence_geometric_mean_and_min() -> None:
    lps = [math.log(0.5), math.log(0.8), math.log(0.9)]
    geo = (0.5 * 0.8 * 0.9) ** (1 / 3)  # 0.7114
    assert ConfidencePolicy().score(ctx(token_logprobs=lps)) == pytest.approx(geo)
    assert ConfidencePolicy("min").score(ctx(token_logprobs=lps)) == pytest.approx(0.5)
    # only the buffered prefix counts
    assert ConfidencePolicy(buffer_tokens=2).score(ctx(token_logprobs=lps)) == \
        pytest.approx(math.sqrt(0.4))
    assert ConfidencePolicy().needs_answer is True


def test_confidence_uses_the_label_probability_when_constrained() -> None:
    c = ctx(token_logprobs=[math.log(0.1)], label_prob=0.93)
    assert ConfidencePolicy().score(c) == pytest.approx(0.93)


def test_confidence_edge_cases() -> None:
    assert ConfidencePolicy().score(ctx(token_logprobs=[])) == 0.0
    assert ConfidencePolicy().score(ctx(token_logprobs=[0.0, 0.0])) == 1.0
    with pytest.raises(ValueError, match="needs the small model's answer"):
        ConfidencePolicy().score(ctx())
    with pytest.raises(ValueError, match="aggregate"):
        ConfidencePolicy("max")  # type: ignore[arg-type]


# --- classifier wrapper and context ---------------------------------------------------------


class _FakeRouter:
    def score(self, prompt: str) -> float:
        return 0.2 if "hard" in prompt else 0.9


def test_classifier_policy_delegates_to_the_router() -> None:
    p = ClassifierPolicy(_FakeRouter())  # type: ignore[arg-type]
    assert p.needs_answer is False
    assert decide(p.score(ctx("a hard one")), 0.5) == "large"
    assert decide(p.score(ctx("easy")), 0.5) == "small"


def test_context_from_messages_flattens_text_parts() -> None:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello"},
                                         {"type": "image_url", "image_url": {"url": "x"}}]}]
    c = RouteContext.from_messages(msgs)
    assert c.prompt == "system: be brief\nuser: hello"
    assert c.prompt == flatten_messages(msgs)
    assert len(c.messages) == 2
