"""Adapter management over HTTP: list, load or upload, and delete PEFT LoRA adapters.

    GET    /v1/adapters          every valid adapter with its tier (hot / warm / cold)
    POST   /v1/adapters          JSON {"name", "pin"?}: load a folder already under the store's
                                 root; or multipart/form-data: a ``name`` field plus the PEFT
                                 files as file parts, validated fully and copied in atomically
                                 (409 if the name is taken, unless ``overwrite`` is true)
    GET    /v1/adapters/{name}   one entry
    DELETE /v1/adapters/{name}   unpin (if pinned) and remove from the store

Listing needs a key (its tenant sees the adapters its patterns allow); loading, uploading,
replacing, pinning and deleting need an admin key, and each is recorded in the audit log
(``adapter.load``, ``adapter.pin``, ``adapter.add``, ``adapter.replace``,
``adapter.delete``) with its outcome, refused or failed ones too (:mod:`fleetlm.server.auth`).

Validation, atomic copies and tiers are the store's (:class:`~fleetlm.adapters.store.
AdapterStore`); the hot tier is the engine's. This module only translates between HTTP and
those calls, and runs the blocking ones (disk, tensor loads) off the event loop so serving
goes on during an upload. An upload is parsed as it arrives (:class:`MultipartUpload`): its
files go straight to a temporary folder, at most ``max_upload_bytes`` of them (413 as soon as
that is passed), and the folder is removed whatever happens. A rejected upload leaves nothing
behind, in the store or in the temporary folder. Its errors map to
HTTP through :func:`fleetlm.server.errors.api_error` (the adapter named by ``name`` or by
the uploaded ``file``s). It knows nothing of generation, routes or the OpenAI endpoints.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from fleetlm.adapters.errors import AdapterError, AdapterNotFound
from fleetlm.adapters.store import AdapterInfo
from fleetlm.engine.engine import Engine
from fleetlm.server.auth import Gateway, caller_of
from fleetlm.server.errors import INVALID_REQUEST, APIError, api_error

# a file part's name, after dropping any directories the client sent with it
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_FORM_FIELDS = ("name", "pin", "overwrite")
UPLOAD_PATH = "/v1/adapters"
_MAX_FILES = 64  # a PEFT folder holds a handful (config, weights, tokenizer files, README)
_MAX_FIELD_BYTES = 64 << 10  # a form field's value (the name is at most 64 characters)


def size_text(n: int) -> str:
    """``n`` bytes for a message: 4 MiB, 64 KiB, 100 bytes."""
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} bytes"


def upload_too_large(limit: int) -> APIError:
    """The 413 of an upload whose files pass ``limit`` bytes."""
    return APIError(413, f"file: the upload is larger than the limit of {size_text(limit)} for an "
                         "adapter's files; upload a smaller adapter, or raise the limit with "
                         "`fleetlm serve --max-upload-mb`", INVALID_REQUEST, "file",
                    "upload_too_large")


class LoadAdapterRequest(BaseModel):
    """JSON body of ``POST /v1/adapters``: an adapter folder already under the store's root."""

    model_config = ConfigDict(extra="forbid")

    name: str
    pin: bool = False


