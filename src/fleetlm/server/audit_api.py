"""``GET /v1/audit``: the audit log, for admin keys.

    GET /v1/audit?since=7d&tenant=acme&action=adapter.&limit=100

``since`` and ``until`` take unix seconds or an age (``30m``, ``12h``, ``7d``); ``action``
matches by prefix (``adapter.`` is every adapter action); ``limit`` is 1 to 1000 (the
oldest events of the window first, as ``fleetlm audit`` prints them). The log is read on a
worker thread. This module only translates HTTP to :class:`fleetlm.state.audit.AuditLog`.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, Query

from fleetlm.server.auth import Gateway
from fleetlm.server.errors import INVALID_REQUEST, APIError

_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def when(value: str | None, param: str) -> float | None:
    """Unix seconds from ``1733500000`` or an age like ``7d``; 400 naming ``param`` else."""
    if value is None or value == "":
        return None
    m = _AGE.fullmatch(value.strip())
    if m:
        return time.time() - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(value)
    except ValueError:
        raise APIError(400, f"{param}={value!r}: send unix seconds or an age such as 30m, "
                            "12h or 7d", INVALID_REQUEST, param) from None


def audit_router(gateway: Gateway) -> APIRouter:
    """The audit endpoint, behind an admin key."""
    r = APIRouter()

    @r.get("/v1/audit", dependencies=[Depends(gateway.admin)])
    async def audit(since: str | None = Query(None, max_length=32),
                    until: str | None = Query(None, max_length=32),
                    tenant: str | None = Query(None, max_length=64),
                    action: str | None = Query(None, max_length=64),
                    limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        if gateway.audit is None:
            return {"object": "list", "data": []}
        events = await asyncio.to_thread(gateway.audit.query, since=when(since, "since"),
                                         until=when(until, "until"), tenant=tenant,
                                         action=action, limit=limit)
        return {"object": "list", "data": [{"object": "audit_event", **asdict(e)}
                                           for e in events]}

    return r
