"""Security an operator relies on, read from the rendered manifests: pod security, images, network
policy, secrets and authentication. Each case "sets X when Y is given"."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helm.manifests import (
    SCENARIO_NAMES,
    Manifest,
    all_pods,
    by_kind,
    component_of,
    containers,
    one,
    scenario_values,
)
from tests.helm.rendered import (
    Render,
    ValuesFile,
    flag,
    parse_moe_cluster,
    pod_of,
    router_argv,
    selects,
)

# Volume types Pod Security "restricted" allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def volume_type(volume: Manifest) -> str:
    return next(k for k in volume if k != "name")


# Pod Security


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_sets_restricted_pod_security_on_every_pod_when_scenario_is_given(render: Render, scenario: str) -> None:
    pods = all_pods(render(scenario))
    assert {component_of(pod) for _, pod in pods} >= {"router", "ray-head", "ray-worker", "helm-test"}
    for where, pod in pods:
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for host_key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host_key), f"{where}: {host_key}"
        for volume in spec.get("volumes", []):
            kind = volume_type(volume)
            if kind == "hostPath":
                # Only the model directory, read-only, and only when model.source=hostPath asks for it.
                assert scenario == "model-hostpath" and volume["name"] == "model", where
            else:
                assert kind in RESTRICTED_VOLUMES, f"{where}: volume {volume}"
        for container in containers(pod):
            context = container["securityContext"]
            name = f"{where}/{container['name']}"
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["privileged"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["runAsNonRoot"] is True, name
            assert context.get("runAsUser", 1) != 0, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert not any("hostPort" in port for port in container.get("ports", [])), name
            assert container["resources"]["limits"]["memory"], name
            # The root filesystem is read-only: HOME, TMPDIR and Ray's files live on the /tmp emptyDir.
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            if container["name"] != "copy-model":
                scratch = mounts.get("/tmp")
                assert scratch is not None, f"{name}: no writable /tmp"
                assert volume_type(next(v for v in spec["volumes"] if v["name"] == scratch)) == "emptyDir"


def test_sets_the_uid_given_when_security_context_is_overridden(render: Render, values_file: ValuesFile) -> None:
    path = values_file({"global": {"securityContext": {"runAsUser": 20000, "runAsGroup": 20000, "fsGroup": 20000}}})
    for where, pod in all_pods(render("defaults", "-f", path)):
        assert pod["spec"]["securityContext"]["runAsUser"] == 20000, where
        assert all(c["securityContext"]["runAsUser"] == 20000 for c in containers(pod)), where


# Images


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_puts_every_image_under_global_image_registry_when_a_registry_is_given(
        render: Render, values_file: ValuesFile, scenario: str) -> None:
    registry = "registry.test.internal:5000/mirror"
    path = values_file({"global": {"imageRegistry": registry, "imagePullSecrets": ["pull-a", "pull-b"]}})
    for where, pod in all_pods(render(scenario, "-f", path)):
        assert pod["spec"]["imagePullSecrets"] == [{"name": "pull-a"}, {"name": "pull-b"}], where
        for container in containers(pod):
            assert container["image"].startswith(registry + "/"), f"{where}/{container['name']}: {container['image']}"


def test_pins_every_image_by_digest_when_digests_are_given(render: Render) -> None:
    values = scenario_values("private-registry-digests")
    pods = all_pods(render("private-registry-digests"))
    images = {c["image"]: c["imagePullPolicy"] for _, pod in pods for c in containers(pod)}
    assert set(images) == {
        f"registry.corp.internal:5000/ml/moe-cluster:0.1.0-cuda12.8@{values['image']['digest']}",
        f"registry.corp.internal:5000/ml/weights/mixtral-8x7b-instruct:v0.1@{values['model']['image']['digest']}",
    }
    assert set(images.values()) == {"IfNotPresent"}
    # Nothing left to excuse: the checkov skip for missing digests is gone.
    annotations = [pod["metadata"].get("annotations", {}) for _, pod in pods]
    assert not any("CKV_K8S_43" in str(a) for a in annotations)


def test_pulls_always_when_an_image_has_no_digest(render: Render) -> None:
    policies = {c["imagePullPolicy"] for _, pod in all_pods(render("defaults")) for c in containers(pod)}
    assert policies == {"Always"}


# NetworkPolicy


def selected_components(selector: Manifest, manifests: list[Manifest]) -> set[str]:
    return {component_of(pod) for _, pod in all_pods(manifests) if selects(selector, pod["metadata"]["labels"])}


def policy(manifests: list[Manifest], component: str) -> Manifest:
    return one(manifests, "NetworkPolicy", component)


@pytest.mark.parametrize("scenario", ["defaults", "standalone", "tls-mtls-token"])
def test_selects_the_right_pods_and_ports_when_network_policy_is_on(render: Render, scenario: str) -> None:
    manifests = render(scenario)
    values = scenario_values(scenario)
    router, ray = policy(manifests, "router"), policy(manifests, "ray")
    assert selected_components(router["spec"]["podSelector"], manifests) == {"router"}
    assert selected_components(ray["spec"]["podSelector"], manifests) == {"ray-head", "ray-worker"}
    for pol in (router, ray):
        assert pol["spec"]["policyTypes"] == ["Ingress"]
        for rule in pol["spec"]["ingress"]:
            ports = [p["port"] for p in rule.get("ports", [])]
            peers = rule.get("from")
            if ports == [values["router"]["port"]]:
                # Clients: the gRPC port only; every source, or the clients given plus the helm test pod.
                assert pol is router
                if values["networkPolicy"]["clients"]:
                    assert peers[:-1] == values["networkPolicy"]["clients"]
                    assert selected_components(peers[-1]["podSelector"], manifests) == {"helm-test"}
                else:
                    assert peers is None
            elif not ports:
                # Any port, but only from the chart's router and Ray pods of this namespace.
                assert all(set(peer) == {"podSelector"} for peer in peers)
                assert set().union(*(selected_components(p["podSelector"], manifests) for p in peers)) == {
                    "router", "ray-head", "ray-worker"}
            else:
                # Metrics: only from the namespaces (and pods) given.
                assert set(ports) <= {values["metrics"]["port"], values["ray"]["metricsPort"]}
                assert peers == [{"namespaceSelector": values["metrics"]["namespaceSelector"],
                                  "podSelector": values["metrics"]["podSelector"]}]
    client_rules = [r for r in router["spec"]["ingress"] if r.get("ports") and
                    [p["port"] for p in r["ports"]] == [values["router"]["port"]]]
    assert len(client_rules) == 1
    metrics_rules = [r for r in ray["spec"]["ingress"] if r.get("ports")]
    assert [[p["port"] for p in r["ports"]] for r in metrics_rules] == [[values["ray"]["metricsPort"]]]


def test_renders_no_network_policy_when_disabled(render: Render, values_file: ValuesFile) -> None:
    assert by_kind(render("defaults", "-f", values_file({"networkPolicy": {"enabled": False}})), "NetworkPolicy") == []


def test_opens_no_metrics_port_when_metrics_are_off(render: Render, values_file: ValuesFile) -> None:
    manifests = render("defaults", "-f", values_file({"metrics": {"enabled": False}}))
    for pol in by_kind(manifests, "NetworkPolicy"):
        assert all(not r.get("ports") or [p["port"] for p in r["ports"]] == [50051] for r in pol["spec"]["ingress"])
    assert [p["name"] for p in one(manifests, "Service", "router")["spec"]["ports"]] == ["grpc"]
    assert router_argv(manifests)[router_argv(manifests).index("--metrics-port") + 1] == "0"


# Secrets


def secret_names_in_values(values: dict[str, Any]) -> set[str]:
    names = {values["tls"]["existingSecret"], values["tls"]["clientCA"]["existingSecret"],
             values["tls"]["test"]["caSecret"], values["tls"]["test"]["clientSecret"],
             values["tls"]["experts"]["existingSecret"],
             values["auth"]["existingSecret"], values["ray"]["auth"]["existingSecret"]}
    return names - {""}


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_renders_no_secret_data_when_scenario_is_given(render: Render, scenario: str) -> None:
    manifests = render(scenario)
    assert by_kind(manifests, "Secret") == []
    mounted = {v["secret"]["secretName"] for _, pod in all_pods(manifests) for v in pod["spec"].get("volumes", [])
               if "secret" in v}
    assert mounted <= secret_names_in_values(scenario_values(scenario))
    for _, pod in all_pods(manifests):
        for container in containers(pod):
            for env in container.get("env", []):
                assert "valueFrom" not in env, "secrets are mounted as files, never put in the environment"


def test_mounts_tls_client_ca_and_token_secrets_when_they_are_given(render: Render) -> None:
    manifests = render("tls-mtls-token")
    router = pod_of(manifests, "router")
    volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in router["spec"]["volumes"]}
    assert volumes["tls"] == "moe-router-tls"
    assert volumes["client-ca"] == "moe-client-ca"
    assert volumes["auth"] == "moe-api-token"
    assert volumes["ray-auth"] == "moe-ray-token"
    argv = router_argv(manifests)
    assert flag(argv, "--tls-cert") == "/etc/moe-cluster/tls/tls.crt"
    assert flag(argv, "--tls-key") == "/etc/moe-cluster/tls/tls.key"
    assert flag(argv, "--tls-client-ca") == "/etc/moe-cluster/client-ca/ca.crt"
    assert flag(argv, "--auth-token-file") == "/etc/moe-cluster/auth/token"
    # Mutual TLS to the expert hosts: the same files at the same paths on the router and every worker.
    expert_files = ["/etc/moe-cluster/expert-tls/tls.crt", "/etc/moe-cluster/expert-tls/tls.key",
                    "/etc/moe-cluster/expert-tls/ca.crt"]
    assert argv[argv.index("--expert-tls") + 1:argv.index("--expert-tls") + 4] == expert_files
    assert [str(p) for p in parse_moe_cluster(argv).expert_tls] == expert_files
    for where, pod in all_pods(manifests):
        if component_of(pod) in ("router", "ray-worker"):
            assert {"name": "expert-tls", "secret": {"secretName": "moe-expert-tls", "defaultMode": 0o440}} in \
                pod["spec"]["volumes"], where
            main = next(c for c in pod["spec"]["containers"] if c["name"] in ("router", "ray-worker"))
            assert "/etc/moe-cluster/expert-tls" in {m["mountPath"] for m in main["volumeMounts"]}, where
    # Kubernetes' gRPC probe speaks plaintext: with TLS the router's probes check the port.
    container = next(c for c in router["spec"]["containers"] if c["name"] == "router")
    assert container["readinessProbe"]["tcpSocket"] == {"port": "grpc"}


def test_turns_on_ray_token_auth_on_every_ray_node_when_a_ray_token_secret_is_given(render: Render) -> None:
    for _, pod in all_pods(render("tls-mtls-token")):
        if component_of(pod) == "helm-test":
            continue
        for container in containers(pod):
            if container["name"] == "copy-model":
                continue
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["RAY_AUTH_MODE"] == "token"
            assert env["RAY_AUTH_TOKEN_PATH"] == "/etc/moe-cluster/ray-auth/token"
            assert "/etc/moe-cluster/ray-auth" in {m["mountPath"] for m in container["volumeMounts"]}


def test_turns_ray_token_auth_off_explicitly_when_no_ray_token_is_given(render: Render) -> None:
    for _, pod in all_pods(render("defaults")):
        for container in containers(pod):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if component_of(pod) != "helm-test":
                assert env["RAY_AUTH_MODE"] == "disabled"
                assert env["RAY_USAGE_STATS_ENABLED"] == "0", "an air-gapped cluster phones nobody"


# GPUs and sizing
