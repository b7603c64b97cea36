"""The ingress's RemoteEngine and ClusterSettings without Ray: a fake deployment handle
whose streams are scripted, so every way a replica can answer (or fail) is provoked."""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from fleetlm.adapters.errors import AdapterError, AdapterNotFound
from fleetlm.cluster.remote import RemoteEngine
from fleetlm.cluster.replica import EngineReplica, Placement
from fleetlm.cluster.settings import ClusterSettings
from fleetlm.engine.engine import EngineConfig, EngineEvent
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.errors import ConfigError, EngineBusy, EngineUnavailable
from fleetlm.server.errors import api_error


class FakeStream:
    """A Serve streaming response: yields ``items``, then raises ``fail`` if given."""

    def __init__(self, items: list[Any], fail: BaseException | None = None) -> None:
        self.items, self.fail, self.cancelled = list(items), fail, False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        if self.items:
            return self.items.pop(0)
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    def __init__(self, stream: FakeStream) -> None:
        self.stream, self.calls = stream, []
        self.generate = self

    def options(self, **kw: Any) -> FakeHandle:
        self.calls.append(kw)
        return self

    def remote(self, prompt: list[int], params: Any, adapter: str | None) -> FakeStream:
        return self.stream


class Store:
    def validate(self, name: str) -> None:
        if name == "missing":
            raise AdapterNotFound(name, "no such adapter in the store")


def ev(token: int | None, finish: str | None = None) -> EngineEvent:
    return EngineEvent("r", token, "x" if token is not None else "", finish_reason=finish)


def remote(items: list[Any], fail: BaseException | None = None) -> tuple[RemoteEngine, FakeHandle]:
    h = FakeHandle(FakeStream(items, fail))
    return RemoteEngine(h, lm=None, config=EngineConfig(), store=Store()), h


async def drain(it: AsyncIterator[EngineEvent]) -> list[EngineEvent]:
    return [e async for e in it]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_events_pass_through_and_placement_is_counted() -> None:
    # a message holds one event or several (the replica's stream_interval)
    eng, h = remote([Placement("r1", True), [ev(5)], [ev(6), ev(None, "length")]])
    got = run(drain(eng.stream([1, 2], SamplingParams(max_tokens=2), adapter="a")))
    assert [e.token_id for e in got] == [5, 6, None] and got[-1].finish_reason == "length"
    assert h.calls == [{"stream": True, "multiplexed_model_id": "a"}]
    s = eng.stats()
    assert (s["requests"], s["adapter_requests"], s["adapter_hot_hits"]) == (1, 1, 1)
    assert s["generated_tokens"] == 2 and s["running"] == 0 and s["replicas"] == {"r1": 1}
    assert not h.stream.cancelled
    eng2, h2 = remote([Placement("r2", False), [ev(None, "stop")]])
    run(drain(eng2.stream([1], SamplingParams(), adapter=None)))
    assert h2.calls[0]["multiplexed_model_id"] == ""  # the base model: any replica
    assert eng2.stats()["adapter_requests"] == 0


@pytest.mark.parametrize("refusal", [ConfigError("temperature: must be >= 0",
                                                 param="temperature"),
                                     EngineBusy("queue full", retry_after_s=3.0),
                                     AdapterError("bad", "lora_A has the wrong shape")])
def test_a_replica_refusal_is_raised_as_the_engine_raised_it(refusal: Exception) -> None:
    # the refusal crossed a process: it must survive pickling with its fields
    refusal = pickle.loads(pickle.dumps(refusal))
    eng, _ = remote([Placement("r1", True), refusal])
    with pytest.raises(type(refusal)) as got:
        run(drain(eng.stream([1], SamplingParams(), adapter="a")))
    assert str(got.value) == str(refusal)
    assert api_error(got.value).status == api_error(refusal).status


def test_an_unknown_adapter_is_refused_before_any_replica_is_asked() -> None:
    eng, h = remote([])
    with pytest.raises(AdapterNotFound):
        run(drain(eng.stream([1], SamplingParams(), adapter="missing")))
    assert h.calls == []


def test_a_replica_lost_before_the_request_started_is_a_503() -> None:
    eng, h = remote([], fail=RuntimeError("ActorDiedError: the actor died"))
    with pytest.raises(EngineUnavailable) as got:
        run(drain(eng.stream([1], SamplingParams(), adapter="a")))
    err = api_error(got.value)
    assert err.status == 503 and err.code == "engine_unavailable"
    assert err.headers == {"Retry-After": "1"} and "retry" in err.message
    assert eng.stats()["running"] == 0


def test_a_replica_lost_mid_stream_ends_it_with_an_error_event() -> None:
    eng, h = remote([Placement("r1", True), [ev(5)]], fail=RuntimeError("actor died"))
    got = run(drain(eng.stream([1], SamplingParams(), adapter="a")))
    assert [e.token_id for e in got] == [5, None]
    assert got[-1].finish_reason == "error" and isinstance(got[-1].error, EngineUnavailable)
    assert "r1" in str(got[-1].error)
    # a stream that just stops (no last event) is the same failure
    eng, h = remote([Placement("r1", True), [ev(5)]])
    got = run(drain(eng.stream([1], SamplingParams(), adapter="a")))
    assert got[-1].finish_reason == "error"


def test_closing_the_stream_early_cancels_the_replica_call() -> None:
    eng, h = remote([Placement("r1", True), [ev(5), ev(6)], [ev(None, "length")]])

    async def first_only() -> None:
        it = eng.stream([1], SamplingParams(), adapter="a")
        await it.__anext__()
        await it.aclose()  # type: ignore[attr-defined]

    run(first_only())
    assert h.stream.cancelled and eng.stats()["running"] == 0


