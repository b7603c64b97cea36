"""The ingress deployment: ``fleetlm serve``'s HTTP app, over the engine replicas.

Each ingress replica opens the state store (keys, tenants, budgets, audit log, ledger: one
PostgreSQL URL when there are several ingress replicas or several machines), the adapter
store on the shared folder, and the routes file; loads the model's tokenizer and chat
template (the model is loaded once here for them; the ingress runs no forward pass); and
serves the same app as ``fleetlm serve`` over a :class:`~fleetlm.cluster.remote.RemoteEngine`.
Ray Serve's proxy forwards HTTP to it (``serve.ingress``, the app built at replica start).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("fleetlm.cluster")


class Ingress:
    """Wrapped by ``serve.ingress()`` in :mod:`fleetlm.cluster.deploy`; ``engine`` is the
    engine deployment's handle (Serve passes it for the bound deployment)."""

    def __init__(self, engine: Any, settings: dict[str, Any], affinity: bool = True) -> None:
        self.engine_handle = engine
        self.settings = settings
        self.affinity = affinity
        self.remote: Any = None
        self._close: list[Any] = []

    def __serve_build_asgi_app__(self) -> Any:
        from fleetlm.cluster.remote import RemoteEngine
        from fleetlm.models.loader import load_model
        from fleetlm.server.run import (
            ServeSettings,
            api_name,
            assemble,
            engine_config,
            load_routes_file,
            open_adapter_store,
            open_gateway,
        )

        s = ServeSettings.model_validate(self.settings)
        routes_cfg = load_routes_file(s)
        state, gateway = open_gateway(s, say=log.info)
        # the tokenizer and chat template; float32, unquantised: nothing runs on it here
        lm = load_model(s.model, dtype="float32", quantize="none")
        store = open_adapter_store(s, lm.config, lm.model.dtype)
        self.remote = RemoteEngine(self.engine_handle, lm, engine_config(s), store,
                                   affinity=self.affinity)
        app, router = assemble(s, self.remote, api_name(s, lm), state, gateway, routes_cfg,
                               say=log.info)
        if router is not None:
            self._close.append(router.ledger.close)
        self._close.append(state.close)
        return app

    def __del__(self) -> None:
        for close in getattr(self, "_close", []):
            try:
                close()
            except Exception:  # noqa: BLE001 -- shutting down: log, never raise
                log.exception("closing the ingress's stores failed")
