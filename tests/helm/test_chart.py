"""The chart as Helm and Kubernetes see it: lint, render, schemas of Kubernetes and KubeRay, package."""

from __future__ import annotations

import copy
import re
import subprocess
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm import tools
from tests.helm.manifests import (
    CHART,
    NAMESPACE,
    SCENARIO_NAMES,
    Manifest,
    by_kind,
    scenario_args,
    scenario_values,
)

# Kubernetes versions the manifests must be valid for: the oldest the chart supports and the newest
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Templates that render one object per expert group; every other template renders at most one.
PER_GROUP_TEMPLATES = {"templates/ray/worker-deployment.yaml", "templates/ray/worker-pdb.yaml"}

RunHelm = Callable[..., subprocess.CompletedProcess[str]]
Render = Callable[..., list[Manifest]]


@pytest.fixture(scope="module")
def kubernetes_validate() -> Path:
    return tools.kubernetes_validate()


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_lint_strict_passes_when_scenario_is_given(run_helm: RunHelm, scenario: str) -> None:
    done = run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *scenario_args(scenario))
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_renders_one_object_per_template_file_when_scenario_is_given(run_helm: RunHelm, scenario: str) -> None:
    text = run_helm("template", "moe", str(CHART), "--namespace", NAMESPACE, *scenario_args(scenario)).stdout
    sources = Counter(re.findall(r"^# Source: moe-cluster/(\S+)$", text, flags=re.MULTILINE))
    groups = len(scenario_values(scenario)["experts"]["groups"])
    for source, count in sources.items():
        assert count == (groups if source in PER_GROUP_TEMPLATES else 1), f"{source} renders {count} objects"
    assert sources, "nothing rendered"


def _validate(kubernetes_validate: Path, path: Path, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(kubernetes_validate), "--strict", "--kubernetes-version", version, str(path)],
                          capture_output=True, text=True, timeout=120)


def as_deployments(manifests: list[Manifest]) -> list[Manifest]:
    """Each RayCluster group's pod template as a Deployment (the kind checkov and the schemas know);
    the template's annotations (checkov skips among them) go on the Deployment."""
    out: list[Manifest] = []
    for manifest in manifests:
        if manifest["kind"] != "RayCluster":
            out.append(manifest)
            continue
        spec = manifest["spec"]
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for name, group in groups:
            template = copy.deepcopy(group["template"])
            labels = template["metadata"]["labels"]
            out.append({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": f"{manifest['metadata']['name']}-{name}",
                             "namespace": manifest["metadata"]["namespace"], "labels": labels,
                             "annotations": template["metadata"].get("annotations", {})},
                "spec": {"replicas": group.get("replicas", 1), "selector": {"matchLabels": labels},
                         "template": template},
            })
    return out


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_every_manifest_validates_against_kubernetes_schemas_when_scenario_is_given(
        render: Render, kubernetes_validate: Path, tmp_path: Path, scenario: str, version: str) -> None:
    manifests = as_deployments(render(scenario))
    # The ServiceMonitor is a CRD of the Prometheus operator: kubernetes-validate has no schema for it.
    known = [m for m in manifests if m["apiVersion"] != "monitoring.coreos.com/v1"]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(known, sort_keys=False))
    done = _validate(kubernetes_validate, path, version)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARN" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_kubernetes_validate_rejects_a_misspelt_field_when_strict(
        render: Render, kubernetes_validate: Path, tmp_path: Path) -> None:
    # The validator must be able to fail, or its passes above mean nothing.
    router = copy.deepcopy(next(m for m in render("defaults") if m["kind"] == "Deployment"))
    router["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(router))
    done = _validate(kubernetes_validate, path, KUBERNETES_VERSIONS[0])
    assert done.returncode != 0
    assert "securityContxt" in done.stdout + done.stderr


# KubeRay's RayCluster (ray.io/v1): the structure its CRD requires, checked field by field.

def _check_int32(where: str, value: Any, errors: list[str]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
        errors.append(f"{where}: {value!r} is not an int32 >= 0")


def _check_pod_template(where: str, template: Any, errors: list[str]) -> None:
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        errors.append(f"{where}.template: a pod template with a spec is required")
        return
    containers = template["spec"].get("containers")
    if not isinstance(containers, list) or not containers:
        errors.append(f"{where}.template.spec.containers: at least one container is required")
        return
    for index, container in enumerate(containers):
        if not container.get("name") or not container.get("image"):
            errors.append(f"{where}.template.spec.containers[{index}]: name and image are required")


def _check_ray_start_params(where: str, params: Any, errors: list[str]) -> None:
    if params is None:
        return
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        errors.append(f"{where}.rayStartParams: a map of strings is required, got {params!r}")


def raycluster_errors(cluster: Manifest) -> list[str]:
    """What the ray.io/v1 RayCluster CRD would reject (its required fields and their types)."""
    errors: list[str] = []
    if cluster.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion {cluster.get('apiVersion')!r} is not ray.io/v1")
    spec = cluster.get("spec") or {}
    allowed = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
               "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
               "upgradeStrategy", "workerGroupSpecs"}
    errors += [f"spec.{key}: not a RayCluster field" for key in set(spec) - allowed]
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        errors.append("spec.headGroupSpec is required")
    else:
        errors += [f"spec.headGroupSpec.{k}: not a head group field" for k in
                   set(head) - {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}]
        _check_ray_start_params("spec.headGroupSpec", head.get("rayStartParams"), errors)
        _check_pod_template("spec.headGroupSpec", head.get("template"), errors)
    names = []
    for index, group in enumerate(spec.get("workerGroupSpecs") or []):
        where = f"spec.workerGroupSpecs[{index}]"
        errors += [f"{where}.{k}: not a worker group field" for k in set(group) - {
            "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "scaleStrategy",
            "numOfHosts", "suspend", "idleTimeoutSeconds"}]
        for key in ("groupName", "minReplicas", "maxReplicas", "template"):
            if key not in group:
                errors.append(f"{where}.{key} is required")
        names.append(group.get("groupName"))
        for key in ("replicas", "minReplicas", "maxReplicas"):
            if key in group:
                _check_int32(f"{where}.{key}", group[key], errors)
        if all(isinstance(group.get(k), int) for k in ("replicas", "minReplicas", "maxReplicas")) and not (
                group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]):
            errors.append(f"{where}: minReplicas <= replicas <= maxReplicas does not hold")
        _check_ray_start_params(where, group.get("rayStartParams"), errors)
        _check_pod_template(where, group.get("template"), errors)
    if len(names) != len(set(names)):
        errors.append(f"spec.workerGroupSpecs: group names repeat: {names}")
    return errors


