"""Workloads an operator relies on, read from the rendered manifests: GPUs and node pools, the model
path, names, disruption budgets, autoscaling, monitoring, ports. Each case "sets X when Y is given"."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helm.manifests import (
    CHART,
    NAMESPACE,
    SCENARIO_NAMES,
    Manifest,
    all_pods,
    by_kind,
    component_of,
    containers,
    one,
    scenario_args,
    scenario_values,
)
from tests.helm.rendered import (
    Render,
    RunHelm,
    ValuesFile,
    flag,
    pod_of,
    router_argv,
    selects,
)


def gpu_resources(container: Manifest) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for section in ("requests", "limits"):
        for name, amount in (container.get("resources", {}).get(section) or {}).items():
            if "gpu" in name:
                found[f"{section}.{name}"] = amount
    return found


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_requests_gpus_only_on_expert_worker_pods_when_scenario_is_given(render: Render, scenario: str) -> None:
    groups = {g["name"]: g for g in scenario_values(scenario)["experts"]["groups"]}
    for where, pod in all_pods(render(scenario)):
        for container in containers(pod):
            gpus = gpu_resources(container)
            if component_of(pod) == "ray-worker" and container["name"] == "ray-worker":
                wanted = groups[pod["metadata"]["labels"]["moe-cluster/expert-group"]].get("gpusPerPod", 0)
                expected = {"requests.nvidia.com/gpu": str(wanted), "limits.nvidia.com/gpu": str(wanted)}
                assert gpus == (expected if wanted else {}), f"{where}: {gpus}"
            else:
                assert gpus == {}, f"{where}/{container['name']} requests GPUs: {gpus}"


def test_places_each_gpu_group_on_its_node_pool_when_two_groups_are_given(render: Render) -> None:
    cluster = one(render("kuberay-two-gpu-groups"), "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"a100", "h100"}
    a100, h100 = groups["a100"]["template"]["spec"], groups["h100"]["template"]["spec"]
    assert a100["nodeSelector"] == {"node-pool": "gpu-a100"}
    assert h100["nodeSelector"] == {"node-pool": "gpu-h100"}
    assert a100["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert a100["priorityClassName"] == h100["priorityClassName"] == "moe-experts"
    assert "podAntiAffinity" in h100["affinity"] and "affinity" not in a100
    assert (groups["a100"]["replicas"], groups["a100"]["minReplicas"], groups["a100"]["maxReplicas"]) == (2, 1, 4)
    assert groups["a100"]["rayStartParams"]["num-gpus"] == "2"
    assert groups["h100"]["rayStartParams"]["num-gpus"] == "4"
    limits = a100["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "2", "ephemeral-storage": "50Gi"}
    assert a100["containers"][0]["resources"]["requests"] == limits
    # The head runs no actors and sits on the system pool.
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["nodeSelector"] == {"node-pool": "cpu-system"}


def test_requests_gpus_in_standalone_worker_deployments_when_gpus_per_pod_is_given(
        render: Render, values_file: ValuesFile) -> None:
    path = values_file({"experts": {"hosts": 2, "gpusPerHost": 1, "groups": [
        {"name": "gpu", "replicas": 2, "gpusPerPod": 1, "cpus": 4, "memory": "16Gi"}]}})
    manifests = render("standalone", "-f", path)
    worker = one(manifests, "Deployment", "ray-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert gpu_resources(container) == {"requests.nvidia.com/gpu": "1", "limits.nvidia.com/gpu": "1"}
    assert "--num-gpus=1" in container["command"]


# Model weights


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_passes_the_model_path_to_the_router_and_every_worker_when_scenario_is_given(
        render: Render, scenario: str) -> None:
    values = scenario_values(scenario)
    manifests = render(scenario)
    assert flag(router_argv(manifests), "--model") == f"/models/{values['model']['path']}"
    for where, pod in all_pods(manifests):
        if component_of(pod) not in ("router", "ray-worker"):
            assert "model" not in {v["name"] for v in pod["spec"].get("volumes", [])}, where
            continue
        main = next(c for c in pod["spec"]["containers"] if c["name"] in ("router", "ray-worker"))
        mount = next(m for m in main["volumeMounts"] if m["name"] == "model")
        assert (mount["mountPath"], mount["readOnly"]) == ("/models", True), where
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "model")
        source = values["model"]["source"]
        if source == "pvc":
            assert volume["persistentVolumeClaim"] == {"claimName": values["model"]["pvc"]["claimName"],
                                                       "readOnly": True}
        elif source == "hostPath":
            assert volume["hostPath"] == {"path": values["model"]["hostPath"]["path"], "type": "Directory"}
        else:
            assert "emptyDir" in volume
            copy = next(c for c in pod["spec"]["initContainers"] if c["name"] == "copy-model")
            assert copy["command"] == ["cp", "-R", f"{values['model']['image']['sourceDir']}/.", "/model-copy/"]
            assert {m["name"]: m["mountPath"] for m in copy["volumeMounts"]} == {"model": "/model-copy"}
            assert "weights" in copy["image"]


# Names, PDBs, autoscaling, monitoring


def test_keeps_every_name_and_label_within_63_characters_when_the_release_name_is_long(
        run_helm: RunHelm) -> None:
    import yaml

    release = "r" + "x" * 52  # Helm's longest release name: 53 characters
    text = run_helm("template", release, str(CHART), "--namespace", NAMESPACE, *scenario_args("standalone")).stdout
    for manifest in (m for m in yaml.safe_load_all(text) if m):
        name = manifest["metadata"]["name"]
        assert len(name) <= 63 and not name.endswith("-"), name
        for value in manifest["metadata"]["labels"].values():
            assert len(value) <= 63 and not value.endswith("-"), value
    text = run_helm("template", release, str(CHART), "--namespace", NAMESPACE).stdout
    cluster = next(m for m in yaml.safe_load_all(text) if m and m["kind"] == "RayCluster")
    # KubeRay names the head Service "<cluster>-head-svc" and pods "<cluster>-<group>-worker-<5>".
    assert len(cluster["metadata"]["name"] + "-head-svc") <= 63


@pytest.mark.parametrize("scenario", ["defaults", "standalone", "kuberay-two-gpu-groups"])
def test_guards_router_head_and_each_group_with_a_pdb_when_scenario_is_given(render: Render, scenario: str) -> None:
    manifests = render(scenario)
    pods = all_pods(manifests)
    covered: list[str] = []
    for budget in by_kind(manifests, "PodDisruptionBudget"):
        chosen = [where for where, pod in pods if selects(budget["spec"]["selector"], pod["metadata"]["labels"])]
        assert chosen, budget["metadata"]["name"]
        covered += chosen
    expected = [where for where, pod in pods if component_of(pod) != "helm-test"]
    assert sorted(covered) == sorted(expected)


def test_renders_an_hpa_instead_of_fixed_replicas_when_autoscaling_is_enabled(render: Render) -> None:
    manifests = render("private-registry-digests")
    hpa = one(manifests, "HorizontalPodAutoscaler")
    router = one(manifests, "Deployment", "router")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": router["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 3)
    assert "replicas" not in router["spec"]
    assert by_kind(render("defaults"), "HorizontalPodAutoscaler") == []


@pytest.mark.parametrize("strategy", ["RollingUpdate", "Recreate"])
def test_rolls_the_router_out_by_the_update_strategy_given(render: Render, values_file: ValuesFile,
                                                             strategy: str) -> None:
    # RollingUpdate: new router pods serve on the running expert hosts before the old ones stop.
    # Recreate: the old ones stop first (and the hosts with the last of them), for an upgrade of the hosts.
    router = one(render("defaults", "-f", values_file({"router": {"updateStrategy": strategy}})), "Deployment",
                 "router")
    assert router["spec"]["strategy"] == {"type": strategy}


def test_renders_a_service_monitor_for_the_metrics_port_when_enabled(render: Render) -> None:
    manifests = render("private-registry-digests")
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    service = one(manifests, "Service", "router")
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert by_kind(render("defaults"), "ServiceMonitor") == []


def test_exposes_grpc_and_metrics_ports_on_the_router_service_when_defaults_are_given(render: Render) -> None:
    service = one(render("defaults"), "Service", "router")
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("grpc", 50051, "grpc"), ("metrics", 9090, "metrics")]
    assert service["spec"]["type"] == "ClusterIP"


def test_runs_a_ray_node_sidecar_in_the_router_pod_when_the_router_joins_ray(render: Render) -> None:
    for scenario in ("defaults", "standalone"):
        pod = pod_of(render(scenario), "router")
        assert pod["spec"]["shareProcessNamespace"] is True
        sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == "ray-node")
        assert sidecar["restartPolicy"] == "Always"
        assert "--num-cpus=0" in sidecar["command"] and "--num-gpus=0" in sidecar["command"]
        address = next(a for a in sidecar["command"] if a.startswith("--address="))
        assert address == f"--address={flag(router_argv(render(scenario)), '--ray-address')}"
        # The driver finds the raylet's sockets under Ray's session directory: both share /tmp.
        router = next(c for c in pod["spec"]["containers"] if c["name"] == "router")
        assert {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}["/tmp"] == \
            {m["mountPath"]: m["name"] for m in router["volumeMounts"]}["/tmp"]
