"""``fleetlm serve --adapters-url``: adapters in an object store (a file:// URL standing in
for s3://), served from this process's copies; uploads land in the remote."""

from __future__ import annotations

from pathlib import Path

import httpx

from fleetlm.adapters.random import make_random_adapter
from fleetlm.models.loader import load_model
from fleetlm.server.run import ServeSettings, build
from tests.server.conftest import serve_app


def test_serve_lists_answers_and_uploads_through_the_remote(tiny_base: Path,
                                                            tmp_path: Path) -> None:
    remote = tmp_path / "bucket" / "adapters"
    cfg = load_model(str(tiny_base), dtype="float32").config
    make_random_adapter(remote / "first", cfg, rank=4, alpha=8, seed=0, std=0.3)
    settings = ServeSettings(model=str(tiny_base), adapters_url=f"file://{remote}",
                             adapters_dir=tmp_path / "copies", dtype="float32",
                             quantize="none", compile=False, max_batch=2, max_len=128,
                             max_hot_adapters=2, prefix_cache_mb=0)
    served = build(settings, say=lambda _: None)
    served.engine.start()
    try:
        with serve_app(served.app) as url:
            ids = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
            assert "first" in ids
            body = {"model": "first", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert (tmp_path / "copies" / "first" / "adapter_model.safetensors").is_file()
            src = make_random_adapter(tmp_path / "src", cfg, rank=4, alpha=8, seed=1, std=0.3)
            files = [("files", (p.name, p.read_bytes())) for p in sorted(src.iterdir())]
            r = httpx.post(f"{url}/v1/adapters", data={"name": "second"}, files=files,
                           timeout=60)
            assert r.status_code == 201, r.text
            assert (remote / "second" / "adapter_model.safetensors").read_bytes() == \
                (src / "adapter_model.safetensors").read_bytes()
            r = httpx.delete(f"{url}/v1/adapters/first", timeout=30)
            assert r.status_code in (200, 204), r.text
            assert not (remote / "first").exists()
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    finally:
        served.engine.shutdown(10)
        served.state.close()


def test_with_refresh_zero_a_remote_replacement_is_served_on_the_next_request(
        tiny_base: Path, tmp_path: Path) -> None:
    """Another machine replaces an adapter in the remote: with --adapters-refresh-s 0 the
    very next request for it is answered by the new weights, never the old copy."""
    import shutil

    remote = tmp_path / "bucket"
    cfg = load_model(str(tiny_base), dtype="float32").config
    make_random_adapter(remote / "live", cfg, rank=4, alpha=8, seed=0, std=0.3)
    make_random_adapter(remote / "next", cfg, rank=4, alpha=8, seed=1, std=0.3)
    settings = ServeSettings(model=str(tiny_base), adapters_url=f"file://{remote}",
                             adapters_refresh_s=0, adapters_dir=tmp_path / "copies",
                             dtype="float32", quantize="none", compile=False, max_batch=2,
                             max_len=128, max_hot_adapters=2, prefix_cache_mb=0)
    served = build(settings, say=lambda _: None)
    served.engine.start()
    try:
        with serve_app(served.app) as url:
            def text(model: str) -> str:
                body = {"model": model, "prompt": "Hello there", "max_tokens": 8,
                        "temperature": 0}
                r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
                assert r.status_code == 200, r.text
                return str(r.json()["choices"][0]["text"])

            old, new = text("live"), text("next")
            assert old != new and text("live") == old  # hot now
            shutil.rmtree(remote / "live")  # "another machine" replaces it in the bucket
            shutil.copytree(remote / "next", remote / "live")
            assert text("live") == new
    finally:
        served.engine.shutdown(10)
        served.state.close()