class FakeEngine:
    """The engine a replica drives: streams ``n`` tokens, then a finish event."""

    def __init__(self, n: int) -> None:
        self.n, self.store = n, None

    async def stream(self, prompt: list[int], params: Any, adapter: str | None = None,
                     ) -> AsyncIterator[EngineEvent]:
        for i in range(self.n):
            yield ev(i)
        yield ev(None, "length")


def replica(n: int, interval: int) -> EngineReplica:
    r = EngineReplica.__new__(EngineReplica)  # no engine thread: the stream logic alone
    r.replica, r.adapter_loads, r.stream_interval, r.engine = "r1", 0, interval, FakeEngine(n)
    return r


@pytest.mark.parametrize("n,interval,sizes", [(7, 1, [1] * 8), (7, 3, [1, 3, 3, 1]),
                                              (5, 4, [1, 4, 1]), (0, 4, [1])])
def test_a_replica_sends_the_first_event_alone_then_groups_of_stream_interval(
        n: int, interval: int, sizes: list[int]) -> None:
    async def messages() -> list[Any]:
        return [m async for m in replica(n, interval).generate([1], SamplingParams(), None)]

    got = run(messages())
    assert got[0] == Placement("r1", True)
    assert [len(m) for m in got[1:]] == sizes  # the finish event flushes what is held
    events = [e for m in got[1:] for e in m]
    assert [e.token_id for e in events] == [*range(n), None]
    # and the ingress gives its app every event, in order, one at a time
    eng, _ = remote(got)
    assert [e.token_id for e in run(drain(eng.stream([1], SamplingParams())))] == \
        [*range(n), None]


def test_pinning_is_refused_with_the_reason() -> None:
    eng, _ = remote([])
    with pytest.raises(ConfigError, match="not available with --ray"):
        eng.pin_adapter("a")


def test_cluster_settings_reject_what_cannot_run() -> None:
    with pytest.raises(ValidationError, match="max_replicas .* below min_replicas"):
        ClusterSettings(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="initial_replicas"):
        ClusterSettings(min_replicas=1, max_replicas=2, initial_replicas=5)
    with pytest.raises(ValidationError, match="look_back_period_s"):
        ClusterSettings(look_back_period_s=1, metrics_interval_s=2)
    with pytest.raises(ValidationError, match="stream_interval"):
        ClusterSettings(stream_interval=0)
    with pytest.raises(ValidationError, match="replicas"):
        ClusterSettings(replicas=2)  # type: ignore[call-arg]  # unknown keys are errors
    c = ClusterSettings(min_replicas=0, max_replicas=4, downscale_to_zero_delay_s=60)
    a = c.autoscaling()
    assert (a["min_replicas"], a["max_replicas"], a["downscale_to_zero_delay_s"]) == (0, 4, 60)
    assert "initial_replicas" not in a
    env = c.replica_env()
    assert env["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] == "10.0"
    assert env["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] == "10.0"
    # Serve's throughput mode, without direct ingress (clients keep --port)
    assert (env["RAY_SERVE_THROUGHPUT_OPTIMIZED"], env["RAY_SERVE_ENABLE_DIRECT_INGRESS"]) == (
        "1", "0")


def test_throughput_mode_yields_to_the_users_environment(monkeypatch: pytest.MonkeyPatch,
                                                         ) -> None:
    from fleetlm.cluster.settings import ClusterSettings

    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")
    env = ClusterSettings().replica_env()
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"


def test_serve_ray_bad_options_name_the_option() -> None:
    r = subprocess.run([sys.executable, "-m", "fleetlm", "serve", "--ray", "--min-replicas", "3",
                        "--max-replicas", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--max-replicas" in r.stderr or "max_replicas" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_kuberay_manifest_builds_the_application() -> None:
    """deploy/rayservice.yaml's Serve config names an importable builder, and its args are
    settings the builder accepts (unknown keys are refused as on the command line)."""
    from pathlib import Path

    import yaml

    from fleetlm.cluster.deploy import build_app

    manifest = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "rayservice.yaml")
                              .read_text())
    serve_cfg = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (app_cfg,) = serve_cfg["applications"]
    assert app_cfg["import_path"] == "fleetlm.cluster.deploy:build_app"
    app = build_app(app_cfg["args"])
    assert type(app).__name__ == "Application"
    with pytest.raises(ValidationError, match="max_replica"):
        build_app({**app_cfg["args"], "cluster": {"max_replica": 3}})
    with pytest.raises(ValidationError, match="max_batchs"):
        build_app({**app_cfg["args"], "max_batchs": 3})


def test_serve_ray_checks_the_routes_file_before_starting_ray(tmp_path: Any) -> None:
    bad = tmp_path / "routes.yaml"
    bad.write_text("routes:\n  r:\n    small: 'not a name!'\n    policy: always-small\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fleetlm", "serve", "--ray", "--config", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "routes.r.small" in r.stderr and "Traceback" not in r.stderr
    assert "Ray" not in r.stderr.split("error:")[0]  # failed before any cluster started
    assert time.perf_counter() - t0 < 60


def test_bench_cluster_config_refuses_what_it_cannot_run() -> None:
    from fleetlm.bench.cluster import ClusterBenchConfig

    assert ClusterBenchConfig(skip=["affinity"]).phases() == ["overhead", "cold-start",
                                                              "scale-up"]
    with pytest.raises(ConfigError, match="skip: bogus is not a phase; choose from overhead"):
        ClusterBenchConfig(skip=["bogus"]).phases()
    for bad in ({"rounds": 0}, {"stream_interval": 0}, {"step_s": 0}, {"replica": 2}):
        with pytest.raises(ValidationError):
            ClusterBenchConfig(**bad)  # type: ignore[arg-type]
