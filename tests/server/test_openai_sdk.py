"""Slow: the official openai SDK, unmodified, against a live fleetlm server on loopback
(the real default model, float32, greedy where outputs are compared)."""

from __future__ import annotations

import time

import pytest

from tests.server.conftest import live_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("adapters"), with_demo=True) as live:
        yield f"{live.url}/v1", live.engine, live.lm


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0], api_key="unused", max_retries=0)


def _ask(client, **kw):
    return client.chat.completions.create(
        messages=[{"role": "user", "content": "What is the capital of France?"}], **kw)


def test_chat_answers_and_counts_tokens(client):
    r = _ask(client, model="smollm2-135m", max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_non_streaming_and_reports_usage(client):
    full = _ask(client, model="smollm2-135m", max_tokens=16, temperature=0)
    chunks = list(_ask(client, model="smollm2-135m", max_tokens=16, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_logprobs_and_adapter(client):
    r = _ask(client, model="smollm2-135m:demo", max_tokens=6, n=2, temperature=0, logprobs=True,
             top_logprobs=3)
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content
    lp = r.choices[0].logprobs.content[0]
    assert lp.logprob <= 0 and len(lp.top_logprobs) == 3 and lp.top_logprobs[0].logprob >= lp.logprob
    base = _ask(client, model="smollm2-135m", max_tokens=6, temperature=0, logprobs=True)
    first = [(t.token, t.logprob) for t in base.choices[0].logprobs.content]
    adapted = [(t.token, t.logprob) for t in r.choices[0].logprobs.content]
    assert first != adapted  # the adapter applies (at least its logprobs differ)
    plain_name = _ask(client, model="demo", max_tokens=6, temperature=0)
    assert plain_name.choices[0].message.content == r.choices[0].message.content


def test_completions_with_logprobs(client):
    r = client.completions.create(model="smollm2-135m", prompt="The capital of France is",
                                  max_tokens=4, temperature=0, logprobs=2)
    assert "Paris" in r.choices[0].text
    assert len(r.choices[0].logprobs.token_logprobs) == 4


def test_async_client(server):
    import asyncio

    from openai import AsyncOpenAI

    async def main():
        c = AsyncOpenAI(base_url=server[0], api_key="unused", max_retries=0)
        return await asyncio.gather(*(c.chat.completions.create(
            model=m, max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": "Say hi"}]) for m in ("smollm2-135m", "demo")))

    base, adapted = asyncio.run(main())
    assert base.choices[0].message.content and adapted.choices[0].message.content


def test_models_list(client):
    ids = {m.id for m in client.models.list()}
    assert {"smollm2-135m", "demo"} <= ids


def test_errors_are_openai_shaped(client):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        _ask(client, model="nope", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, model="smollm2-135m", max_tokens=2, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m", max_tokens=2,
                                       messages=[{"role": "user", "content": "x " * 600}])
    assert e.value.body["param"] == "prompt"


def test_disconnect_mid_stream_frees_the_row(server, client):
    _, engine, _ = server
    stream = _ask(client, model="smollm2-135m", max_tokens=200, temperature=0, stream=True)
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()
    for _ in range(200):
        if engine.runner.rows.num_free == engine.num_rows and not engine.has_work():
            break
        time.sleep(0.05)
    assert engine.runner.rows.num_free == engine.num_rows and not engine.has_work()


def test_response_format_json_schema(client):
    import json

    schema = {"type": "object", "additionalProperties": False,
              "properties": {"name": {"type": "string", "maxLength": 20},
                             "age": {"type": "integer"},
                             "color": {"enum": ["red", "green", "blue"]}},
              "required": ["name", "age", "color"]}
    r = client.chat.completions.create(
        model="smollm2-135m", max_tokens=120, temperature=0,
        messages=[{"role": "user",
                   "content": "Describe a person as JSON with name, age and favourite color."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"name", "age", "color"} and isinstance(obj["name"], str)
    assert isinstance(obj["age"], int) and obj["color"] in ("red", "green", "blue")
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, model="smollm2-135m", max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert e.value.body["param"] == "response_format"


def test_completions_take_token_ids_and_ignore_eos(server, client):
    _, _, lm = server
    ids = lm.tokenizer("The capital of France is")["input_ids"]
    by_ids = client.completions.create(model="smollm2-135m", prompt=ids, max_tokens=12,
                                       temperature=0, extra_body={"ignore_eos": True})
    by_text = client.completions.create(model="smollm2-135m", prompt="The capital of France is",
                                        max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.completion_tokens == 12 and by_ids.choices[0].finish_reason == "length"


def test_n_choices_are_submitted_together_and_a_refusal_cancels_them(server, client):
    import openai

    _, engine, _ = server
    r = _ask(client, model="smollm2-135m", max_tokens=4, n=2, temperature=1.0, seed=3)
    assert len(r.choices) == 2 and r.usage.completion_tokens <= 8
    # 4 rows + 2 waiting places: 8 choices cannot all be queued -> 429, and nothing leaks
    with pytest.raises(openai.RateLimitError) as e:
        _ask(client, model="smollm2-135m", max_tokens=50, n=8, temperature=1.0)
    assert e.value.response.headers.get("retry-after")
    for _ in range(200):
        if not engine.has_work() and engine.runner.rows.num_free == engine.num_rows:
            break
        time.sleep(0.05)
    assert not engine.has_work() and engine.runner.rows.num_free == engine.num_rows


def test_completions_echo_scores_the_prompt(server, client):
    """echo + logprobs (lm-eval-harness style): the prompt's own token logprobs, compared
    with transformers on the same weights; max_tokens=0 scores without generating."""
    import torch
    from transformers import AutoModelForCausalLM

    _, _, lm = server
    prompt = "The capital of France is Paris"
    r = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=0, echo=True,
                                  logprobs=1, temperature=0)
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and r.usage.completion_tokens == 0
    ids = lm.tokenizer(prompt)["input_ids"]
    lp = c.logprobs
    assert "".join(lp.tokens) == prompt and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    hf = AutoModelForCausalLM.from_pretrained(lm.folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    want = [float(ref[j, ids[j + 1]]) for j in range(len(ids) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=2e-3)
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    # echo with generation: prompt, then the answer; streaming gives the same text
    r = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=4, echo=True,
                                  temperature=0, logprobs=0)
    full = r.choices[0].text
    assert full.startswith(prompt) and len(r.choices[0].logprobs.tokens) == len(ids) + 4
    chunks = list(client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=4,
                                            echo=True, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
    # max_tokens=0 without echo is refused, naming the field
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
