"""Adapter management over HTTP: list, load or upload, and delete PEFT LoRA adapters.

    GET    /v1/adapters          every valid adapter with its tier (hot / warm / cold)
    POST   /v1/adapters          JSON {"name", "pin"?}: load a folder already under the store's
                                 root; or multipart/form-data: a ``name`` field plus the PEFT
                                 files as file parts, validated fully and copied in atomically
                                 (409 if the name is taken, unless ``overwrite`` is true)
    GET    /v1/adapters/{name}   one entry
    DELETE /v1/adapters/{name}   unpin (if pinned) and remove from the store

Validation, atomic copies and tiers are the store's (:class:`~fleetlm.adapters.store.
AdapterStore`); the hot tier is the engine's. This module only translates between HTTP and
those calls, and runs the blocking ones (disk, tensor loads) off the event loop so serving
goes on during an upload. A rejected upload leaves nothing in the store.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile

from fleetlm.adapters.errors import AdapterError, AdapterNotFound
from fleetlm.adapters.store import AdapterInfo
from fleetlm.engine.engine import Engine
from fleetlm.server.app import APIError

# a file part's name, after dropping any directories the client sent with it
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_FORM_FIELDS = ("name", "pin", "overwrite")


class LoadAdapterRequest(BaseModel):
    """JSON body of ``POST /v1/adapters``: an adapter folder already under the store's root."""

    model_config = ConfigDict(extra="forbid")

    name: str
    pin: bool = False


def _adapter_error(e: AdapterError, param: str) -> APIError:
    if isinstance(e, AdapterNotFound):
        return APIError(404, str(e), "invalid_request_error", param, "adapter_not_found")
    return APIError(422, str(e), "invalid_request_error", param, "invalid_adapter")


