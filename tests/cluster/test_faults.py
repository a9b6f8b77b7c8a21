"""Faults during generation on the cluster backend: a host process killed mid-request.

Each test drives an `Engine` step by step over hosts on the session's real Ray cluster and SIGKILLs
one host process (its pid from `hosts_info`) after a few steps of a 64-token greedy generation; the
last one kills the controller instead: Ray restarts it and it adopts the running hosts.
Every time bound here is a liveness guard (the test must never hang), not a speed claim: Ray
restarts a killed actor in about 1.5 s on a new port.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray

from cluster.deploy import ClusterConfig, ExpertCluster, LocalConfig, build_engine, load_cluster_model, load_local_model
from cluster.placement import HostResources
from mixtral.model import Mixtral
from router.dispatch import DispatchConfig, ExpertUnavailableError
from router.engine import EngineConfig
from router.kv_cache import CacheConfig
from router.sampler import SamplingParams
from tests.raynodes import RayNodes

pytestmark = pytest.mark.slow

PROMPTS = [[1, 415, 5565, 302, 4843, 349, 5465, 28725, 304, 272, 5565], [1, 22557, 28808], [1, 330, 2033, 349, 264]]
LONG = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
KILL_AFTER_STEPS = 10  # the first step is the prefill: the kill lands in the middle of decoding
GENERATION_BOUND_S = 60.0  # the whole 64-token run, outage included
RESTART_BOUND_S = 30.0  # until hosts_info shows a killed host serving again


def engine_for(model: Mixtral) -> Any:
    return build_engine(model, CacheConfig(num_slots=len(PROMPTS), max_seq_len=128), EngineConfig())


@pytest.fixture(scope="module")
def expected(tiny_checkpoint: Path) -> list[list[int]]:
    """The undisturbed in-process run of the 64-token generation."""
    model = load_local_model(LocalConfig(tiny_checkpoint, dtype="float32", device="cpu"))
    return [c.token_ids for c in engine_for(model).generate(PROMPTS, [LONG] * len(PROMPTS))]


def start(model_dir: Path, name: str, replicas: int, dispatch: DispatchConfig,
          resources: HostResources | None = None) -> tuple[Mixtral, ExpertCluster]:
    cfg = ClusterConfig(model_dir, num_hosts=2, replicas=replicas, dtype="float32", device="cpu",
                        hosts=resources or HostResources(num_cpus=1), dispatch=dispatch, name=f"faults-{name}")
    return load_cluster_model(cfg)


def generate_killing(model: Mixtral, pid: int) -> list[list[int]]:
    """Greedy 64-token run of PROMPTS; SIGKILL `pid` after KILL_AFTER_STEPS engine steps."""
    engine = engine_for(model)
    seqs = [engine.add(str(i), prompt, LONG) for i, prompt in enumerate(PROMPTS)]
    steps = 0
    try:
        while engine.running:
            if steps == KILL_AFTER_STEPS:
                os.kill(pid, signal.SIGKILL)
            engine.step()
            steps += 1
    except Exception:
        engine.abort_all()
        raise
    assert steps > KILL_AFTER_STEPS, "the generation ended before the kill"
    return [s.completion().token_ids for s in seqs]


def host(cluster: ExpertCluster, host_id: str) -> dict[str, Any]:
    return next(h for h in cluster.hosts_info() if h["host_id"] == host_id)


def wait_restarted(cluster: ExpertCluster, before: dict[str, Any]) -> dict[str, Any]:
    """hosts_info of `before`'s host once Ray has restarted it (a new pid), within RESTART_BOUND_S."""
    deadline = time.monotonic() + RESTART_BOUND_S
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = host(cluster, before["host_id"])
        except Exception as err:  # hosts_info times out while the host restarts
            last = err
        else:
            if last["pid"] != before["pid"]:
                return dict(last)
        time.sleep(0.3)
    raise AssertionError(f"{before['host_id']} was not restarted within {RESTART_BOUND_S:.0f} s: {last!r}")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


def test_killing_one_replica_mid_generation_changes_no_token(ray_cluster: RayNodes, tiny_checkpoint: Path,
                                                             expected: list[list[int]]) -> None:
    # 2 hosts x 2 replicas: every expert is on both hosts, so the survivor takes over at once.
    model, cluster = start(tiny_checkpoint, "replica", replicas=2, dispatch=DispatchConfig())
    with cluster:
        victim = host(cluster, "host-1")
        version = cluster.backend.table.version
        got, elapsed = timed(lambda: generate_killing(model, victim["pid"]))
        assert cluster.backend.table.version > version  # the router saw the failure and refreshed its table
        restarted = wait_restarted(cluster, victim)
    assert got == expected
    assert elapsed < GENERATION_BOUND_S
    assert restarted["endpoint"] != victim["endpoint"]


