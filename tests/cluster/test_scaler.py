"""The scaler through the real `kubernetes` client against a local HTTP stand-in for the API server
(tests/kubeapi.py) that serves one RayCluster, checks resourceVersions as the API server does and
records every request; and the standalone-Ray mode against a real Ray cluster.

Not covered here: a real API server and KubeRay acting on the new replicas (see the README's
"Scaling on Kubernetes" for trying it on kind).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.capacity import CapacityConfig, plan_capacity
from cluster.cli import build_parser, main
from cluster.load import ExpertLoad
from cluster.scale_command import kube_api, scale_target
from cluster.scaler import (
    HOSTS,
    Bounds,
    LoopConfig,
    Outcome,
    RayClusterScaler,
    RayResourceRequest,
    ScaleError,
    ScaleLoop,
    ScalerConfig,
    pods_for_hosts,
    raycluster_name,
    static_target,
)
from tests.kubeapi import FakeApiServer, serving

NAMESPACE = "inference"
NAME = "moe-moe-cluster"  # the chart's RayCluster of release "moe"
PATH = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters/{NAME}"
TOKEN = "scaler-test-token"


def worker_group(name: str, replicas: int, low: int, high: int, cpus: int, gpus: int) -> dict[str, Any]:
    return {"groupName": name, "replicas": replicas, "minReplicas": low, "maxReplicas": high,
            "rayStartParams": {"num-cpus": str(cpus), "num-gpus": str(gpus)},
            "template": {"spec": {"containers": [{"name": "ray-worker", "image": "moe-cluster:0.1.0"}]}}}


RAYCLUSTER = {
    "apiVersion": "ray.io/v1", "kind": "RayCluster",
    "metadata": {"name": NAME, "namespace": NAMESPACE, "resourceVersion": "100", "uid": "0b5e"},
    "spec": {"rayVersion": "2.60.0", "enableInTreeAutoscaling": False,
             "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {"containers": []}}},
             "workerGroupSpecs": [worker_group("cpu", 1, 1, 1, 2, 0), worker_group("a100", 2, 1, 4, 16, 2),
                                  worker_group("h100", 1, 0, 3, 32, 4)]},
}


def replicas_of(obj: dict[str, Any]) -> dict[str, int]:
    return {g["groupName"]: g["replicas"] for g in obj["spec"]["workerGroupSpecs"]}


def without_replicas(obj: dict[str, Any]) -> dict[str, Any]:
    """The object less what a scale may change: every group's replicas and the resourceVersion."""
    rest = copy.deepcopy(obj)
    del rest["metadata"]["resourceVersion"]
    for group in rest["spec"]["workerGroupSpecs"]:
        del group["replicas"]
    return rest


@pytest.fixture
def api() -> FakeApiServer:
    return FakeApiServer(RAYCLUSTER, PATH)


@pytest.fixture
def url(api: FakeApiServer) -> Iterator[str]:
    with serving(api) as address:
        yield address


@pytest.fixture
def kubeconfig(url: str, tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": url}}],
        "users": [{"name": "scaler", "user": {"token": TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "scaler"}}]}))
    return path


def scale(kubeconfig: Path, *args: str) -> list[str]:
    return ["scale", "--release", "moe", "--namespace", NAMESPACE, "--kubeconfig", str(kubeconfig), *args]


def scaler(kubeconfig: Path, sleeps: list[float], **cfg: Any) -> RayClusterScaler:
    return RayClusterScaler(kube_api(kubeconfig, None, False), ScalerConfig(NAMESPACE, NAME, **cfg), sleeps.append)


# One scale through the command line


