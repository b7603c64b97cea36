"""Scale-out on Ray Serve: ``fleetlm serve --ray``.

    settings.py  ClusterSettings: replicas (0 allowed), threads per replica, autoscaling
    replica.py   EngineReplica: one engine per Ray Serve replica; adapters as multiplexed models
    remote.py    RemoteEngine: what the HTTP app sees of the replicas (an engine's serving surface)
    deploy.py    the Ray Serve application (ingress + engine replicas), started or connected

Requests for an adapter carry its name as Serve's multiplexed model id, so Serve routes them
to a replica that already holds it; the ingress deployment runs the same app as
``fleetlm serve`` (keys, routes, PII, ledger) over a :class:`remote.RemoteEngine`.
Nothing here imports Ray at import time.
"""
