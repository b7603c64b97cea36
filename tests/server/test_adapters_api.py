"""Slow: adapter management over HTTP (/v1/adapters) against a live fleetlm server on
loopback with the real default model: load by name, upload, use, list, delete, and
corrupt uploads that are refused while the server keeps answering."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.conftest import MODEL, live_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("adapters"), with_demo=False) as live:
        yield live.url, live.engine, live.lm, live.root


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _make(folder: Path, lm, seed: int = 0) -> Path:
    from fleetlm.adapters.random import make_random_adapter

    return make_random_adapter(folder, lm.config, rank=8, alpha=16, seed=seed, std=0.05)


def _files(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]


def _ask(client, model: str) -> str:
    r = client.chat.completions.create(model=model, max_tokens=6, temperature=0,
                                       messages=[{"role": "user", "content": "Say hi"}])
    return r.choices[0].message.content


def _entries(http) -> dict[str, dict]:
    r = http.get("/v1/adapters")
    assert r.status_code == 200 and r.json()["object"] == "list"
    return {a["id"]: a for a in r.json()["data"]}


def test_load_by_name_use_list_delete(server, http, client):
    _, _, lm, root = server
    _make(root / "byname", lm, seed=1)  # a folder already under the store's root
    r = http.post("/v1/adapters", json={"name": "byname"})
    assert r.status_code == 201, r.text
    e = r.json()
    assert e["id"] == "byname" and e["object"] == "adapter" and e["rank"] == 8
    assert e["alpha"] == 16 and e["size_bytes"] > 0 and "q_proj" in e["target_modules"]
    assert e["tier"] == "warm" and e["pinned"] is False  # loaded, not yet used

    assert _ask(client, "byname")
    assert _entries(http)["byname"]["tier"] == "hot"
    assert _ask(client, f"{MODEL}:byname")

    r = http.delete("/v1/adapters/byname")
    assert r.status_code == 200 and r.json() == {"id": "byname", "object": "adapter", "deleted": True}
    assert "byname" not in _entries(http) and not (root / "byname").exists()
    import openai

    with pytest.raises(openai.NotFoundError):
        _ask(client, "byname")
    assert http.delete("/v1/adapters/byname").status_code == 404


def test_upload_multipart_then_use_and_pin(server, http, client, tmp_path):
    _, _, lm, root = server
    src = _make(tmp_path / "anything", lm, seed=2)
    r = http.post("/v1/adapters", data={"name": "uploaded", "pin": "true"}, files=_files(src))
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "uploaded" and r.json()["pinned"] is True
    assert (root / "uploaded" / "adapter_model.safetensors").is_file()
    assert {m.id for m in client.models.list()} >= {MODEL, "uploaded"}
    assert _ask(client, "uploaded")
    assert _entries(http)["uploaded"]["tier"] == "hot"
    before = _ask(client, "uploaded")
    # same name again: 409, the stored one untouched
    other = _make(tmp_path / "other", lm, seed=5)
    stored = (root / "uploaded" / "adapter_model.safetensors").read_bytes()
    r = http.post("/v1/adapters", data={"name": "uploaded"}, files=_files(other))
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "adapter_exists" and err["param"] == "name" and "overwrite" in err["message"]
    assert (root / "uploaded" / "adapter_model.safetensors").read_bytes() == stored
    assert _ask(client, "uploaded") == before
    # overwrite=true replaces it; the engine serves the new weights, not a stale hot copy
    r = http.post("/v1/adapters", data={"name": "uploaded", "overwrite": "true"}, files=_files(other))
    assert r.status_code == 201, r.text
    assert (root / "uploaded" / "adapter_model.safetensors").read_bytes() == \
        (other / "adapter_model.safetensors").read_bytes()
    assert http.post("/v1/adapters", data={"name": "twin"}, files=_files(other)).status_code == 201
    assert _ask(client, "uploaded") == _ask(client, "twin")
    assert http.delete("/v1/adapters/twin").status_code == 200
    assert http.delete("/v1/adapters/uploaded").status_code == 200  # a pin does not block it
    assert not (root / "uploaded").exists()


def _leftovers(root: Path, name: str) -> list[str]:
    return [p.name for p in root.iterdir() if name in p.name]


def test_truncated_safetensors_is_refused_and_server_keeps_serving(server, http, client, tmp_path):
    _, _, lm, root = server
    src = _make(tmp_path / "a", lm, seed=3)
    w = src / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    r = http.post("/v1/adapters", data={"name": "broken"}, files=_files(src))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert "broken" in err["message"] and "adapter_model.safetensors" in err["message"]
    assert err["code"] == "invalid_adapter"
    assert _leftovers(root, "broken") == [] and "broken" not in _entries(http)
    assert _ask(client, MODEL)


def test_pickle_only_upload_is_refused(server, http, client, tmp_path):
    _, _, lm, root = server
    src = _make(tmp_path / "p", lm, seed=4)
    (src / "adapter_model.safetensors").rename(src / "adapter_model.bin")
    r = http.post("/v1/adapters", data={"name": "pickled"}, files=_files(src))
    assert r.status_code == 422, r.text
    assert "pickle" in r.json()["error"]["message"]
    assert _leftovers(root, "pickled") == []
    assert _ask(client, MODEL)


def test_bad_requests_name_the_field(http):
    r = http.post("/v1/adapters", json={"nmae": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("name", "nmae")
    r = http.post("/v1/adapters", json={"name": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "name"
    r = http.post("/v1/adapters", files=[("files", ("adapter_config.json", b"{}"))])
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    r = http.post("/v1/adapters", data={"name": "x"}, files=[("files", ("..", b"{}"))])
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
