"""Reading rendered manifests: the scenarios, the pods they make, and their containers."""

from __future__ import annotations

from typing import Any

import yaml

from tests.helm import tools

CHART = tools.REPO / "helm" / "moe-cluster"
SCENARIOS = sorted((CHART / "ci").glob("*.yaml"))
# "defaults" renders values.yaml alone; the others add one ci/ file each.
SCENARIO_NAMES = ["defaults"] + [p.stem for p in SCENARIOS]
RELEASE = "moe"
NAMESPACE = "inference"

Manifest = dict[str, Any]


def scenario_args(name: str) -> list[str]:
    return [] if name == "defaults" else ["-f", str(CHART / "ci" / f"{name}.yaml")]


def merged(base: Any, override: Any) -> Any:
    """Helm's merge of values: mappings key by key, anything else (lists included) replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merged(base.get(k), v) for k, v in override.items()}}
    return override


def scenario_values(name: str) -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if name != "defaults":
        values = merged(values, yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text()))
    return dict(values)


# Pods and their specs, wherever a manifest holds them.


def pod_templates(manifest: Manifest) -> list[tuple[str, Manifest]]:
    """(label, pod template {metadata, spec}) of every pod a manifest makes, RayCluster groups included."""
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    if kind == "Pod":
        return [(f"Pod/{name}", manifest)]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(f"{kind}/{name}", manifest["spec"]["template"])]
    if kind == "RayCluster":
        spec = manifest["spec"]
        found = [(f"RayCluster/{name}/head", spec["headGroupSpec"]["template"])]
        found += [(f"RayCluster/{name}/{g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
        return found
    return []


def all_pods(manifests: list[Manifest]) -> list[tuple[str, Manifest]]:
    return [pod for manifest in manifests for pod in pod_templates(manifest)]


def containers(pod: Manifest) -> list[Manifest]:
    spec = pod["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def by_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[Manifest], kind: str, component: str | None = None) -> Manifest:
    found = [m for m in by_kind(manifests, kind)
             if component is None or m["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {[m['metadata']['name'] for m in found]}"
    return found[0]


def component_of(pod: Manifest) -> str:
    return str(pod["metadata"]["labels"]["app.kubernetes.io/component"])
