"""The Ray Serve application of ``fleetlm serve --ray``, and running it.

    app = application(serve_settings, cluster_settings)   # ingress + engine deployments
    app = build_app({"model": "smollm2-135m", "cluster": {"max_replicas": 4}})  # Serve config
    handle = start(serve_settings, cluster_settings)       # connect/start Ray, deploy
    run(serve_settings, cluster_settings, say=print)       # the CLI: deploy, wait for a signal

Two deployments:

- ``engine``: :class:`~fleetlm.cluster.replica.EngineReplica`, ``replica_threads`` CPUs each,
  autoscaled between ``min_replicas`` (0 allowed) and ``max_replicas`` on requests in
  flight; each replica's adapters are Serve's multiplexed models (up to
  ``max_hot_adapters``), so requests for an adapter go where it is hot.
- ``ingress``: :class:`~fleetlm.cluster.ingress.Ingress`, the HTTP app (no CPUs reserved:
  it waits on the replicas), behind Ray Serve's proxy on ``--host``/``--port``.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fleetlm.errors import FleetLMError

if TYPE_CHECKING:
    from fleetlm.cluster.settings import ClusterSettings
    from fleetlm.server.run import ServeSettings

ENGINE = "engine"
INGRESS = "ingress"


def engine_deployment(settings: ServeSettings, cluster: ClusterSettings) -> Any:
    """The engine deployment, its multiplexed-adapter LRU as large as the engine's hot set."""
    from ray import serve

    from fleetlm.cluster.replica import EngineReplica

    class FleetlmEngine(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=max(1, settings.max_hot_adapters))
        async def load_adapter(self, name: str) -> str:
            return await self._load_adapter(name)

    return serve.deployment(
        FleetlmEngine, name=ENGINE,
        ray_actor_options={"num_cpus": cluster.replica_threads,
                           "runtime_env": {"env_vars": cluster.replica_env()}},
        autoscaling_config=cluster.autoscaling(),
        # requests a replica takes at once: its batch plus a queue as long again
        max_ongoing_requests=2 * settings.max_batch,
        health_check_period_s=10, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=settings.grace_s,
    )


def ingress_deployment(cluster: ClusterSettings) -> Any:
    from ray import serve

    from fleetlm.cluster.ingress import Ingress

    return serve.deployment(serve.ingress()(Ingress), name=INGRESS,
                            num_replicas=cluster.ingress_replicas,
                            ray_actor_options={"num_cpus": 0,
                                               "runtime_env": {"env_vars": cluster.replica_env()}},
                            max_ongoing_requests=1024)


def application(settings: ServeSettings, cluster: ClusterSettings) -> Any:
    """The bound application: the ingress, given a handle to the engine deployment."""
    data = settings.model_dump(mode="json")
    engine = engine_deployment(settings, cluster).bind(data, cluster.replica_threads,
                                                        cluster.stream_interval)
    return ingress_deployment(cluster).bind(engine, data, cluster.adapter_affinity)


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder (``import_path: fleetlm.cluster.deploy:build_app``
    in a Serve config or a KubeRay ``RayService``): ``args`` holds ``fleetlm serve``'s
    settings by field name, and a ``cluster`` mapping of :class:`ClusterSettings` fields.
    Unknown keys are errors, as on the command line."""
    from fleetlm.cluster.settings import ClusterSettings
    from fleetlm.server.run import ServeSettings

    args = dict(args)
    cluster = ClusterSettings.model_validate(args.pop("cluster", {}))
    return application(ServeSettings.model_validate(args), cluster)


def connect(cluster: ClusterSettings) -> bool:
    """Join ``cluster.address`` or start a local cluster (True: started here, so ours to
    stop). Usage statistics off: nothing leaves the machine."""
    import ray

    from fleetlm.cluster.settings import throughput_env

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if cluster.address:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        return False
    # Ray starts its workers at nice 15 by default; the engine replicas are the work here,
    # and on a small machine they would lose the cores to anything else running
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Serve's controller wakes every 0.1 s and exports metrics every 0.1 s by default: on
    # 2 cores, 4% of a core while idle, taken from the engine (docs/scale-out.md); 0.5 s and
    # 1 s halve Ray's idle use, and nothing here reacts faster than a second anyway
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "1000")
    # Serve's throughput mode for its controller and proxy too (the replicas get it from
    # their runtime environment on any cluster: ClusterSettings.replica_env)
    for k, v in throughput_env().items():
        os.environ.setdefault(k, v)
    ray.init(num_cpus=cluster.num_cpus or os.cpu_count(), include_dashboard=False,
             log_to_driver=False)
    return True


def start(settings: ServeSettings, cluster: ClusterSettings) -> Any:
    """Deploy the application (Ray connected or started first) and wait until it runs;
    its ingress handle. Serve's HTTP proxy listens on ``settings.host:settings.port``."""
    from ray import serve

    connect(cluster)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    with warnings.catch_warnings():  # Ray 2.60 still reads the field it calls deprecated
        warnings.filterwarnings("ignore", message=".*metrics_interval_s.*")
        return serve.run(application(settings, cluster), name=cluster.app_name,
                         route_prefix="/")


