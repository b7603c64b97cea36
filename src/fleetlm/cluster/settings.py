"""How ``fleetlm serve --ray`` lays the engine out on a Ray cluster (one field per option)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from fleetlm.config import StrictModel


class ClusterSettings(StrictModel):
    """Replicas and autoscaling of the engine deployment; the ingress is fixed-size.

    Engine replicas scale between ``min_replicas`` (0: none while idle; the first request
    then waits for one to start) and ``max_replicas`` on requests in flight per replica
    (``target_ongoing_requests``). A replica goes after ``downscale_delay_s`` below target;
    the last one after ``downscale_to_zero_delay_s`` without requests.
    """

    address: str | None = None  # an existing cluster ("ray://host:10001", "auto"); None: local
    app_name: str = "fleetlm"
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    replica_threads: int = Field(1, ge=1)  # CPUs reserved and torch threads, per engine replica
    target_ongoing_requests: float = Field(16.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)
    downscale_to_zero_delay_s: float = Field(300.0, ge=0)
    # the window of in-flight counts the autoscaler averages over, and how often replicas
    # report them (Ray's defaults: 30 s and 10 s; the window must be the longer)
    look_back_period_s: float = Field(30.0, gt=0)
    metrics_interval_s: float = Field(10.0, gt=0)
    ingress_replicas: int = Field(1, ge=1)
    # tokens a replica sends the ingress in one message after a request's first (which goes
    # alone, at once): each message costs both processes CPU the engine would otherwise use
    # (docs/scale-out.md); the client still gets one SSE chunk per token
    stream_interval: int = Field(1, ge=1, le=64)
    # requests for an adapter carry it as Serve's multiplexed model id (routed to a replica
    # that holds it); False routes them like any request (to measure what affinity buys)
    adapter_affinity: bool = True
    # a local cluster's CPUs (None: all of this machine's); ignored with an address
    num_cpus: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _replica_range(self) -> ClusterSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas "
                             f"({self.min_replicas}); raise --max-replicas")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"look_back_period_s ({self.look_back_period_s}) must be longer "
                             f"than metrics_interval_s ({self.metrics_interval_s})")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie in "
                             f"[min_replicas, max_replicas] = [{self.min_replicas}, "
                             f"{self.max_replicas}]")
        return self

    def autoscaling(self) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config`` for the engine deployment."""
        cfg: dict[str, Any] = {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            "downscale_to_zero_delay_s": self.downscale_to_zero_delay_s,
            "look_back_period_s": self.look_back_period_s,
            "metrics_interval_s": self.metrics_interval_s,
        }
        if self.initial_replicas is not None:
            cfg["initial_replicas"] = self.initial_replicas
        return cfg

    def replica_env(self) -> dict[str, str]:
        """The environment of both deployments' replicas, on any cluster: how often replicas
        and handles report their load, for the autoscaler (Ray reads it from these variables;
        the AutoscalingConfig field is deprecated), and Ray Serve's throughput mode."""
        every = str(self.metrics_interval_s)
        return {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": every,
                "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": every,
                **throughput_env()}


# Ray Serve's throughput mode (its own switch, off by default): user code on the replica's
# event loop instead of a second thread's, the handle's router on the caller's loop, gRPC
# between replicas, buffered request logs. On 2 cores it took the Ray path from 0.65x to
# 0.77x-0.92x of the single process at 32 streams (docs/scale-out.md). Our engine steps on a
# thread of its own, so nothing of ours blocks the loop. Direct ingress (the HTTP server in
# the ingress replica, on a port from a range) stays off: clients keep --port.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def throughput_env() -> dict[str, str]:
    """:data:`THROUGHPUT_ENV`, where this process's environment does not say otherwise."""
    import os

    return {k: os.environ.get(k, v) for k, v in THROUGHPUT_ENV.items()}
