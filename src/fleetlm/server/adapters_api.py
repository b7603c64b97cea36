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
goes on during an upload. A rejected upload leaves nothing in the store. Its errors map to
HTTP through :func:`fleetlm.server.errors.api_error` (the adapter named by ``name`` or by
the uploaded ``file``s). It knows nothing of generation, routes or the OpenAI endpoints.
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
from starlette.datastructures import FormData, UploadFile

from fleetlm.adapters.errors import AdapterError
from fleetlm.adapters.store import AdapterInfo
from fleetlm.engine.engine import Engine
from fleetlm.server.errors import INVALID_REQUEST, APIError, api_error

# a file part's name, after dropping any directories the client sent with it
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_FORM_FIELDS = ("name", "pin", "overwrite")


class LoadAdapterRequest(BaseModel):
    """JSON body of ``POST /v1/adapters``: an adapter folder already under the store's root."""

    model_config = ConfigDict(extra="forbid")

    name: str
    pin: bool = False


class AdaptersAPI:
    """The adapter endpoints over ``engine.store`` (which must be set); ``model_name`` is
    each entry's parent. The blocking work runs in a thread, off the event loop."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        assert engine.store is not None, "adapters_router needs an engine with an adapter store"
        self.engine, self.store, self.model_name = engine, engine.store, model_name

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/v1/adapters", self.list_adapters, methods=["GET"])
        r.add_api_route("/v1/adapters/{name}", self.get_adapter, methods=["GET"])
        r.add_api_route("/v1/adapters", self.post_adapter, methods=["POST"], status_code=201)
        r.add_api_route("/v1/adapters/{name}", self.delete_adapter, methods=["DELETE"])
        return r

    # -- the handlers --------------------------------------------------------------------

    async def list_adapters(self) -> dict[str, Any]:
        infos = await run_in_threadpool(self.store.list)
        return {"object": "list", "data": [self.entry(i) for i in infos]}

    async def get_adapter(self, name: str) -> dict[str, Any]:
        try:
            info = await run_in_threadpool(self.store.validate, name)
        except AdapterError as e:
            raise api_error(e, adapter_param="name") from e
        return self.entry(info)

    async def post_adapter(self, request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype == "multipart/form-data":
            return await self.upload(request)
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
                                f"a name field and the PEFT files)", INVALID_REQUEST,
                           param) from e
        return self.entry(await run_in_threadpool(self.load, body.name, body.pin))

    async def upload(self, request: Request) -> dict[str, Any]:
        try:
            form = await request.form()
        except Exception as e:  # malformed multipart body
            raise APIError(400, f"could not parse the multipart body ({e})",
                           INVALID_REQUEST) from e
        try:
            name, pin, overwrite, files, names = _upload_form(form)
            tmp = Path(tempfile.mkdtemp(prefix="fleetlm-upload-"))
            try:
                folder = tmp / "adapter"
                folder.mkdir()
                for f, n in zip(files, names, strict=True):
                    with (folder / n).open("wb") as out:
                        while chunk := await f.read(1 << 20):
                            out.write(chunk)
                info = await run_in_threadpool(self.add, folder, name, pin, overwrite)
            finally:
                await run_in_threadpool(shutil.rmtree, tmp, True)
        finally:
            await form.close()
        return self.entry(info)

    async def delete_adapter(self, name: str) -> dict[str, Any]:
        await run_in_threadpool(self.remove, name)
        return {"id": name, "object": "adapter", "deleted": True}

    # -- the store and engine calls (blocking: run in a thread) ---------------------------

    def entry(self, info: AdapterInfo) -> dict[str, Any]:
        hot = self.engine.stats()["hot_adapters"]  # under the engine's lock
        tier = "hot" if info.name in hot else (
            "warm" if info.name in self.store.warm_names() else "cold")
        return {"id": info.name, "object": "adapter", "parent": self.model_name,
                "rank": info.rank, "alpha": info.alpha,
                "target_modules": list(info.target_modules), "size_bytes": info.size_bytes,
                "tier": tier, "pinned": info.pinned}

    def load(self, name: str, pin: bool) -> AdapterInfo:
        try:
            self.store.validate(name)
            if pin:
                self.engine.pin_adapter(name)  # loads it too; ConfigError (-> 400) when too many pins
            else:
                self.store.get(name)  # full validation: tensors read, shapes checked; now warm
            return self.store.validate(name)
        except AdapterError as e:
            raise api_error(e, adapter_param="name") from e

    def pinned(self, name: str) -> bool:
        try:
            return self.store.validate(name).pinned
        except AdapterError:  # the stored one is broken: replacing it is the fix
            return False

    def add(self, folder: Path, name: str, pin: bool, overwrite: bool) -> AdapterInfo:
        store, engine = self.store, self.engine
        if not overwrite and store.exists(name):
            raise APIError(409, f"adapter {name!r} already exists; send overwrite=true to replace "
                                f"it, or DELETE /v1/adapters/{name} first", INVALID_REQUEST,
                           "name", "adapter_exists")
        was_pinned = overwrite and store.exists(name) and self.pinned(name)
        try:
            if was_pinned:
                engine.unpin_adapter(name)  # the replacement is pinned only if `pin` says so
            # validates everything before anything lands in root; replacing one drops its hot
            # copy in the engine once no running request uses it
            store.add(folder, name, overwrite=overwrite)
        except AdapterError as e:
            if was_pinned:
                engine.pin_adapter(name)  # refused: the old one stays as it was
            err = api_error(e, adapter_param="file")
            err.message = err.message.replace(str(folder), "the upload")  # not our temp path
            raise err from e
        return self.load(name, pin)

    def remove(self, name: str) -> None:
        try:
            self.store.resolve(name)
            self.engine.unpin_adapter(name)  # an explicit delete overrides a pin
            self.store.remove(name)  # the engine drops its hot copy once no request uses it
        except AdapterError as e:
            raise api_error(e, adapter_param="name") from e


def adapters_router(engine: Engine, model_name: str) -> APIRouter:
    """Routes over ``engine.store`` (which must be set); ``model_name`` is each entry's parent."""
    return AdaptersAPI(engine, model_name).router()


def _upload_form(form: FormData) -> tuple[str, bool, bool, list[UploadFile], list[str]]:
    """A multipart upload's name, pin, overwrite, file parts and their bare file names; every
    problem with the form in one 400."""
    name = form.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, "name: a multipart upload needs a 'name' field (the adapter's "
                            "name, [A-Za-z0-9._-]{1,64})", INVALID_REQUEST, "name")
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
        raise APIError(400, "; ".join(problems), INVALID_REQUEST,
                       "name" if problems[0].startswith("name") else "file")
    return name, pin, overwrite, files, names