def replica_count(cluster: ClusterSettings, deployment: str = ENGINE) -> int:
    """Running replicas of a deployment of the application (0 when scaled to zero)."""
    from ray import serve

    app = serve.status().applications.get(cluster.app_name)
    if app is None or deployment not in app.deployments:
        return 0
    from ray.serve._private.common import ReplicaState

    counts = app.deployments[deployment].replica_states
    return int(counts.get(ReplicaState.RUNNING, 0))


def run(settings: ServeSettings, cluster: ClusterSettings, say: Callable[[str], None]) -> None:
    """``fleetlm serve --ray``: deploy, then serve until SIGTERM or Ctrl-C; the application
    is deleted on the way out, and a local cluster started here is stopped."""
    import ray
    from ray import serve

    if cluster.ingress_replicas > 1 and not (settings.state_db or os.environ.get(
            "FLEETLM_STATE_DB", "")).startswith("postgresql"):
        say("fleetlm: warning: several ingress replicas on a SQLite state store each lock "
            "the one file, and a multi-node cluster cannot share it; pass --state-db "
            "postgresql://...")
    # what can be checked here fails here, with its own message, before any replica starts
    from fleetlm.server.run import load_routes_file
    from fleetlm.state.db import open_state

    load_routes_file(settings)
    open_state(settings.state_db).close()
    started = connect(cluster)
    where = "a local Ray cluster" if started else f"the Ray cluster at {cluster.address}"
    say(f"fleetlm: deploying {cluster.app_name!r} on {where}: engine replicas "
        f"{cluster.min_replicas}..{cluster.max_replicas}, {cluster.replica_threads} thread(s) "
        "each")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            start(settings, cluster)
        except Exception as e:  # noqa: BLE001 -- Ray's deploy errors vary: name the fix
            raise FleetLMError(f"the Ray Serve application did not start: {e}{_why(cluster)} "
                               "(replica logs: /tmp/ray/session_latest/logs/serve)") from e
        say(f"fleetlm: serving on http://{settings.host}:{settings.port}/v1 through Ray Serve "
            f"({replica_count(cluster)} engine replica(s) running); Ctrl-C stops")
        stop.wait()
    finally:
        if ray.is_initialized():
            try:
                serve.delete(cluster.app_name)
            finally:
                if started:
                    serve.shutdown()
                    ray.shutdown()


def _why(cluster: ClusterSettings) -> str:
    """The last line of the failing replica's error in Serve's status (a fleetlm error
    names the field and the fix), or nothing."""
    from ray import serve

    try:
        app = serve.status().applications.get(cluster.app_name)
    except Exception:  # noqa: BLE001 -- the cluster may be gone: the error stands alone
        return ""
    texts = [app.message] if app is not None else []
    if app is not None:
        texts += [d.message for d in app.deployments.values()]
    lines = [ln.strip() for t in texts if t for ln in t.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("fleetlm.") or ln.startswith("routes.")]
    return ("; " + " ".join(ours[-2:])) if ours else ""
