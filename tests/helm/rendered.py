"""Reading rendered manifests, shared by the chart's behaviour tests: fixtures' types, pods, command lines."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.helm.manifests import (
    CHART,
    NAMESPACE,
    RELEASE,
    Manifest,
    all_pods,
    by_kind,
    component_of,
    containers,
    scenario_values,
)

Render = Callable[..., list[Manifest]]
RunHelm = Callable[..., subprocess.CompletedProcess[str]]
ValuesFile = Callable[[dict[str, Any]], str]

# One valid expert group, for values that change a field of it.
GROUP = {"name": "cpu", "replicas": 1, "cpus": 2, "memory": "4Gi"}


def pod_of(manifests: list[Manifest], component: str) -> Manifest:
    found = [pod for _, pod in all_pods(manifests) if component_of(pod) == component]
    assert len(found) == 1, component
    return found[0]


def argv_of(container: Manifest) -> list[str]:
    return [str(a) for a in container.get("command", []) + container.get("args", [])]


def router_argv(manifests: list[Manifest]) -> list[str]:
    pod = pod_of(manifests, "router")
    return argv_of(next(c for c in pod["spec"]["containers"] if c["name"] == "router"))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def moe_cluster_parser() -> Any:
    from cluster.cli import build_parser

    return build_parser()


def parse_moe_cluster(argv: list[str]) -> Any:
    from cluster.cli import UsageError

    assert argv[0] == "moe-cluster", argv
    try:
        return moe_cluster_parser().parse_args(argv[1:])
    except UsageError as err:
        pytest.fail(f"the moe-cluster CLI rejects the rendered command line {argv}: {err}")


def head_address(scenario: str) -> str:
    kuberay = scenario_values(scenario)["ray"]["mode"] == "kuberay"
    host = f"{RELEASE}-moe-cluster-head-svc" if kuberay else f"{RELEASE}-moe-cluster-ray-head"
    return f"{host}.{NAMESPACE}.svc:6379"


def load_health_check() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpc_health_check", CHART / "files" / "grpc_health_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ray_start_argvs(manifests: list[Manifest]) -> list[list[str]]:
    """Every `ray start` the chart runs: standalone commands, the router's sidecar, and KubeRay's
    command as KubeRay builds it from rayStartParams (`--key=value`)."""
    found = []
    for _, pod in all_pods(manifests):
        for container in containers(pod):
            argv = argv_of(container)
            if argv[:2] == ["ray", "start"]:
                found.append(argv)
    for cluster in by_kind(manifests, "RayCluster"):
        groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
        for index, group in enumerate(groups):
            params = group["rayStartParams"]
            argv = ["ray", "start", "--block", "--head" if index == 0 else "--address=head:6379"]
            for key, value in params.items():
                is_flag = key == "disable-usage-stats"
                argv.append(f"--{key}" if is_flag and value == "true" else f"--{key}={value}")
            found.append(argv)
    return found


def rejected(run_helm: RunHelm, values_file: ValuesFile, values: dict[str, Any]) -> str:
    done = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", values_file(values), check=False)
    assert done.returncode != 0, f"helm accepted {values}"
    return str(done.stderr)


def selects(selector: Manifest, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects these labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True