class AdaptersAPI:
    """The adapter endpoints over ``engine.store`` (which must be set); ``model_name`` is
    each entry's parent. The blocking work runs in a thread, off the event loop."""

    def __init__(self, engine: Engine, model_name: str, max_upload_bytes: int,
                 gateway: Gateway | None = None) -> None:
        assert engine.store is not None, "adapters_router needs an engine with an adapter store"
        self.engine, self.store, self.model_name = engine, engine.store, model_name
        self.max_upload_bytes = max_upload_bytes
        self.gateway = gateway or Gateway(None)

    def router(self) -> APIRouter:
        r, g = APIRouter(), self.gateway
        user, admin = [Depends(g.authenticate)], [Depends(g.admin)]
        r.add_api_route(UPLOAD_PATH, self.list_adapters, methods=["GET"], dependencies=user)
        r.add_api_route(UPLOAD_PATH + "/{name}", self.get_adapter, methods=["GET"],
                        dependencies=user)
        r.add_api_route(UPLOAD_PATH, self.post_adapter, methods=["POST"], status_code=201,
                        dependencies=admin)
        r.add_api_route(UPLOAD_PATH + "/{name}", self.delete_adapter, methods=["DELETE"],
                        dependencies=admin)
        return r

    # -- the handlers --------------------------------------------------------------------

    async def list_adapters(self, request: Request) -> dict[str, Any]:
        policy = caller_of(request).policy
        infos = await run_in_threadpool(self.store.list)
        return {"object": "list", "data": [self.entry(i) for i in infos
                                           if policy is None or policy.allows_adapter(i.name)]}

    async def get_adapter(self, name: str, request: Request) -> dict[str, Any]:
        policy = caller_of(request).policy
        try:
            if policy is not None and not policy.allows_adapter(name):
                raise AdapterNotFound(name, "no such adapter for this key's tenant")
            info = await run_in_threadpool(self.store.validate, name)
        except AdapterError as e:
            raise api_error(e, adapter_param="name") from e
        return self.entry(info)

    async def post_adapter(self, request: Request) -> dict[str, Any]:
        action, detail = "adapter.load", dict[str, Any]()  # for the audit log, filled as it goes
        try:
            ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype == "multipart/form-data":
                action = "adapter.add"
                entry = await self.upload(request, detail)
                action = "adapter.replace" if detail.pop("replaced") else action
            else:
                entry = await self.load_json(request, detail)
                action = "adapter.pin" if entry["pinned"] else action
        except Exception as e:
            err = api_error(e, adapter_param="name")
            target = str(detail.pop("name", "?"))
            await self.gateway.record(request, action, target, "error",
                                      {**detail, "status": err.status, "code": err.code})
            raise
        detail.pop("name", None)
        await self.gateway.record(request, action, entry["id"], "ok", detail)
        return entry

    async def load_json(self, request: Request, detail: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/adapters`` with JSON: load (and maybe pin) a folder under the root;
        ``detail`` gets the name once it is read."""
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
        detail["name"] = body.name
        return self.entry(await run_in_threadpool(self.load, body.name, body.pin))

    async def upload(self, request: Request, detail: dict[str, Any]) -> dict[str, Any]:
        """A multipart upload: its entry; ``detail`` gets what the audit log records of it
        (the name, files and sizes) as it is read."""
        tmp = Path(await run_in_threadpool(tempfile.mkdtemp, None, "fleetlm-upload-"))
        try:
            folder = tmp / "adapter"
            folder.mkdir()
            form = MultipartUpload(folder, self.max_upload_bytes)
            await form.read(request)
            name, pin, overwrite = _upload_form(form)
            replaced = overwrite and await run_in_threadpool(self.store.exists, name)
            detail.update(name=name, bytes=form.file_bytes, pin=pin, overwrite=overwrite,
                          files=sorted(b for _, b in form.files), replaced=replaced)
            info = await run_in_threadpool(self.add, folder, name, pin, overwrite)
        finally:  # refused, failed or cancelled: the temporary folder goes too
            await asyncio.shield(run_in_threadpool(shutil.rmtree, tmp, True))
        return self.entry(info)

    async def delete_adapter(self, name: str, request: Request) -> dict[str, Any]:
        try:
            await run_in_threadpool(self.remove, name)
        except Exception as e:
            err = api_error(e, adapter_param="name")
            await self.gateway.record(request, "adapter.delete", name, "error",
                                      {"status": err.status, "code": err.code})
            raise
        await self.gateway.record(request, "adapter.delete", name, "ok")
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


def adapters_router(engine: Engine, model_name: str, max_upload_bytes: int,
                    gateway: Gateway | None = None) -> APIRouter:
    """Routes over ``engine.store`` (which must be set); ``model_name`` is each entry's parent;
    an upload's files may total ``max_upload_bytes``; ``gateway`` checks keys and records
    admin actions (None: an open server without an audit log)."""
    return AdaptersAPI(engine, model_name, max_upload_bytes, gateway).router()


class MultipartUpload:
    """A multipart/form-data body parsed as it arrives. File parts are written straight into
    ``folder`` under their bare names (directories the client sent dropped), at most ``cap``
    bytes of them in all: the chunk that passes it is not written and a 413 is raised at
    once. Other parts are form fields, kept in memory (each at most 64 KiB). A part whose
    file name is unacceptable or repeated is read but not written; :func:`_upload_form`
    reports it with the form's other problems once the body is read."""

    def __init__(self, folder: Path, cap: int) -> None:
        self.folder, self.cap = folder, cap
        self.fields: list[tuple[str, str]] = []  # (name, value) of each form field, in order
        self.files: list[tuple[str, str]] = []  # (file name as sent, bare name) per file part
        self.file_bytes = 0
        self._header, self._value, self._disposition = b"", b"", b""
        self._field: tuple[str, bytearray] | None = None  # the form field being read
        self._out: BinaryIO | None = None  # the file being written (None: a discarded part)
        self._pending: list[tuple[BinaryIO, bytes]] = []  # parsed, not yet written
        self._opened: list[BinaryIO] = []

    async def read(self, request: Request) -> None:
        """Read the whole body (raise APIError: 400 malformed, 413 over the cap)."""
        _, params = parse_options_header(request.headers.get("content-type"))
        boundary = params.get(b"boundary")
        if not boundary:
            raise APIError(400, "could not parse the multipart body (its Content-Type has no "
                                "boundary)", INVALID_REQUEST)
        try:
            parser = MultipartParser(boundary, {
                "on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_part_end": self._end})
            async for chunk in request.stream():
                parser.write(chunk)
                if self.file_bytes > self.cap:
                    raise upload_too_large(self.cap)
                if self._pending:
                    pending, self._pending = self._pending, []
                    await run_in_threadpool(_write_all, pending)
            parser.finalize()
        except FormParserError as e:  # malformed multipart body
            raise APIError(400, f"could not parse the multipart body ({e})",
                           INVALID_REQUEST) from e
        except ClientDisconnect:
            raise APIError(400, "the client went away before the upload ended",
                           INVALID_REQUEST, "file") from None
        finally:
            for f in self._opened:
                f.close()

    # -- the parser's callbacks (synchronous; the file writes happen in read())

    def _begin(self) -> None:
        self._header, self._value, self._disposition = b"", b"", b""
        self._field, self._out = None, None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        if len(self._value) > _MAX_FIELD_BYTES:
            raise APIError(400, "a part's header is longer than 64 KiB", INVALID_REQUEST)

    def _header_end(self) -> None:
        if self._header.strip().lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise APIError(400, "could not parse the multipart body (a part has no name in "
                                "its Content-Disposition)", INVALID_REQUEST)
        field = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            self._field = (field, bytearray())
            return
        if len(self.files) >= _MAX_FILES:
            raise APIError(400, f"file: at most {_MAX_FILES} files in one upload (an adapter "
                                "needs adapter_config.json and adapter_model.safetensors)",
                           INVALID_REQUEST, "file")
        sent = options[b"filename"].decode("utf-8", "replace")
        bare = Path(sent.replace("\\", "/")).name
        acceptable = _FILE_NAME.fullmatch(bare) and all(n != bare for _, n in self.files)
        self.files.append((sent, bare))
        if acceptable:
            self._out = (self.folder / bare).open("wb")
            self._opened.append(self._out)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._field is not None:
            value = self._field[1]
            if len(value) + end - start > _MAX_FIELD_BYTES:
                raise APIError(400, f"{self._field[0]}: a form field's value is longer than "
                                    "64 KiB", INVALID_REQUEST, self._field[0])
            value += data[start:end]
            return
        self.file_bytes += end - start
        if self._out is not None and self.file_bytes <= self.cap:
            self._pending.append((self._out, data[start:end]))

    def _end(self) -> None:
        if self._field is not None:
            self.fields.append((self._field[0], self._field[1].decode("utf-8", "replace")))
            self._field = None


def _write_all(pending: list[tuple[BinaryIO, bytes]]) -> None:
    for f, data in pending:
        f.write(data)


def _upload_form(form: MultipartUpload) -> tuple[str, bool, bool]:
    """A multipart upload's name, pin and overwrite; every problem with the form (its fields
    and file parts) in one 400."""
    fields: dict[str, str] = {}
    for k, v in form.fields:
        fields.setdefault(k, v)
    name = fields.get("name")
    if not name:
        raise APIError(400, "name: a multipart upload needs a 'name' field (the adapter's "
                            "name, [A-Za-z0-9._-]{1,64})", INVALID_REQUEST, "name")
    pin, overwrite = (fields.get(k, "false").strip().lower() in ("1", "true", "yes", "on")
                      for k in ("pin", "overwrite"))
    problems = [f"{k}: unknown field (send {', '.join(_FORM_FIELDS)} and file parts)"
                for k, _ in form.fields if k not in _FORM_FIELDS]
    names = [bare for _, bare in form.files]
    problems += [f"file {sent!r}: not an acceptable file name" for sent, bare in form.files
                 if not _FILE_NAME.fullmatch(bare)]
    if not form.files:
        problems.append("no files: attach adapter_config.json and "
                        "adapter_model.safetensors as file parts")
    if len(set(names)) != len(names):
        problems.append(f"file names repeat: {sorted(names)}")
    if problems:
        raise APIError(400, "; ".join(problems), INVALID_REQUEST,
                       "name" if problems[0].startswith("name") else "file")
    return name, pin, overwrite
