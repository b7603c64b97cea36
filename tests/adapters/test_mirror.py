"""Adapters in an object store: two MirroredStores with their own local copies over one
fsspec remote (a file:// URL here) stand for two machines sharing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleetlm.adapters import AdapterError, AdapterNotFound
from fleetlm.adapters.mirror import SOURCE_FILE, MirroredStore
from fleetlm.adapters.random import make_random_adapter
from fleetlm.models.config import LlamaConfig


def stores(tmp_path: Path, base_cfg: LlamaConfig) -> tuple[MirroredStore, MirroredStore, Path]:
    remote = tmp_path / "bucket" / "adapters"
    url = f"file://{remote}"
    a = MirroredStore(url, tmp_path / "machine-a", base_cfg, refresh_s=0.0)
    b = MirroredStore(url, tmp_path / "machine-b", base_cfg, refresh_s=0.0)
    return a, b, remote


def test_an_adapter_added_on_one_machine_is_served_replaced_and_removed_on_another(
        tmp_path: Path, base_cfg: LlamaConfig) -> None:
    a, b, remote = stores(tmp_path, base_cfg)
    assert b.list() == []
    with pytest.raises(AdapterNotFound):
        b.validate("x")
    a.add(make_random_adapter(tmp_path / "v1", base_cfg, rank=4, seed=1), name="x")
    assert sorted(p.name for p in (remote / "x").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    changed: list[str] = []
    b.subscribe(changed.append)
    assert b.validate("x").rank == 4 and b.get("x").rank == 4
    assert (tmp_path / "machine-b" / "x" / SOURCE_FILE).is_file()
    assert [i.name for i in b.list()] == ["x"]
    # replaced on machine a: b fetches the new copy, drops its warm one, tells its engine
    a.add(make_random_adapter(tmp_path / "v2", base_cfg, rank=8, seed=2), name="x",
          overwrite=True)
    assert b.validate("x").rank == 8 and changed == ["x"]
    assert b.get("x").rank == 8
    # removed on machine a: gone on b at its next check, listing included
    a.remove("x")
    assert not (remote / "x").exists()
    with pytest.raises(AdapterNotFound):
        b.validate("x")
    assert b.list() == [] and not (tmp_path / "machine-b" / "x").exists()


def test_an_unchanged_adapter_is_not_fetched_again(tmp_path: Path, base_cfg: LlamaConfig,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, _ = stores(tmp_path, base_cfg)
    a.add(make_random_adapter(tmp_path / "v1", base_cfg, rank=4, seed=1), name="x")
    fetched: list[str] = []
    real = b.mirror.fs.get_file

    def counting(src: str, dst: str, **kw: Any) -> Any:
        fetched.append(src)
        return real(src, dst, **kw)

    monkeypatch.setattr(b.mirror.fs, "get_file", counting)
    for _ in range(3):
        b.validate("x")
    assert len(fetched) == 2  # config and weights, once
    b.mirror.refresh_s = 3600.0  # within refresh_s the remote is not even asked
    a.add(make_random_adapter(tmp_path / "v2", base_cfg, rank=8, seed=2), name="x",
          overwrite=True)
    assert b.validate("x").rank == 4
    b.mirror.sync("x", force=True)
    assert b.validate("x").rank == 8


def test_a_url_without_a_scheme_or_protocol_package_is_refused(tmp_path: Path,
                                                                base_cfg: LlamaConfig) -> None:
    with pytest.raises(AdapterError, match="no scheme"):
        MirroredStore("bucket/adapters", tmp_path / "c", base_cfg)
    with pytest.raises(AdapterError, match="install the fsspec package"):
        MirroredStore("nosuchproto://bucket/adapters", tmp_path / "c", base_cfg)


def test_the_same_through_an_s3_api(tmp_path: Path, base_cfg: LlamaConfig,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """s3:// through s3fs against moto's S3 server on loopback: ETags as the identity,
    listings never served from s3fs's cache."""
    import socket

    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                     "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket="fleet")
        url = "s3://fleet/adapters"
        a = MirroredStore(url, tmp_path / "a", base_cfg, refresh_s=0.0)
        b = MirroredStore(url, tmp_path / "b", base_cfg, refresh_s=0.0)
        assert b.list() == []
        a.add(make_random_adapter(tmp_path / "v1", base_cfg, rank=4, seed=1), name="x")
        assert b.validate("x").rank == 4
        ident = b.mirror.identity("x")
        assert ident is not None and '"' in ident  # S3's ETags, quoted as S3 sends them
        a.add(make_random_adapter(tmp_path / "v2", base_cfg, rank=8, seed=2), name="x",
              overwrite=True)
        assert b.validate("x").rank == 8 and b.mirror.identity("x") != ident
        assert [i.name for i in b.list()] == ["x"]
        a.remove("x")
        with pytest.raises(AdapterNotFound):
            b.validate("x")
        assert b.list() == []
    finally:
        server.stop()
