"""synthesize and filter_synthetic against a loopback teacher stub: parsing, budget caps,
retries, timeouts, dedup and label confirmation. (The end-to-end test with a real
fleetlm server as teacher lives with the pipeline tests.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from fleetlm.errors import ConfigError
from fleetlm.tune import synthesize as synth_mod
from fleetlm.tune.config import TuneConfig
from fleetlm.tune.filter import filter_synthetic, normalize_label
from fleetlm.tune.records import Example, classification_example
from fleetlm.tune.synthesize import parse_lines, parse_pairs, synthesize
from tests.openai_stub import USAGE, Reply, Stub

MakeCfg = Callable[..., TuneConfig]
StartStub = Callable[..., Stub]

SEEDS = [classification_example(t, label) for t, label in [
    ("Where is my card?", "card_arrival"), ("My card has not arrived yet", "card_arrival"),
    ("When will the card come?", "card_arrival"), ("Why was I charged a fee?", "fee"),
    ("What is this fee on my statement?", "fee")]]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth_mod, "BACKOFF_S", 0.01)


def cfg_for(make_cfg: MakeCfg, stub_url: str, task_type: str = "classification",
            teacher: dict[str, Any] | None = None, **synth: Any) -> TuneConfig:
    return make_cfg(task_type, task={"description": "Banking support intents"},
                    synthesize={"enabled": True, "teacher": {"base_url": stub_url, "model": "tch",
                                                             **(teacher or {})}, **synth})


def label_of(body: dict[str, Any]) -> str:
    user = body["messages"][-1]["content"]
    return user.split("Intent (label): ")[1].split("\n")[0]


# ----------------------------------------------------------------------------- parsing


def test_parse_lines_strips_numbering_bullets_and_quotes() -> None:
    reply = ('Here are 5 new messages:\n\n1. "Where\'s my new card?"\n2) Has it shipped\n'
             '- “Is the card on its way?”\n* \'card status\'\n```\n3. Track my card please\n')
    assert parse_lines(reply) == ["Where's my new card?", "Has it shipped",
                                  "Is the card on its way?", "card status",
                                  "Track my card please"]


def test_parse_pairs_is_robust() -> None:
    fenced = '```json\n[{"instruction": "Add 2 and 3", "answer": "5"}, {"instruction": "x"}]\n```'
    assert parse_pairs(fenced) == [("Add 2 and 3", "5")]
    chatty = 'Sure! [{"prompt": "Say hi", "response": "Hi"}] Hope this helps.'
    assert parse_pairs(chatty) == [("Say hi", "Hi")]
    lines = '{"instruction": "a", "answer": "b"}\n{"instruction": "c", "answer": "d"}'
    assert parse_pairs(lines) == [("a", "b"), ("c", "d")]
    assert parse_pairs('{"examples": [{"question": "q", "output": "o"}]}') == [("q", "o")]
    assert parse_pairs("I cannot do that.") == []


# ----------------------------------------------------------------------------- synthesize


def test_classification_synthesis(make_cfg: MakeCfg, teacher_stub: StartStub,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEACHER_KEY", "sekret")
    stub = teacher_stub(lambda body, i: "\n".join(
        f"{k + 1}. new {label_of(body)} text {k}" for k in range(12)))
    cfg = cfg_for(make_cfg, stub.base_url, teacher={"api_key_env": "TEACHER_KEY"},
                  per_label=13, seed_examples=2)
    res = asyncio.run(synthesize(SEEDS, cfg))
    # 13 per label = one request of 10 + one of 3, for 2 labels
    assert len(stub.bodies) == 4 and res.report["requests"] == 4
    assert [r.label for r in res.rows] == ["card_arrival"] * 13 + ["fee"] * 13
    assert res.rows[0].text == "new card_arrival text 0" and res.rows[0].answer == "card_arrival"
    assert all(r.source == "synthetic" and r.meta == {"teacher": "tch"} for r in res.rows)
    assert res.report["tokens"] == 4 * USAGE["total_tokens"] and res.report["failures"] == 0
    body = stub.bodies[0]
    assert body["model"] == "tch" and "Banking support intents" in body["messages"][-1]["content"]
    assert stub.headers[0]["Authorization"] == "Bearer sekret"
    fee_prompt = next(b for b in stub.bodies if label_of(b) == "fee")["messages"][-1]["content"]
    assert sum(s.text in fee_prompt for s in SEEDS if s.label == "fee") == 2  # seed_examples
    assert "Where is my card" not in fee_prompt


def test_plan_is_seeded(make_cfg: MakeCfg, teacher_stub: StartStub) -> None:
    stub = teacher_stub(lambda body, i: "x")
    many = [classification_example(f"seed text {i}", "l") for i in range(50)]
    prompts = []
    for seed in (0, 0, 1):
        stub.bodies.clear()
        cfg = cfg_for(make_cfg, stub.base_url, per_label=5, seed_examples=3)
        cfg = cfg.model_copy(update={"seed": seed})
        asyncio.run(synthesize(many, cfg))
        prompts.append((stub.bodies[0]["messages"][-1]["content"], stub.bodies[0]["seed"]))
    assert prompts[0] == prompts[1] and prompts[0] != prompts[2]


def test_missing_api_key_env_names_the_field(make_cfg: MakeCfg, teacher_stub: StartStub,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    cfg = cfg_for(make_cfg, "http://127.0.0.1:9/v1", teacher={"api_key_env": "NO_SUCH_KEY"})
    with pytest.raises(ConfigError, match=r"synthesize\.teacher\.api_key_env.*NO_SUCH_KEY"):
        asyncio.run(synthesize(SEEDS, cfg))


def test_request_budget_stops_new_requests(make_cfg: MakeCfg, teacher_stub: StartStub) -> None:
    stub = teacher_stub(lambda body, i: "a text")
    seeds = [classification_example(f"t{i}", f"label{i}") for i in range(10)]
    cfg = cfg_for(make_cfg, stub.base_url, per_label=1, max_requests=3, concurrency=2)
    res = asyncio.run(synthesize(seeds, cfg))
    assert len(stub.bodies) == 3 and res.report["requests"] == 3
    assert res.report["stopped_by_budget"] is True and res.report["planned_requests"] == 10
    assert len(res.rows) == 3 and res.report["failures"] == 0


def test_token_budget_stops_new_requests(make_cfg: MakeCfg, teacher_stub: StartStub) -> None:
    stub = teacher_stub(lambda body, i: Reply("a text", usage={
        "prompt_tokens": 60, "completion_tokens": 40, "total_tokens": 100}))
    seeds = [classification_example(f"t{i}", f"label{i}") for i in range(10)]
    cfg = cfg_for(make_cfg, stub.base_url, per_label=1, max_tokens_total=250, concurrency=1)
    res = asyncio.run(synthesize(seeds, cfg))
    assert len(stub.bodies) == 3 and res.report["tokens"] == 300
    assert res.report["stopped_by_budget"] is True


def test_retries_on_5xx_then_succeeds(make_cfg: MakeCfg, teacher_stub: StartStub) -> None:
    stub = teacher_stub(lambda body, i: Reply(status=500) if i < 2 else "the text")
    cfg = cfg_for(make_cfg, stub.base_url, per_label=1, concurrency=1)
    res = asyncio.run(synthesize(SEEDS[:1], cfg))
    assert len(stub.bodies) == 3 and res.report["retries"] == 2
    assert res.report["failures"] == 0 and [r.text for r in res.rows] == ["the text"]


def test_retry_after_429_and_give_up(make_cfg: MakeCfg, teacher_stub: StartStub) -> None:
    stub = teacher_stub(lambda body, i: Reply(status=429, headers={"Retry-After": "0"}))
    cfg = cfg_for(make_cfg, stub.base_url, per_label=1)
    res = asyncio.run(synthesize(SEEDS[:1], cfg))
    assert len(stub.bodies) == synth_mod.MAX_ATTEMPTS
    assert res.report["failures"] == 1 and res.report["errors"] == {"HTTP 429": 1}
    assert res.rows == []


def test_client_errors_are_not_retried(make_cfg: MakeCfg, teacher_stub: StartStub) -> None:
    stub = teacher_stub(lambda body, i: Reply(status=404))
    res = asyncio.run(synthesize(SEEDS[:1], cfg_for(make_cfg, stub.base_url, per_label=1)))
    assert len(stub.bodies) == 1 and res.report["failures"] == 1
    assert next(iter(res.report["errors"])).startswith("HTTP 404")


def test_slow_teacher_times_out(make_cfg: MakeCfg, teacher_stub: StartStub) -> None:
    stub = teacher_stub(lambda body, i: Reply("late", delay_s=3.0))
    cfg = cfg_for(make_cfg, stub.base_url, teacher={"timeout_s": 0.3}, per_label=1)
    t0 = time.perf_counter()
    res = asyncio.run(synthesize(SEEDS, cfg))
    assert time.perf_counter() - t0 < 2.0
    assert res.report["failures"] == 2 and res.rows == []
    assert "timeout" in next(iter(res.report["errors"]))


def test_unreachable_teacher_is_retried_then_counted(make_cfg: MakeCfg,
                                                     teacher_stub: StartStub) -> None:
    stub = teacher_stub(lambda body, i: "x")
    url = stub.base_url
    stub.close()  # nothing listens on the port any more
    res = asyncio.run(synthesize(SEEDS[:1], cfg_for(make_cfg, url, per_label=1)))
    assert res.report["requests"] == synth_mod.MAX_ATTEMPTS and res.report["failures"] == 1
    assert "connection error" in next(iter(res.report["errors"]))


def test_generation_synthesis_parses_json_and_counts_unparsable(
        make_cfg: MakeCfg, teacher_stub: StartStub) -> None:
    def reply(body: dict[str, Any], i: int) -> str:
        if i == 1:
            return "I'd rather not."
        return '```json\n[' + ",".join(
            f'{{"instruction": "q{i}-{k}", "answer": "a{k}"}}' for k in range(5)) + "]\n```"

    stub = teacher_stub(reply)
    seeds = [Example(prompt=({"role": "system", "content": "Be terse."},
                             {"role": "user", "content": f"seed q{i}"}), answer=f"seed a{i}")
             for i in range(3)]
    cfg = cfg_for(make_cfg, stub.base_url, "chat", num_instructions=12, concurrency=1)
    res = asyncio.run(synthesize(seeds, cfg))
    assert len(stub.bodies) == 3  # 5 + 5 + 2
    assert res.report["unparsable"] == 1 and len(res.rows) == 5 + 2
    row = res.rows[0]
    assert row.prompt == ({"role": "system", "content": "Be terse."},
                          {"role": "user", "content": "q0-0"})
    assert row.answer == "a0" and row.source == "synthetic" and row.label is None
    assert '"instruction": "seed q' in stub.bodies[0]["messages"][-1]["content"]


def test_a_given_client_is_used_and_left_open(make_cfg: MakeCfg, teacher_stub: StartStub) -> None:
    stub = teacher_stub(lambda body, i: "text")

    async def run() -> bool:
        async with httpx.AsyncClient() as client:
            await synthesize(SEEDS[:1], cfg_for(make_cfg, stub.base_url, per_label=1),
                             client=client)
            return client.is_closed

    assert asyncio.run(run()) is False and len(stub.bodies) == 1


# ----------------------------------------------------------------------------- filter


def classify_by_keyword(body: dict[str, Any], i: int) -> str:
    text = body["messages"][-1]["content"].split("Text: ")[1].split("\n\n")[0]
    if "fee" in text:
        return "Label: fee."
    if "card" in text:
        return "`card_arrival`"
    return "I am not sure"


def test_filter_drops_each_reason(make_cfg: MakeCfg, teacher_stub: StartStub) -> None:
    stub = teacher_stub(classify_by_keyword)
    synthetic = [classification_example(t, label, source="synthetic") for t, label in [
        ("Has my new card been posted?", "card_arrival"),  # kept
        ("where is my card", "card_arrival"),  # exact duplicate of a data row
        ("Has my new card been posted", "card_arrival"),  # duplicate of the first (exact)
        ("posted been my card has new", "card_arrival"),  # near duplicate (same words)
        ("ok", "fee"),  # too short
        ("a fee " * 200, "fee"),  # too long
        ("Why is there a fee on my card?", "fee"),  # kept ("Label: fee.")
        ("Where is my card? the fee one", "card_arrival"),  # mismatch: teacher says fee
        ("Something unrelated entirely", "fee"),  # unparsable answer
    ]]
    cfg = cfg_for(make_cfg, stub.base_url)
    res = asyncio.run(filter_synthetic(synthetic, SEEDS, cfg))
    r = res.report
    assert [ex.text for ex in res.kept] == ["Has my new card been posted?",
                                            "Why is there a fee on my card?"]
    assert (r["duplicate_exact"], r["duplicate_near"], r["too_short"], r["too_long"]) == \
        (2, 1, 1, 1)
    assert (r["label_mismatch"], r["label_unparsable"], r["confirm_failed"]) == (1, 1, 0)
    assert r["rows_in"] == 9 and r["kept"] == 2 and r["teacher"]["requests"] == 4
    labels_prompt = stub.bodies[0]["messages"][-1]["content"]
    assert "- card_arrival\n- fee" in labels_prompt
    assert stub.bodies[0]["temperature"] == 0.0


def test_filter_counts_failed_confirmations(make_cfg: MakeCfg, teacher_stub: StartStub) -> None:
    stub = teacher_stub(lambda body, i: Reply(status=400))
    synthetic = [classification_example("Has my new card been posted?", "card_arrival",
                                        source="synthetic")]
    res = asyncio.run(filter_synthetic(synthetic, SEEDS, cfg_for(make_cfg, stub.base_url)))
    assert res.kept == [] and res.report["confirm_failed"] == 1


def test_filter_without_label_confirmation_sends_nothing(make_cfg: MakeCfg) -> None:
    synthetic = [classification_example("Has my new card been posted?", "card_arrival",
                                        source="synthetic")]
    cfg = make_cfg(filter={"confirm_labels": False})  # no teacher configured at all
    res = asyncio.run(filter_synthetic(synthetic, SEEDS, cfg))
    assert len(res.kept) == 1 and "teacher" not in res.report


def test_filter_needs_a_teacher_to_confirm_labels(make_cfg: MakeCfg) -> None:
    synthetic = [classification_example("Has my new card been posted?", "card_arrival")]
    with pytest.raises(ConfigError, match=r"synthesize\.teacher.*filter\.confirm_labels"):
        asyncio.run(filter_synthetic(synthetic, SEEDS, make_cfg()))


def test_normalize_label() -> None:
    assert normalize_label('  "Card_Arrival".\nBecause the text asks...') == "card_arrival"
    assert normalize_label("Label: fee") == normalize_label("**fee**") == "fee"
