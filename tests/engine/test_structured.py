"""response_format by constrained decoding: the token mask, the sampler, the engine.

Fast tests use a byte-level tokenizer built in memory (one token per byte, plus EOS)
and random logits, so only the grammar decides what is valid; the slow ones run the
real default model and check that its output parses and matches the schema.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from fleetlm.engine.sampler import RequestSampler
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.structured import TokenConstraint
from fleetlm.errors import ConfigError

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA,
                                                       "strict": True}}


def check_person(text: str) -> None:
    """json.loads + the schema above, by hand (jsonschema is not a dependency)."""
    obj = json.loads(text)
    assert isinstance(obj, dict) and set(obj) == {"name", "age", "color"}, obj
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 20
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool)
    assert 0 <= obj["age"] <= 150
    assert obj["color"] in ("red", "green", "blue")


@pytest.fixture(scope="module")
def byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def _decode_random(tok: Any, rf: dict[str, Any], seed: int, greedy: bool) -> tuple[str, bool]:
    """Drive a RequestSampler with random logits until the grammar is complete."""
    v = len(tok)
    params = SamplingParams(temperature=0.0 if greedy else 1.0, seed=seed,
                            response_format=rf).validate(v)
    sampler = RequestSampler(params, v, [1, 2, 3], tokenizer=tok)
    assert not sampler.plain_greedy  # constrained rows never take the batched argmax
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(400):
        token = sampler.sample(torch.randn(v, generator=g) * 3).token_id
        if token == tok.eos_token_id:
            break
        out.append(token)
        if sampler.finished:
            break
    return tok.decode(out), sampler.finished or token == tok.eos_token_id


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_random_logits_follow_the_schema(byte_tokenizer, seed, greedy):
    text, done = _decode_random(byte_tokenizer, JSON_SCHEMA, seed, greedy)
    assert done, text
    check_person(text)


@pytest.mark.parametrize("seed", range(3))
def test_json_object_gives_an_object(byte_tokenizer, seed):
    text, done = _decode_random(byte_tokenizer, {"type": "json_object"}, seed, greedy=False)
    if done:  # random logits may write a long object; when complete it must parse
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


def test_mask_allows_only_grammar_tokens(byte_tokenizer):
    c = TokenConstraint({"type": "json_object"}, byte_tokenizer, len(byte_tokenizer))
    mask = c.allowed_mask()
    assert mask.dtype == torch.bool and mask.shape == (len(byte_tokenizer),)
    allowed = {byte_tokenizer.decode([i]) for i in mask.nonzero().flatten().tolist()}
    assert allowed == {"{"}  # compact JSON: no leading whitespace either
    for ch in '{"a":1}':
        assert not c.is_finished
        c.advance(byte_tokenizer.convert_tokens_to_ids(ch))
    assert c.is_finished
    last = c.allowed_mask()
    assert last.nonzero().flatten().tolist() == [byte_tokenizer.eos_token_id]


def test_logprobs_are_the_models_not_the_masks(byte_tokenizer):
    v = len(byte_tokenizer)
    params = SamplingParams(temperature=0.0, logprobs=2, response_format={"type": "json_object"})
    logits = torch.randn(v, generator=torch.Generator().manual_seed(0))
    res = RequestSampler(params, v, [], tokenizer=byte_tokenizer).sample(logits)
    assert byte_tokenizer.decode([res.token_id]) == "{"
    logp = torch.log_softmax(logits, -1)
    assert res.logprob == pytest.approx(float(logp[res.token_id]))
    assert [t for t, _ in res.top_logprobs] == torch.topk(logp, 2).indices.tolist()


def test_unconstrained_sampler_is_unchanged(byte_tokenizer):
    for rf in (None, {"type": "text"}):
        s = RequestSampler(SamplingParams(temperature=0.0, response_format=rf), 50, [],
                           tokenizer=byte_tokenizer)
        assert s.constraint is None and s.plain_greedy and not s.finished


@pytest.mark.parametrize("rf, needle", [
    ({"type": "xml"}, "type 'xml'"),
    ("json", "type 'json'"),
    ({"type": "json_schema"}, "'json_schema' object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "must be a JSON object"),
    ({"type": "choice"}, "'choices'"),
    ({"type": "choice", "choices": []}, "'choices'"),
    ({"type": "choice", "choices": ["a", ""]}, "'choices'"),
    ({"type": "choice", "choices": ["a", 3]}, "'choices'"),
])
def test_bad_response_format_shapes(rf, needle):
    with pytest.raises(ConfigError, match="response_format") as e:
        SamplingParams(response_format=rf).validate()
    assert needle in str(e.value)


@pytest.mark.parametrize("schema", [{"type": "nope"}, {"type": "object", "required": "name"},
                                    {"$ref": "#/definitions/missing"}])
def test_invalid_schema_is_a_config_error(byte_tokenizer, schema):
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    params = SamplingParams(response_format=rf).validate()
    with pytest.raises(ConfigError, match="^response_format: "):
        RequestSampler(params, len(byte_tokenizer), [], tokenizer=byte_tokenizer)


CHOICES = ["card_arrival", "card_linking", "exchange_rate", 'odd "quoted" \\ label', "a"]


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_choice_gives_exactly_one_of_the_choices(byte_tokenizer, seed, greedy):
    text, done = _decode_random(byte_tokenizer, {"type": "choice", "choices": CHOICES}, seed, greedy)
    assert done and text in CHOICES


def test_choice_mask_after_a_shared_prefix(byte_tokenizer):
    c = TokenConstraint({"type": "choice", "choices": CHOICES}, byte_tokenizer, len(byte_tokenizer))
    for ch in "card_":
        c.advance(byte_tokenizer.convert_tokens_to_ids(ch))
    allowed = {byte_tokenizer.decode([i]) for i in c.allowed_mask().nonzero().flatten().tolist()}
    assert allowed == {"a", "l"}  # card_arrival or card_linking, nothing else


def _prefix_logits(prefix: list[int], v: int) -> torch.Tensor:
    """Logits that depend only on the tokens so far: a stand-in for a model."""
    seed = hash(tuple(prefix)) % (2**31)
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 3


def test_constrained_logprobs_give_a_distribution_over_the_choices(byte_tokenizer):
    """Summed over an answer, constrained_logprob is the log-probability of the chosen
    label under constrained decoding: summed over every label the probabilities make 1,
    and the sampler reports the same number for the label it picked."""
    tok, v = byte_tokenizer, len(byte_tokenizer)
    rf = {"type": "choice", "choices": CHOICES}

    def label_prob(label: str) -> float:
        c = TokenConstraint(rf, tok, v)
        logp, prefix = 0.0, []
        for t in tok(label)["input_ids"]:
            masked = c.apply(_prefix_logits(prefix, v))
            logp += float(torch.log_softmax(masked, dim=-1)[t])
            c.advance(t)
            prefix.append(t)
        assert c.is_finished
        return math.exp(logp)

    probs = {label: label_prob(label) for label in CHOICES}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed, logprobs=0,
                                response_format=rf).validate(v)
        sampler = RequestSampler(params, v, [1], tokenizer=tok)
        out: list[int] = []
        total, raw = 0.0, 0.0
        while not sampler.finished:
            s = sampler.sample(_prefix_logits(out, v))
            assert s.constrained_logprob is not None and s.logprob is not None
            assert s.constrained_logprob >= s.logprob - 1e-6  # renormalised over fewer tokens
            total += s.constrained_logprob
            raw += s.logprob
            out.append(s.token_id)
        label = tok.decode(out)
        assert math.exp(total) == pytest.approx(probs[label], rel=1e-4)
        assert raw <= total


def test_unconstrained_sampler_reports_no_constrained_logprob(byte_tokenizer):
    v = len(byte_tokenizer)
    sampler = RequestSampler(SamplingParams(logprobs=2).validate(v), v, [1])
    assert sampler.sample(torch.randn(v)).constrained_logprob is None


def test_no_tokenizer_is_a_config_error():
    with pytest.raises(ConfigError, match="response_format"):
        RequestSampler(SamplingParams(response_format={"type": "json_object"}), 10, [])


# -- the real model, through the engine --------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    from fleetlm.engine.engine import Engine, EngineConfig
    from fleetlm.models.loader import load_model

    lm = load_model("smollm2-135m", dtype="float32")
    return Engine(lm, EngineConfig(max_running=4, max_len=512))


def _prompt(engine: Any, question: str) -> list[int]:
    tok = engine.lm.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}],
                                   add_generation_prompt=True, tokenize=False)
    return list(tok.encode(text, add_special_tokens=False))


def _run(engine: Any, prompt: list[int], params: SamplingParams) -> tuple[str, str]:
    events: list[Any] = []
    engine.submit(prompt, params, callback=events.append)
    while engine.step():
        pass
    return "".join(e.text for e in events), events[-1].finish_reason


@pytest.mark.slow
def test_engine_json_schema_greedy(engine):
    prompt = _prompt(engine, "Describe a person as JSON: name, age, favourite color.")
    text, reason = _run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=120,
                                                       response_format=JSON_SCHEMA))
    assert reason == "stop"
    check_person(text)


@pytest.mark.slow
def test_engine_json_object_greedy(engine):
    prompt = _prompt(engine, "Describe a person as JSON with name, age and favourite color.")
    text, reason = _run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=200,
                                                       response_format={"type": "json_object"}))
    assert reason == "stop"
    assert isinstance(json.loads(text), dict)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_engine_json_schema_sampled(engine, seed):
    prompt = _prompt(engine, "Describe a person as JSON: name, age, favourite color.")
    text, reason = _run(engine, prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=120,
                                                       response_format=JSON_SCHEMA))
    assert reason == "stop"
    check_person(text)


@pytest.mark.slow
def test_engine_invalid_schema_fails_at_submit(engine):
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    with pytest.raises(ConfigError, match="response_format"):
        engine.submit([1, 2], SamplingParams(response_format=rf), callback=lambda ev: None)
    assert not engine.has_work()


@pytest.mark.slow
def test_engine_plain_greedy_still_batched_beside_a_constrained_row(engine, monkeypatch):
    """The unconstrained request keeps the batched argmax (not its sampler) and its text
    matches a run alone; the constrained one goes through its sampler."""
    from fleetlm.engine import sampler as sampler_mod

    prompt = _prompt(engine, "Say hello.")
    alone, _ = _run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=12))
    calls: list[bool] = []
    real = sampler_mod.RequestSampler.sample

    def spy(self, logits):
        calls.append(self.constraint is not None)
        return real(self, logits)

    monkeypatch.setattr(sampler_mod.RequestSampler, "sample", spy)
    events: dict[str, list[Any]] = {"plain": [], "json": []}
    engine.submit(prompt, SamplingParams(temperature=0.0, max_tokens=12),
                  callback=events["plain"].append)
    engine.submit(_prompt(engine, "A person as JSON."),
                  SamplingParams(temperature=0.0, max_tokens=60, response_format=JSON_SCHEMA),
                  callback=events["json"].append)
    while engine.step():
        pass
    assert calls and all(calls)  # only the constrained row used RequestSampler.sample
    assert "".join(e.text for e in events["plain"]) == alone
    check_person("".join(e.text for e in events["json"]))
