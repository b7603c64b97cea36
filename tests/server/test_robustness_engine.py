"""Slow: one client cannot hurt the others (a live server on loopback, the real default model).

- token ids outside the vocabulary are a 400 naming ``prompt``, and a stream beside them
  runs to its end;
- refused requests with made-up model names add a bounded number of metric series;
- a prompt over the character limit is refused before it is tokenised, and tokenising a
  large one does not stall the event loop (``/health`` answers meanwhile);
- a non-streaming request whose client went away is cancelled (its KV row freed).
"""

from __future__ import annotations

import json
import random
import string
import threading
import time

import pytest

from tests.server.conftest import MODEL, live_server, send_then_leave

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("adapters"), with_demo=False) as server:
        yield server


def _words(n_chars: int, seed: int = 0) -> str:
    rnd = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        w = "".join(rnd.choice(string.ascii_lowercase) for _ in range(rnd.randint(2, 9)))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


def test_a_long_stream_survives_a_bad_token_request_beside_it(live):
    import httpx

    vocab = live.lm.config.vocab_size
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, "stream": True}
    finish, tokens, refused = None, 0, None
    with httpx.Client(base_url=live.url, timeout=120) as http, \
            http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            tokens += 1
            finish = chunk["choices"][0]["finish_reason"] or finish
            if tokens == 2:  # under way: now a request with an id past the vocabulary
                refused = httpx.post(live.url + "/v1/completions", timeout=60, json={
                    "model": MODEL, "prompt": [1, 2, vocab + 7], "max_tokens": 4})
    assert refused is not None and refused.status_code == 400
    err = refused.json()["error"]
    assert err["param"] == "prompt" and str(vocab + 7) in err["message"] \
        and str(vocab) in err["message"]
    assert finish == "length" and tokens == 40


def _refused_series(url: str) -> set[str]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0] for line in text.splitlines()
            if line.startswith("fleetlm_refused_requests_total{")}


def test_refused_requests_with_made_up_models_add_a_bounded_number_of_series(live):
    import httpx

    before = _refused_series(live.url)
    rnd = random.Random(1)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        for i in range(1000):
            name = "".join(rnd.choice(string.ascii_letters) for _ in range(rnd.randint(8, 40)))
            if i % 10 == 0:
                name = f"{MODEL}:{name}"  # an adapter of the right base that does not exist
            elif i % 10 == 1:
                name = name * 100  # long names (up to 4,000 characters)
            r = http.post("/v1/completions", json={"model": name, "prompt": [1, 2], "max_tokens": 1})
            # 404 for every one: a name that cannot name an adapter too (was 422 before)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        # the base model's own refusals keep its name
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": [1],
                                                  "max_tokens": -1}).status_code == 400
    after = _refused_series(live.url)
    added = after - before
    print(f"refused-request series: {len(before)} before, {len(after)} after 1,000 made-up models")
    assert len(added) <= 20, sorted(added)[:30]  # 16 names kept, "other" per status, the base
    assert any(f'model="{MODEL}"' in s and 'code="400"' in s for s in after)
    assert any('model="other"' in s and 'code="404"' in s for s in after)
    assert not any('code="422"' in s for s in after)
    assert all(len(s) < 200 for s in after)


def test_an_oversized_prompt_is_refused_before_it_is_tokenised(live):
    import httpx

    limit = live.engine.config.max_len * 16
    huge = _words(2_000_000)  # under the 4 MiB body limit; ~3 s to tokenise here
    with httpx.Client(base_url=live.url, timeout=120) as http:
        t = time.perf_counter()
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": huge, "max_tokens": 1})
        took = time.perf_counter() - t
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "prompt" and f"{limit:,}" in err["message"] \
            and "characters" in err["message"], err
        print(f"oversized prompt refused in {took:.3f} s")
        assert took < 1.5, f"{took:.2f} s: the prompt was tokenised"
        r = http.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 1,
            "messages": [{"role": "system", "content": "x" * (limit // 2)},
                         {"role": "user", "content": "y" * (limit // 2 + 1)}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        # at the limit: tokenised, then refused by its token count
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": _words(limit),
                                               "max_tokens": 1})
        assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]


def test_health_answers_while_a_large_prompt_is_tokenised(live, monkeypatch):
    import httpx

    from fleetlm.server import local

    # a limit far above the default, so that tokenising takes seconds
    monkeypatch.setattr(local, "PROMPT_CHARS_PER_TOKEN", 10_000, raising=False)
    big = _words(3_000_000, seed=2)
    result: dict[str, object] = {}

    def send() -> None:
        r = httpx.post(live.url + "/v1/completions", timeout=120,
                       json={"model": MODEL, "prompt": big, "max_tokens": 1})
        result["status"] = r.status_code

    t = threading.Thread(target=send)
    t.start()
    time.sleep(0.3)  # the body is up and being tokenised
    latencies = []
    with httpx.Client(base_url=live.url, timeout=30) as http:
        while t.is_alive():
            s = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - s)
            time.sleep(0.1)
    t.join()
    print(f"/health while tokenising: {len(latencies)} calls, slowest {max(latencies):.3f} s")
    assert result["status"] == 400  # too many tokens for the context, once counted
    assert len(latencies) >= 3, latencies  # measured while the prompt was being tokenised
    assert max(latencies) < 1.0, latencies


def test_a_non_streaming_request_is_cancelled_when_its_client_goes_away(live):
    engine = live.engine
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 450,
            "temperature": 0, "ignore_eos": True}
    tokens_before = engine.stats()["generated_tokens"]
    took = send_then_leave(live.url, "/v1/completions", body, engine)  # < 3 s, or it fails
    print(f"running 0 after {took:.2f} s")
    generated = engine.stats()["generated_tokens"] - tokens_before
    print(f"{generated} of 450 tokens generated")
    assert generated < 450, generated  # stopped well before the end
    assert engine.stats()["kv_rows_free"] == engine.stats()["kv_rows"]