def adapters_router(engine: Engine, model_name: str) -> APIRouter:
    """Routes over ``engine.store`` (which must be set); ``model_name`` is each entry's parent."""
    store = engine.store
    assert store is not None, "adapters_router needs an engine with an adapter store"
    router = APIRouter()

    def entry(info: AdapterInfo) -> dict[str, Any]:
        hot = engine.stats()["hot_adapters"]  # under the engine's lock
        tier = "hot" if info.name in hot else ("warm" if info.name in store.warm_names() else "cold")
        return {"id": info.name, "object": "adapter", "parent": model_name, "rank": info.rank,
                "alpha": info.alpha, "target_modules": list(info.target_modules),
                "size_bytes": info.size_bytes, "tier": tier, "pinned": info.pinned}

    def load(name: str, pin: bool) -> AdapterInfo:
        try:
            store.validate(name)
            if pin:
                engine.pin_adapter(name)  # loads it too; ConfigError (-> 400) when too many pins
            else:
                store.get(name)  # full validation: tensors read, shapes checked; now warm
            return store.validate(name)
        except AdapterError as e:
            raise _adapter_error(e, "name") from e

    def pinned(name: str) -> bool:
        try:
            return store.validate(name).pinned
        except AdapterError:  # the stored one is broken: replacing it is the fix
            return False

    def add(folder: Path, name: str, pin: bool, overwrite: bool) -> AdapterInfo:
        if not overwrite and store.exists(name):
            raise APIError(409, f"adapter {name!r} already exists; send overwrite=true to replace "
                                f"it, or DELETE /v1/adapters/{name} first", "invalid_request_error",
                           "name", "adapter_exists")
        was_pinned = overwrite and store.exists(name) and pinned(name)
        try:
            if was_pinned:
                engine.unpin_adapter(name)  # the replacement is pinned only if `pin` says so
            # validates everything before anything lands in root; replacing one drops its hot
            # copy in the engine once no running request uses it
            store.add(folder, name, overwrite=overwrite)
        except AdapterError as e:
            if was_pinned:
                engine.pin_adapter(name)  # refused: the old one stays as it was
            err = _adapter_error(e, "file")
            err.message = err.message.replace(str(folder), "the upload")  # not our temp path
            raise err from e
        return load(name, pin)

    @router.get("/v1/adapters")
    async def list_adapters() -> dict[str, Any]:
        infos = await run_in_threadpool(store.list)
        return {"object": "list", "data": [entry(i) for i in infos]}

    @router.get("/v1/adapters/{name}")
    async def get_adapter(name: str) -> dict[str, Any]:
        try:
            info = await run_in_threadpool(store.validate, name)
        except AdapterError as e:
            raise _adapter_error(e, "name") from e
        return entry(info)

    @router.post("/v1/adapters", status_code=201)
    async def post_adapter(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype == "multipart/form-data":
            return await upload(request)
        try:
            body = LoadAdapterRequest.model_validate(json.loads(await request.body() or b"null"))
        except (ValueError, ValidationError) as e:
            param, msg = None, str(e)
            if isinstance(e, ValidationError):
                errs = e.errors()
                param = ".".join(str(x) for x in errs[0]["loc"]) or None if errs else None
                msg = "; ".join(f"{'.'.join(str(x) for x in er['loc'])}: {er['msg']}" for er in errs)
            raise APIError(400, f"{msg} (send JSON {{\"name\": ..., \"pin\": false}} naming a "
                                f"folder under the adapter store, or multipart/form-data with "
                                f"a name field and the PEFT files)", "invalid_request_error",
                           param) from e
        return entry(await run_in_threadpool(load, body.name, body.pin))

    async def upload(request: Request) -> dict[str, Any]:
        try:
            form = await request.form()
        except Exception as e:  # malformed multipart body
            raise APIError(400, f"could not parse the multipart body ({e})",
                           "invalid_request_error") from e
        try:
            name = form.get("name")
            if not isinstance(name, str) or not name:
                raise APIError(400, "name: a multipart upload needs a 'name' field (the adapter's "
                                    "name, [A-Za-z0-9._-]{1,64})", "invalid_request_error", "name")
            pin, overwrite = (str(form.get(k, "false")).strip().lower() in ("1", "true", "yes", "on")
                              for k in ("pin", "overwrite"))
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            problems = [f"{k}: unknown field (send {', '.join(_FORM_FIELDS)} and file parts)"
                        for k, v in form.multi_items()
                        if not isinstance(v, UploadFile) and k not in _FORM_FIELDS]
            names = [Path((f.filename or "").replace("\\", "/")).name for f in files]
            problems += [f"file {f.filename!r}: not an acceptable file name" for f, n in
                         zip(files, names, strict=True) if not _FILE_NAME.fullmatch(n)]
            if not files:
                problems.append("no files: attach adapter_config.json and "
                                "adapter_model.safetensors as file parts")
            if len(set(names)) != len(names):
                problems.append(f"file names repeat: {sorted(names)}")
            if problems:
                raise APIError(400, "; ".join(problems), "invalid_request_error",
                               "name" if problems[0].startswith("name") else "file")
            tmp = Path(tempfile.mkdtemp(prefix="fleetlm-upload-"))
            try:
                folder = tmp / "adapter"
                folder.mkdir()
                for f, n in zip(files, names, strict=True):
                    with (folder / n).open("wb") as out:
                        while chunk := await f.read(1 << 20):
                            out.write(chunk)
                info = await run_in_threadpool(add, folder, name, pin, overwrite)
            finally:
                await run_in_threadpool(shutil.rmtree, tmp, True)
        finally:
            await form.close()
        return entry(info)

    @router.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str) -> dict[str, Any]:
        def remove() -> None:
            try:
                store.resolve(name)
                engine.unpin_adapter(name)  # an explicit delete overrides a pin
                store.remove(name)  # the engine drops its hot copy once no request uses it
            except AdapterError as e:
                raise _adapter_error(e, "name") from e

        await run_in_threadpool(remove)
        return {"id": name, "object": "adapter", "deleted": True}

    return router
