"""The expert-group scaler's objects: each case "sets X when Y is given", read from rendered manifests,
and the rendered scaler run against the rendered RayCluster (served by tests/kubeapi.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.scaler import raycluster_name
from tests.helm.manifests import (
    CHART,
    NAMESPACE,
    RELEASE,
    SCENARIO_NAMES,
    Manifest,
    all_pods,
    by_kind,
    component_of,
    one,
    scenario_values,
)
from tests.helm.rendered import argv_of, parse_moe_cluster, pod_of, rejected
from tests.kubeapi import FakeApiServer, serving

Render = Callable[..., list[Manifest]]
RunHelm = Callable[..., subprocess.CompletedProcess[str]]
ValuesFile = Callable[[dict[str, Any]], str]
SCENARIO = "kuberay-scaler"
RBAC_KINDS = ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")


def scaler_container(manifests: list[Manifest]) -> Manifest:
    containers: list[Manifest] = pod_of(manifests, "scaler")["spec"]["containers"]
    assert [c["name"] for c in containers] == ["scaler"]
    return containers[0]


def test_allows_only_get_and_patch_of_the_releases_raycluster_when_the_scaler_is_enabled(render: Render) -> None:
    manifests = render(SCENARIO)
    cluster = one(manifests, "RayCluster")
    role = one(manifests, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayclusters"],
                              "resourceNames": [cluster["metadata"]["name"]], "verbs": ["get", "patch"]}]
    assert by_kind(manifests, "ClusterRole") == by_kind(manifests, "ClusterRoleBinding") == []


def test_binds_the_role_to_the_scalers_own_account_only_when_the_scaler_is_enabled(render: Render) -> None:
    manifests = render(SCENARIO)
    role, binding = one(manifests, "Role"), one(manifests, "RoleBinding")
    account = one(manifests, "ServiceAccount", "scaler")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    users = [component_of(pod) for _, pod in all_pods(manifests)
             if pod["spec"]["serviceAccountName"] == account["metadata"]["name"]]
    assert users == ["scaler"]
    assert account["automountServiceAccountToken"] is False


def test_mounts_the_api_token_into_the_scaler_container_alone_when_the_scaler_is_enabled(render: Render) -> None:
    manifests = render(SCENARIO)
    pod = pod_of(manifests, "scaler")
    assert pod["spec"]["automountServiceAccountToken"] is False
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "kube-api-access")
    sources = volume["projected"]["sources"]
    assert sources[0] == {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}
    mounts = {m["mountPath"]: m for m in scaler_container(manifests)["volumeMounts"]}
    # The path the kubernetes client's in-cluster configuration reads token, ca.crt and namespace from.
    assert mounts["/var/run/secrets/kubernetes.io/serviceaccount"]["readOnly"] is True
    for where, other in all_pods(manifests):
        if component_of(other) != "scaler":
            assert not any("projected" in v for v in other["spec"].get("volumes", [])), where


def test_scaler_command_line_parses_with_the_real_cli_when_the_scaler_is_enabled(render: Render) -> None:
    manifests = render(SCENARIO)
    values = scenario_values(SCENARIO)["scaler"]
    container = scaler_container(manifests)
    args = parse_moe_cluster(argv_of(container))
    cluster = one(manifests, "RayCluster")
    assert args.command == "scale"
    assert (args.raycluster, args.namespace, args.in_cluster) == (cluster["metadata"]["name"], NAMESPACE, True)
    assert (args.interval, args.cooldown) == (values["intervalSeconds"], values["cooldownSeconds"])
    assert args.group == [(g["name"], g["replicas"]) for g in values["groups"]]
    assert args.max == [("a100", 4)] and args.min == [("h100", 1)]
    assert {name for name, _ in args.group} <= {g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]}
    # The probes read the heartbeat the loop touches.
    probe = " ".join(container["livenessProbe"]["exec"]["command"])
    assert str(args.heartbeat) in probe and container["readinessProbe"] == {
        **container["readinessProbe"], "exec": container["livenessProbe"]["exec"]}


def test_denies_every_inbound_connection_to_the_scaler_when_network_policy_is_on(render: Render) -> None:
    policy = one(render(SCENARIO), "NetworkPolicy", "scaler")
    assert policy["spec"]["policyTypes"] == ["Ingress"] and policy["spec"]["ingress"] == []
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "scaler"


@pytest.mark.parametrize("scenario", [s for s in SCENARIO_NAMES if s != SCENARIO])
def test_renders_no_scaler_and_no_rbac_when_the_scaler_is_off(render: Render, scenario: str) -> None:
    manifests = render(scenario)
    assert [m["kind"] for m in manifests if m["kind"] in RBAC_KINDS] == []
    assert [m["metadata"]["name"] for m in manifests
            if m["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "scaler"] == []


@pytest.mark.parametrize("release", ["moe", "moe-cluster-prod", "team-a-" + "y" * 30, "t" * 39, "r" + "x" * 52])
def test_the_scalers_default_name_matches_the_charts_raycluster_when_a_release_name_is_given(
        run_helm: RunHelm, release: str) -> None:
    text = run_helm("template", release, str(CHART), "--namespace", NAMESPACE,
                    "--show-only", "templates/ray/raycluster.yaml").stdout
    assert raycluster_name(release) == yaml.safe_load(text)["metadata"]["name"]


GROUPS = [{"name": "a100", "replicas": 2}]


@pytest.mark.parametrize(("values", "message"), [
    ({"ray": {"mode": "standalone"}, "scaler": {"enabled": True, "groups": [{"name": "cpu", "replicas": 2}]}},
     'scaler.enabled needs ray.mode=kuberay (got "standalone")'),
    ({"scaler": {"enabled": True}}, "scaler.groups is empty"),
    ({"scaler": {"enabled": True, "groups": GROUPS}}, 'scaler.groups[0].name="a100" is not a group of experts.groups'),
    ({"scaler": {"enabled": True, "groups": [{"name": "cpu", "replicas": 1}] * 2}},
     'scaler.groups[1].name="cpu" is used twice'),
    ({"scaler": {"enabled": True, "groups": [{"name": "cpu", "replicas": 1, "minReplicas": 3, "maxReplicas": 2}]}},
     "scaler.groups[0].minReplicas=3 is more than its maxReplicas=2"),
])
def test_fails_naming_key_and_value_when_scaler_values_contradict(
        run_helm: RunHelm, values_file: ValuesFile, values: dict[str, Any], message: str) -> None:
    assert message in rejected(run_helm, values_file, values)


@pytest.mark.parametrize(("values", "key"), [
    ({"scaler": {"groups": [{"name": "cpu", "replicas": -1}]}}, "/scaler/groups/0/replicas"),
    ({"scaler": {"intervalSeconds": 0}}, "/scaler/intervalSeconds"),
    ({"scaler": {"groups": [{"name": "cpu"}]}}, "/scaler/groups/0"),
    ({"scaler": {"enable": True}}, "/scaler"),
])
def test_schema_rejects_a_wrong_scaler_value_naming_the_key_when_it_is_given(
        run_helm: RunHelm, values_file: ValuesFile, values: dict[str, Any], key: str) -> None:
    message = rejected(run_helm, values_file, values)
    assert f"at '{key}'" in message, message


def test_rendered_scaler_patches_only_its_groups_replicas_when_run_against_the_rendered_raycluster(
        render: Render, tmp_path: Path) -> None:
    from cluster.cli import main

    manifests = render(SCENARIO)
    cluster = dict(one(manifests, "RayCluster"), metadata={**one(manifests, "RayCluster")["metadata"],
                                                           "resourceVersion": "7"})
    name = cluster["metadata"]["name"]
    api = FakeApiServer(cluster, f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters/{name}")
    argv = argv_of(scaler_container(manifests))[1:]
    # One round from a workstation instead of the pod's loop with its service account.
    for flag, takes_value in (("--in-cluster", False), ("--interval", True), ("--heartbeat", True)):
        at = argv.index(flag)
        del argv[at:at + 1 + takes_value]
    with serving(api) as url:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": url}}], "users": [{"name": "u", "user": {}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        assert main([*argv, "--kubeconfig", str(kubeconfig)]) == 0
    [patch] = api.patches()
    assert patch.body == [{"op": "replace", "path": "/metadata/resourceVersion", "value": "7"},
                          {"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "a100"},
                          {"op": "replace", "path": "/spec/workerGroupSpecs/0/replicas", "value": 3}]
    assert [g["replicas"] for g in api.object["spec"]["workerGroupSpecs"]] == [3, 1]
    assert RELEASE in name
