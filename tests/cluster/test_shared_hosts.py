"""Several routers on one set of expert hosts, on the session's real Ray cluster.

A router that starts while a controller of its name runs (another router replica, or the controller a
router left running when it died) serves on those hosts instead of failing to start; the hosts stop
with the last router that leaves. Each router here is an `ExpertCluster` with its own engine, in this
process or, for the router that dies, in a process of its own that is SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray

from cluster.deploy import (
    ClusterConfig,
    ClusterStartError,
    ExpertCluster,
    LocalConfig,
    build_engine,
    load_cluster_model,
    load_local_model,
)
from cluster.placement import HostResources
from mixtral.model import Mixtral
from router.engine import EngineConfig
from router.kv_cache import CacheConfig
from router.sampler import SamplingParams
from tests.cluster.conftest import NAMESPACE
from tests.raynodes import RayNodes
from tests.serving import wait_for

pytestmark = pytest.mark.slow

PROMPTS = [[1, 415, 5565, 302, 4843, 349, 5465, 28725, 304, 272, 5565], [1, 22557, 28808], [1, 330, 2033, 349, 264]]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
START_BOUND_S = 180.0  # for a router process to come up: a liveness guard, not a speed claim


def generate(model: Mixtral) -> list[list[int]]:
    engine = build_engine(model, CacheConfig(num_slots=len(PROMPTS), max_seq_len=64), EngineConfig())
    return [c.token_ids for c in engine.generate(PROMPTS, [GREEDY] * len(PROMPTS))]


def config(model_dir: Path, name: str, dtype: str = "float32", lease_s: float = 15.0, hosts: int = 2
           ) -> ClusterConfig:
    return ClusterConfig(model_dir, num_hosts=hosts, dtype=dtype, device="cpu", hosts=HostResources(num_cpus=1),
                         name=f"shared-{name}", namespace=NAMESPACE, router_lease_s=lease_s)


def host_pids(cluster: ExpertCluster) -> set[int]:
    return {int(h["pid"]) for h in cluster.hosts_info()}


def controller_exists(name: str) -> bool:
    try:
        ray.get_actor(f"shared-{name}", namespace=NAMESPACE)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def expected(tiny_checkpoint: Path) -> list[list[int]]:
    return generate(load_local_model(LocalConfig(tiny_checkpoint, dtype="float32", device="cpu")))


def test_a_second_router_serves_on_the_running_hosts_and_the_last_one_stops_them(
        ray_cluster: RayNodes, tiny_checkpoint: Path, expected: list[list[int]]) -> None:
    first_model, first = load_cluster_model(config(tiny_checkpoint, "two"))
    try:
        pids = host_pids(first)
        second_model, second = load_cluster_model(config(tiny_checkpoint, "two"))
    except BaseException:
        first.close()
        raise
    try:
        assert host_pids(second) == pids  # the same host processes: none were started for the second router
        assert generate(first_model) == expected
        assert generate(second_model) == expected

        first.close()
        assert controller_exists("two")  # the second router still holds the hosts
        assert host_pids(second) == pids
        assert generate(second_model) == expected
    finally:
        first.close()
        second.close()
    assert not controller_exists("two")  # the last router stopped the hosts and the controller
    assert_gone(pids)


def router_that_dies(ray_cluster: RayNodes, model_dir: Path, name: str, dtype: str, lease_s: float
                     ) -> tuple[set[int], float]:
    """Start a router in a process of its own and SIGKILL it once it serves: it never leaves, so its hosts
    keep running. Returns the pids of its hosts and when it was killed (time.monotonic())."""
    script = (f"from pathlib import Path\nfrom cluster.deploy import ClusterConfig, ExpertCluster\n"
              f"from cluster.placement import HostResources\nfrom mixtral.config import ModelConfig\n"
              f"cfg = ClusterConfig(Path({str(model_dir)!r}), num_hosts=2, dtype={dtype!r}, device='cpu', "
              f"hosts=HostResources(num_cpus=1), name={'shared-' + name!r}, ray_address={ray_cluster.address!r}, "
              f"namespace={NAMESPACE!r}, router_lease_s={lease_s})\n"
              f"cluster = ExpertCluster(cfg, ModelConfig.from_json(cfg.model_dir / 'config.json'))\n"
              f"print(*sorted(h['pid'] for h in cluster.hosts_info()), flush=True)\n"
              f"import time\ntime.sleep(3600)\n")
    router = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    guard = threading.Timer(START_BOUND_S, router.kill)  # liveness guard: never wait forever for it to start
    guard.start()
    try:
        assert router.stdout is not None
        pids = {int(pid) for pid in router.stdout.readline().split()}  # empty if it did not start
    finally:
        guard.cancel()
        os.kill(router.pid, signal.SIGKILL)
        router.wait()
    assert len(pids) == 2, "the router that dies did not start"
    assert controller_exists(name)  # what a router killed outright leaves behind
    return pids, time.monotonic()


def test_a_router_restarted_after_a_crash_serves_on_the_hosts_the_dead_one_left(
        ray_cluster: RayNodes, tiny_checkpoint: Path, expected: list[list[int]]) -> None:
    lease_s = 2.0
    left, killed_at = router_that_dies(ray_cluster, tiny_checkpoint, "crash", "float32", lease_s)

    model, cluster = load_cluster_model(config(tiny_checkpoint, "crash", lease_s=lease_s))
    try:
        assert host_pids(cluster) == left  # the dead router's hosts, not new ones
        assert generate(model) == expected
        time.sleep(max(0.0, killed_at + lease_s - time.monotonic()))  # the dead router's lease has run out
    finally:
        cluster.close()
    assert not controller_exists("crash")  # so this router, the last with a lease, stopped them
    assert_gone(left)


def test_hosts_a_dead_router_left_for_another_dtype_are_replaced(
        ray_cluster: RayNodes, tiny_checkpoint: Path, expected: list[list[int]]) -> None:
    lease_s = 1.0
    stale, killed_at = router_that_dies(ray_cluster, tiny_checkpoint, "stale", "bfloat16", lease_s)
    time.sleep(max(0.0, killed_at + lease_s - time.monotonic()))

    model, cluster = load_cluster_model(config(tiny_checkpoint, "stale"))
    try:
        assert not host_pids(cluster) & stale  # new hosts, in float32
        assert generate(model) == expected
    finally:
        cluster.close()
    assert not controller_exists("stale")
    assert_gone(stale)


@pytest.mark.parametrize(("change", "named"), [
    ({"dtype": "bfloat16"}, "dtype 'float32', this router 'bfloat16'"),
    ({"hosts": 1}, "a placement plan of 2 hosts, this router's of 1")])
def test_a_router_started_for_other_hosts_is_refused_while_a_router_uses_them(
        ray_cluster: RayNodes, tiny_checkpoint: Path, expected: list[list[int]], change: dict[str, Any],
        named: str) -> None:
    model, cluster = load_cluster_model(config(tiny_checkpoint, "other"))
    try:
        pids = host_pids(cluster)
        with pytest.raises(ClusterStartError) as refused:
            load_cluster_model(config(tiny_checkpoint, "other", **change))
        assert named in str(refused.value)
        assert "a router still uses them" in str(refused.value)
        assert host_pids(cluster) == pids  # the running router's hosts were left alone
        assert generate(model) == expected
    finally:
        cluster.close()
    assert not controller_exists("other")


def test_the_command_line_serves_on_the_hosts_of_the_controller_it_names(
        ray_cluster: RayNodes, tiny_checkpoint: Path, expected: list[list[int]]) -> None:
    # `--controller` and `--namespace` pick the hosts; the command leaves them to the router still using them.
    model, cluster = load_cluster_model(config(tiny_checkpoint, "cli"))
    try:
        pids = host_pids(cluster)
        command = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "generate", "--model", str(tiny_checkpoint), "--token-ids",
             ",".join(map(str, PROMPTS[0])), "--max-new-tokens", str(GREEDY.max_new_tokens), "--temperature", "0",
             "--ignore-eos", "--dtype", "float32", "--json", "--backend", "cluster", "--ray-address",
             ray_cluster.address, "--controller", "shared-cli", "--namespace", NAMESPACE],
            cwd=Path(__file__).resolve().parents[2], env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=300)
        assert command.returncode == 0, command.stderr
        assert json.loads(command.stdout)["token_ids"] == expected[0]
        assert host_pids(cluster) == pids  # it started no hosts of its own, and stopped none of these
        assert generate(model) == expected
    finally:
        cluster.close()
    assert not controller_exists("cli")


def assert_gone(pids: set[int], bound_s: float = 30.0) -> None:
    """Every process in `pids` exits within `bound_s` (Ray reaps a killed actor's worker)."""
    wait_for(lambda: not any(map(psutil.pid_exists, pids)), bound_s, f"host processes {sorted(pids)} exit")