KUBERAY_SCENARIOS = [s for s in SCENARIO_NAMES if s != "standalone"]


@pytest.mark.parametrize("scenario", KUBERAY_SCENARIOS)
def test_raycluster_has_the_structure_kuberay_requires_when_scenario_is_given(render: Render, scenario: str) -> None:
    clusters = by_kind(render(scenario), "RayCluster")
    assert len(clusters) == 1
    assert raycluster_errors(clusters[0]) == []
    # KubeRay runs the first container as the Ray node and writes its `ray start` itself.
    spec = clusters[0]["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        first = group["template"]["spec"]["containers"][0]
        assert first["name"] in ("ray-head", "ray-worker")
        assert "command" not in first


def test_raycluster_check_finds_errors_when_structure_is_broken(render: Render) -> None:
    cluster = copy.deepcopy(by_kind(render("defaults"), "RayCluster")[0])
    del cluster["spec"]["workerGroupSpecs"][0]["groupName"]
    cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 2
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"] = []
    errors = raycluster_errors(cluster)
    assert any("groupName is required" in e for e in errors)
    assert any("map of strings" in e for e in errors)
    assert any("at least one container" in e for e in errors)


def test_standalone_renders_no_raycluster_when_mode_is_standalone(render: Render) -> None:
    manifests = render("standalone")
    assert by_kind(manifests, "RayCluster") == []
    names = {m["metadata"]["name"] for m in by_kind(manifests, "Deployment")}
    assert names == {"moe-moe-cluster-router", "moe-moe-cluster-ray-head",
                     "moe-moe-cluster-worker-cpu-a", "moe-moe-cluster-worker-cpu-b"}


def test_helm_package_produces_a_chart_archive_when_packaged(run_helm: RunHelm, tmp_path: Path) -> None:
    run_helm("package", str(CHART), "--destination", str(tmp_path))
    archives = list(tmp_path.glob("moe-cluster-*.tgz"))
    assert [a.name for a in archives] == ["moe-cluster-0.1.0.tgz"]
    with tarfile.open(archives[0]) as archive:
        names = set(archive.getnames())
    for needed in ("Chart.yaml", "values.yaml", "values.schema.json", "README.md", "templates/NOTES.txt",
                   "templates/_helpers.tpl", "templates/ray/raycluster.yaml", "files/grpc_health_check.py"):
        assert f"moe-cluster/{needed}" in names
    assert not any("/ci/" in n for n in names), "ci/ scenarios and scripts stay out of the archive"


@pytest.mark.parametrize(("scenario", "service_type", "expected"), [
    ("defaults", "ClusterIP", "port-forward service/moe-moe-cluster-router 50051:50051"),
    ("tls-mtls-token", "LoadBalancer", "status.loadBalancer.ingress"),
])
def test_notes_tell_how_to_reach_the_service_when_installed(
        run_helm: RunHelm, scenario: str, service_type: str, expected: str) -> None:
    done = run_helm("install", "moe", str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                    "--set", f"router.service.type={service_type}", *scenario_args(scenario))
    notes = done.stdout.split("NOTES:", 1)[1]
    assert expected in notes
    assert f"helm test moe -n {NAMESPACE}" in notes