def test_killing_the_only_host_of_experts_waits_for_its_restart(ray_cluster: RayNodes, tiny_checkpoint: Path,
                                                                expected: list[list[int]]) -> None:
    # 2 hosts x 1 replica: host-0 alone serves experts 0 and 2; the router waits (restart_wait_s)
    # for Ray to restart it, on a new port, and re-resolves its endpoint from the controller.
    dispatch = DispatchConfig(restart_wait_s=30.0)
    model, cluster = start(tiny_checkpoint, "restart", replicas=1, dispatch=dispatch)
    with cluster:
        victim = host(cluster, "host-0")
        got, elapsed = timed(lambda: generate_killing(model, victim["pid"]))
        restarted = host(cluster, "host-0")
        routed = {ep for eps in cluster.backend.table.routes.values() for ep in eps}
    assert got == expected
    assert elapsed < GENERATION_BOUND_S
    assert restarted["pid"] != victim["pid"] and restarted["endpoint"] != victim["endpoint"]
    assert restarted["endpoint"] in routed and victim["endpoint"] not in routed


def test_killing_the_only_host_fails_fast_with_the_expert_named_then_recovers(
        ray_cluster: RayNodes, tiny_checkpoint: Path, expected: list[list[int]]) -> None:
    # A restart budget (0.5 s) shorter than Ray's restart (about 1.5 s): the layer gives up. The
    # controller's probe of a restarting host is kept short too (0.25 s): a probe waits for the
    # host's answer, so a probe longer than the restart would see the restarted host and hide the fault.
    dispatch = DispatchConfig(call_timeout_s=2.0, restart_wait_s=0.5, retry_interval_s=0.1)
    resources = HostResources(num_cpus=1, probe_timeout_s=0.25)
    model, cluster = start(tiny_checkpoint, "unavailable", replicas=1, dispatch=dispatch, resources=resources)
    # Give-up bound: the failed call (call_timeout_s at most), the restart budget, and one last
    # table refresh (a probe, probe_timeout_s) plus a retry interval, with 1.5 s of slack.
    bound_s = dispatch.call_timeout_s + dispatch.restart_wait_s + resources.probe_timeout_s \
        + dispatch.retry_interval_s + 1.5
    with cluster:
        victim = host(cluster, "host-0")
        experts_of_victim = {0, 2}  # round-robin: host-0 serves experts 0 and 2 of every layer
        started = time.monotonic()
        with pytest.raises(ExpertUnavailableError) as failure:
            generate_killing(model, victim["pid"])
        failed_after_s = time.monotonic() - started
        err = failure.value
        assert err.layer in (0, 1) and err.expert in experts_of_victim
        assert str(err) == f"no host of layer {err.layer} expert {err.expert} answered within 0.5 s"

        wait_restarted(cluster, victim)
        retry = engine_for(model)  # a new request on a new engine, the same router and hosts
        got = [c.token_ids for c in retry.generate(PROMPTS, [LONG] * len(PROMPTS))]
    assert got == expected
    # The error came within the bound of the kill (the steps before the kill take well under a second).
    assert failed_after_s < bound_s, (failed_after_s, bound_s)


def test_killing_the_controller_leaves_the_hosts_serving(ray_cluster: RayNodes, tiny_checkpoint: Path,
                                                         expected: list[list[int]]) -> None:
    # Ray restarts the controller (max_restarts=-1); the new one adopts the detached, named hosts and
    # their placement group, and the router's calls made meanwhile are retried.
    model, cluster = start(tiny_checkpoint, "controller", replicas=1, dispatch=DispatchConfig(restart_wait_s=30.0))
    try:
        pid = ray.get(cluster.controller.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)
        os.kill(pid, signal.SIGKILL)
        got, elapsed = timed(lambda: [c.token_ids for c in engine_for(model).generate(PROMPTS, [LONG] * 3)])
        assert got == expected
        assert elapsed < GENERATION_BOUND_S
        new_pid = ray.get(cluster.controller.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)
        assert new_pid != pid  # really restarted, and it answers for its hosts
        assert len(cluster.hosts_info()) == 2
    finally:
        cluster.close()