def test_patches_only_the_named_groups_replicas_with_the_resource_version_read(
        api: FakeApiServer, kubeconfig: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(scale(kubeconfig, "--group", "a100=3", "--group", "h100=2")) == 0
    assert [(r.method, r.path.split("?")[0]) for r in api.requests] == [("GET", PATH), ("PATCH", PATH)]
    patch = api.patches()[0]
    assert patch.content_type == "application/json-patch+json"
    assert patch.authorization == f"Bearer {TOKEN}"
    assert patch.body == [
        {"op": "replace", "path": "/metadata/resourceVersion", "value": "100"},
        {"op": "test", "path": "/spec/workerGroupSpecs/1/groupName", "value": "a100"},
        {"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 3},
        {"op": "test", "path": "/spec/workerGroupSpecs/2/groupName", "value": "h100"},
        {"op": "replace", "path": "/spec/workerGroupSpecs/2/replicas", "value": 2},
    ]
    assert replicas_of(api.object) == {"cpu": 1, "a100": 3, "h100": 2}
    assert without_replicas(api.object) == without_replicas(RAYCLUSTER)
    assert capsys.readouterr().out.splitlines() == ["a100: 2 -> 3", "h100: 1 -> 2"]


def test_dry_run_prints_the_patch_and_sends_no_write(
        api: FakeApiServer, kubeconfig: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(scale(kubeconfig, "--group", "a100=4", "--dry-run")) == 0
    assert [r.method for r in api.requests] == ["GET"]
    assert api.object == RAYCLUSTER
    printed = json.loads(capsys.readouterr().out)
    assert printed[0] == {"op": "replace", "path": "/metadata/resourceVersion", "value": "100"}
    assert printed[2] == {"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 4}


def test_sends_no_patch_when_the_replicas_are_already_there(
        api: FakeApiServer, kubeconfig: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(scale(kubeconfig, "--group", "a100=2")) == 0
    assert [r.method for r in api.requests] == ["GET"]
    assert capsys.readouterr().out.strip() == "no change"


@pytest.mark.parametrize(("args", "expected"), [
    (["--group", "a100=9"], 4),  # the RayCluster's maxReplicas
    (["--group", "a100=9", "--max", "a100=3"], 3),  # the scaler's own max
    (["--group", "a100=0"], 1),  # the RayCluster's minReplicas
    (["--group", "a100=1", "--min", "a100=2"], 2),  # the scaler's own min: no change from 2
])
def test_keeps_replicas_within_the_group_and_scaler_bounds(
        api: FakeApiServer, kubeconfig: Path, args: list[str], expected: int) -> None:
    assert main(scale(kubeconfig, *args)) == 0
    assert replicas_of(api.object)["a100"] == expected


def test_turns_expert_hosts_into_pods_of_the_group_when_hosts_are_given(api: FakeApiServer, kubeconfig: Path) -> None:
    # a100 pods have 16 CPUs and 2 GPUs: hosts of 1 CPU and 1 GPU fit 2 per pod; 5 hosts need 3 pods.
    assert main(scale(kubeconfig, "--hosts", "5", "--hosts-group", "a100", "--gpus-per-host", "1")) == 0
    assert replicas_of(api.object) == {"cpu": 1, "a100": 3, "h100": 1}


# From the capacity model


def write_load(path: Path, first_layer_rows: list[float]) -> int:
    """A 2-layer, 4-expert load file; returns the hosts the capacity model asks for it at 1000 tokens/s."""
    load = ExpertLoad((tuple(first_layer_rows),) * 2, tokens=200, experts_per_token=2)
    load.save(path)
    return plan_capacity(load.rows, load.token_count(), CapacityConfig(1000.0, HOST_ROWS_PER_S)).num_hosts


HOST_ROWS_PER_S = 1000.0


def capacity_args(tmp_path: Path, load: Path) -> list[str]:
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"host_rows_per_s": HOST_ROWS_PER_S}))
    return ["--from-capacity", str(load), "--measured", str(measured), "--target-tokens-per-s", "1000",
            "--hosts-group", "a100", "--gpus-per-host", "1"]


def test_scales_to_the_hosts_the_capacity_model_asks_when_from_capacity_is_given(
        api: FakeApiServer, kubeconfig: Path, tmp_path: Path) -> None:
    load = tmp_path / "load.json"
    hosts = write_load(load, [340, 20, 20, 20])
    assert main(scale(kubeconfig, *capacity_args(tmp_path, load))) == 0
    # a100 pods hold 2 hosts of 1 GPU each.
    assert replicas_of(api.object)["a100"] == pods_for_hosts(hosts, RAYCLUSTER["spec"]["workerGroupSpecs"][1], 1, 1)
    assert replicas_of(api.object)["a100"] == 3


def test_loop_follows_the_load_file_as_it_is_rewritten(api: FakeApiServer, kubeconfig: Path, tmp_path: Path) -> None:
    load = tmp_path / "load.json"
    uniform, skewed = write_load(load, [100, 100, 100, 100]), write_load(tmp_path / "other.json", [340, 20, 20, 20])
    assert (math.ceil(uniform / 2), math.ceil(skewed / 2)) == (2, 3)  # a100 pods for each load
    args = build_parser().parse_args(scale(kubeconfig, *capacity_args(tmp_path, load)))
    clock, pods = FakeClock(), []

    def round_then_rewrite(outcome: Outcome) -> None:
        pods.append(replicas_of(api.object)["a100"])
        write_load(load, [340, 20, 20, 20])  # the next round reads a hotter expert 0

    loop = ScaleLoop(RayClusterScaler(kube_api(kubeconfig, None, False), ScalerConfig(NAMESPACE, NAME)).apply,
                     scale_target(args), LoopConfig(interval_s=60, cooldown_s=0), round_then_rewrite, clock,
                     clock.sleep)
    loop.run(rounds=2)
    assert pods == [2, 3]


def test_fails_the_round_naming_the_capacity_model_when_no_host_count_reaches_the_target(
        api: FakeApiServer, kubeconfig: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load = tmp_path / "load.json"
    write_load(load, [100, 100, 100, 100])
    args = capacity_args(tmp_path, load)
    args[args.index("--target-tokens-per-s") + 1] = "1e9"
    assert main(scale(kubeconfig, *args)) == 1
    assert "capacity model: 256 hosts" in capsys.readouterr().err
    assert api.patches() == []


# Conflicts


def test_reads_again_and_retries_when_the_patch_meets_409_conflict(api: FakeApiServer, kubeconfig: Path) -> None:
    def concurrent_writer(server: FakeApiServer) -> None:
        if len(server.patches()) == 1:  # another client scales h100 between our GET and PATCH
            server.write(lambda obj: obj["spec"]["workerGroupSpecs"][2].update(replicas=3))

    api.on_patch = concurrent_writer
    sleeps: list[float] = []
    outcome = scaler(kubeconfig, sleeps).apply(static_target({"a100": 3}))
    assert [r.method for r in api.requests] == ["GET", "PATCH", "GET", "PATCH"]
    assert [p.body[0]["value"] for p in api.patches()] == ["100", "101"]
    assert outcome == Outcome({"a100": (2, 3)}, api.patches()[1].body, sent=True)
    # Both writes survive: ours on top of the other client's.
    assert replicas_of(api.object) == {"cpu": 1, "a100": 3, "h100": 3}
    assert api.object["metadata"]["resourceVersion"] == "102"
    assert sleeps == [0.5]


def test_gives_up_after_max_attempts_when_every_patch_conflicts(api: FakeApiServer, kubeconfig: Path) -> None:
    api.on_patch = lambda server: server.write(lambda obj: None)
    sleeps: list[float] = []
    with pytest.raises(ScaleError, match=r"changed under every one of 4 patches \(409 Conflict"):
        scaler(kubeconfig, sleeps, max_attempts=4, backoff_s=0.25).apply(static_target({"a100": 3}))
    assert len(api.patches()) == 4
    assert sleeps == [0.25, 0.5, 1.0]
    assert replicas_of(api.object)["a100"] == 2


def test_fails_with_exit_code_1_when_conflicts_outlast_the_attempts(
        api: FakeApiServer, kubeconfig: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api.on_patch = lambda server: server.write(lambda obj: None)
    assert main(scale(kubeconfig, "--group", "a100=3", "--max-attempts", "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "409 Conflict" in err[0]


# Bad input and refusals: one line on stderr


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--group", "a100"], 2, "'a100' is not NAME=COUNT"),
    (["--group", "a100=-1"], 2, "-1 must be at least 0"),
    (["--group", "v100=2"], 2, "has no worker group 'v100'; its groups: ['a100', 'cpu', 'h100']"),
    ([], 2, "nothing to scale"),
    (["--hosts", "4"], 2, "--hosts-group goes with --hosts or --from-capacity"),
    (["--from-capacity", "load.json", "--hosts-group", "a100"], 2, "needs --target-tokens-per-s and --measured"),
    (["--group", "a100=2", "--measured", "m.json"], 2, "--target-tokens-per-s and --measured go with"),
    (["--from-capacity", "none.json", "--target-tokens-per-s", "5", "--measured", "m.json", "--hosts-group", "a"],
     2, "none.json: no such file"),
    (["--hosts", "4", "--from-capacity", "load.json"], 2, "not allowed with argument --hosts"),
    (["--group", "a100=2", "--min", "a100=3", "--max", "a100=2"], 2, "max replicas=2 is less than min replicas=3"),
    (["--group", "cpu=2", "--min", "cpu=2"], 2, "no replica count fits min 2 and max 1"),
])
def test_rejects_bad_input_with_one_line_and_exit_code_2(
        api: FakeApiServer, kubeconfig: Path, capsys: pytest.CaptureFixture[str],
        args: list[str], code: int, message: str) -> None:
    assert main(scale(kubeconfig, *args)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert api.patches() == []


def test_names_the_missing_raycluster_when_the_release_is_wrong(
        api: FakeApiServer, kubeconfig: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = scale(kubeconfig, "--group", "a100=3")
    argv[argv.index("moe")] = "other"
    assert main(argv) == 2
    assert "RayCluster inference/other-moe-cluster not found" in capsys.readouterr().err


def test_points_at_the_role_when_the_api_server_forbids(
        api: FakeApiServer, kubeconfig: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api.forbid = True
    assert main(scale(kubeconfig, "--group", "a100=3")) == 1
    err = capsys.readouterr().err
    assert "403 Forbidden" in err and "needs a Role allowing get and patch on that RayCluster" in err


def test_refuses_a_missing_namespace_and_a_missing_kubeconfig(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scale", "--release", "moe", "--group", "a100=3"]) == 2
    assert "--namespace is required" in capsys.readouterr().err
    argv = ["scale", "--release", "moe", "--namespace", "x", "--kubeconfig", str(tmp_path / "none"), "--group", "a=1"]
    assert main(argv) == 2
    assert "cannot load the Kubernetes configuration" in capsys.readouterr().err


# The loop


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_loop_follows_the_target_but_holds_a_group_for_the_cooldown(api: FakeApiServer, kubeconfig: Path) -> None:
    # The live target, read once per round (every 60 s): up, down at once (held), down after the cool-down.
    wanted = iter([3, 1, 1, 1, 1, 4])
    clock, reports = FakeClock(), []
    loop = ScaleLoop(scaler(kubeconfig, []).apply, lambda groups: {"a100": next(wanted)},
                     LoopConfig(interval_s=60, cooldown_s=150), reports.append, clock=clock, sleep=clock.sleep)
    seen = []
    for _ in range(6):
        loop.round()
        seen.append((clock.now, replicas_of(api.object)["a100"]))
        clock.sleep(60)
    # t=0: 3. t=60, 120: held (changed at 0, cool-down 150 s). t=180: 1. t=300: 4 is held until t=330.
    assert seen == [(0, 3), (60, 3), (120, 3), (180, 1), (240, 1), (300, 1)]
    assert [r.changes for r in reports] == [{"a100": (2, 3)}, {}, {}, {"a100": (3, 1)}, {}, {}]
    assert len(api.patches()) == 2


def test_loop_logs_a_failed_round_touches_the_heartbeat_and_goes_on(
        api: FakeApiServer, kubeconfig: Path, tmp_path: Path) -> None:
    api.forbid = True
    clock, heartbeat = FakeClock(), tmp_path / "alive"
    loop = ScaleLoop(scaler(kubeconfig, []).apply, static_target({"a100": 3}),
                     LoopConfig(interval_s=30, heartbeat=heartbeat), lambda outcome: None, clock, clock.sleep)
    loop.run(rounds=3)
    assert len(api.requests) == 3 and clock.now == 60
    assert heartbeat.exists()


# Pure pieces


@pytest.mark.parametrize(("release", "expected"), [
    ("moe", "moe-moe-cluster"),
    ("moe-cluster-prod", "moe-cluster-prod"),
    ("r" + "x" * 52, "r" + "x" * 39),
    ("team-a-" + "y" * 30, "team-a-" + "y" * 30 + "-mo"),  # 49 characters cut to 40
    ("t" * 39, "t" * 39),  # cut to 40 ends in "-", which goes
])
def test_names_the_raycluster_as_the_chart_does(release: str, expected: str) -> None:
    assert raycluster_name(release) == expected


def test_fits_hosts_into_pods_by_the_groups_ray_resources() -> None:
    group = worker_group("a100", 1, 0, 9, 16, 2)
    assert pods_for_hosts(5, group, cpus_per_host=1, gpus_per_host=1) == 3
    assert pods_for_hosts(5, group, cpus_per_host=1, gpus_per_host=0.5) == 2
    assert pods_for_hosts(0, group, cpus_per_host=4, gpus_per_host=0) == 0
    with pytest.raises(ValueError, match="cannot hold one host"):
        pods_for_hosts(1, group, cpus_per_host=1, gpus_per_host=4)


def test_bounds_reject_max_below_min() -> None:
    with pytest.raises(ValueError, match="max replicas=1 is less than min replicas=2"):
        Bounds(2, 1)


# Standalone Ray: the autoscaler request


def test_requests_one_bundle_per_host_and_holds_it_for_the_cooldown() -> None:
    sent: list[list[dict[str, float]]] = []
    request = RayResourceRequest(cpus_per_host=2, gpus_per_host=1, request=lambda bundles: sent.append(bundles))
    hosts = iter([3, 1, 1])
    clock = FakeClock()
    loop = ScaleLoop(request.apply, lambda groups: {HOSTS: next(hosts)}, LoopConfig(interval_s=60, cooldown_s=100),
                     lambda outcome: None, clock, clock.sleep)
    loop.run(rounds=3)
    assert sent == [[{"CPU": 2, "GPU": 1}] * 3, [{"CPU": 2, "GPU": 1}] * 3, [{"CPU": 2, "GPU": 1}]]


def test_asks_ray_for_the_hosts_the_capacity_model_asks_when_from_capacity_is_given(tmp_path: Path) -> None:
    load = tmp_path / "load.json"
    hosts = write_load(load, [340, 20, 20, 20])
    args = capacity_args(tmp_path, load)
    del args[args.index("--hosts-group"):args.index("--hosts-group") + 2]
    target = scale_target(build_parser().parse_args(["scale", "--ray-address", "head:6379", *args]))
    assert target({}) == {HOSTS: hosts}


@pytest.mark.slow
def test_asks_the_ray_autoscaler_of_a_real_cluster_for_the_hosts_bundles(
        ray_cluster: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.sdk import request_resources
    from ray.experimental.internal_kv import _internal_kv_get

    argv = ["scale", "--ray-address", ray_cluster.address, "--hosts", "3", "--cpus-per-host", "2",
            "--gpus-per-host", "1"]
    try:
        assert main([*argv, "--dry-run"]) == 0
        assert json.loads(capsys.readouterr().out) == [{"bundles": [{"CPU": 2.0, "GPU": 1.0}] * 3}]
        assert _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) in (None, b"[]")  # nothing asked yet
        assert main(argv) == 0
        # Where a v1 autoscaler (the one `ray up` runs) reads standing requests.
        stored = json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL))
        assert stored == [{"CPU": 2.0, "GPU": 1.0}] * 3
    finally:
        request_resources(bundles=[])
