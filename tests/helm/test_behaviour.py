"""What an operator relies on, read from the rendered manifests: each case "sets X when Y is given"."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.helm.manifests import (
    CHART,
    NAMESPACE,
    RELEASE,
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

Render = Callable[..., list[Manifest]]
RunHelm = Callable[..., subprocess.CompletedProcess[str]]
ValuesFile = Callable[[dict[str, Any]], str]

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


# Command lines against the real parsers


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


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_router_command_line_parses_with_the_real_cli_when_scenario_is_given(render: Render, scenario: str) -> None:
    values = scenario_values(scenario)
    args = parse_moe_cluster(router_argv(render(scenario)))
    experts, limits = values["experts"], values["router"]["limits"]
    assert args.command == "serve"
    assert (args.host, args.port, args.backend) == ("0.0.0.0", values["router"]["port"], "cluster")
    assert str(args.model) == f"/models/{values['model']['path']}"
    assert args.ray_address == head_address(scenario)
    assert (args.hosts, args.replicas) == (experts["hosts"], experts["replicas"])
    assert (args.cpus_per_host, args.gpus_per_host) == (experts["cpusPerHost"], experts["gpusPerHost"])
    assert (args.placement_strategy, args.max_restarts) == (experts["placementStrategy"], experts["maxRestarts"])
    assert args.restart_wait == experts["restartWaitSeconds"]
    assert (args.max_queue, args.max_running, args.max_prompt_tokens) == (
        limits["maxQueue"], limits["maxRunning"], limits["maxPromptTokens"])
    assert (args.max_new_tokens_cap, args.max_batch_tokens, args.max_message_bytes) == (
        limits["maxNewTokensCap"], limits["maxBatchTokens"], limits["maxMessageBytes"])
    assert args.grace_period == values["router"]["gracePeriodSeconds"]
    assert args.log_level == values["router"]["logLevel"]
    assert args.metrics_port == values["metrics"]["port"]
    assert args.dtype == (values["model"]["dtype"] or None)
    assert (args.tls_cert is not None) == values["tls"]["enabled"]
    assert (args.expert_tls is not None) == bool(values["tls"]["experts"]["existingSecret"])
    assert (args.auth_token_file is not None) == values["auth"]["enabled"]
    assert args.log_content is False
    assert args.plan is None or str(args.plan) == f"/etc/moe-cluster/plan/{experts['plan']['key']}"
    assert args.host_memory == experts["hostMemoryBytes"]


def test_router_command_line_parses_when_optional_flags_are_given(render: Render, values_file: ValuesFile) -> None:
    path = values_file({"router": {"threads": 8, "logContent": True, "logLevel": "DEBUG"},
                        "model": {"tokenizer": "mistral-v1", "dtype": "float32"},
                        "experts": {"gpusPerHost": 0.5, "cpusPerHost": 0.5, "restartWaitSeconds": 12.5,
                                    "groups": [{**GROUP, "gpusPerPod": 1}]}})
    args = parse_moe_cluster(router_argv(render("defaults", "-f", path)))
    assert (args.threads, args.log_content, args.log_level) == (8, True, "DEBUG")
    assert (args.tokenizer, args.dtype) == ("mistral-v1", "float32")
    assert (args.gpus_per_host, args.cpus_per_host, args.restart_wait) == (0.5, 0.5, 12.5)


def _generate_accepts_server() -> bool:
    parser = moe_cluster_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    generate = commands.choices["generate"]
    return any("--server" in action.option_strings for action in generate._actions)


@pytest.mark.parametrize("scenario", ["defaults", "tls-mtls-token"])
def test_helm_test_hook_checks_health_then_generates_when_scenario_is_given(render: Render, scenario: str) -> None:
    pod = pod_of(render(scenario), "helm-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    server = f"{RELEASE}-moe-cluster-router.{NAMESPACE}.svc:50051"
    health = pod["spec"]["initContainers"][0]
    assert argv_of(health)[:4] == ["python", "/etc/moe-cluster/helm-test/grpc_health_check.py", "--server", server]
    generate = argv_of(pod["spec"]["containers"][0])
    assert generate[:4] == ["moe-cluster", "generate", "--server", server]
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    for argv in (argv_of(health), generate):
        for name in ("--ca-cert", "--client-cert", "--client-key", "--auth-token-file"):
            if scenario == "tls-mtls-token":
                assert any(flag(argv, name).startswith(m + "/") for m in mounts), (name, argv)
            else:
                assert name not in argv
    if not _generate_accepts_server():
        pytest.xfail("`moe-cluster generate --server HOST:PORT` (the gRPC client mode) is not in the CLI yet")
    args = parse_moe_cluster(generate)
    assert (args.command, args.server, args.model) == ("generate", server, None)


def test_health_check_script_parses_the_rendered_flags_when_tls_and_token_are_given(render: Render) -> None:
    script = load_health_check()
    argv = argv_of(pod_of(render("tls-mtls-token"), "helm-test")["spec"]["initContainers"][0])
    args = script.parse_args(argv[2:])
    assert (str(args.ca_cert), str(args.client_cert), str(args.client_key), str(args.auth_token_file)) == (
        "/etc/moe-cluster/test-ca/ca.crt", "/etc/moe-cluster/test-client/tls.crt",
        "/etc/moe-cluster/test-client/tls.key", "/etc/moe-cluster/auth/token")


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


@pytest.mark.parametrize("scenario", ["defaults", "standalone", "kuberay-two-gpu-groups"])
def test_ray_start_command_lines_parse_with_rays_cli_when_scenario_is_given(render: Render, scenario: str) -> None:
    import click
    from ray.scripts.scripts import start

    argvs = ray_start_argvs(render(scenario))
    assert len(argvs) >= 3
    for argv in argvs:
        try:
            context = start.make_context("ray start", argv[2:])
        except click.ClickException as err:
            pytest.fail(f"`ray start` rejects {argv}: {err.format_message()}")
        assert context.params["block"] is True
        assert context.params["head"] or context.params["address"]
        assert context.params["node_manager_port"] == 6380
        assert context.params["object_store_memory"] == 104857600


# Schema and cross-field rules


def rejected(run_helm: RunHelm, values_file: ValuesFile, values: dict[str, Any]) -> str:
    done = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", values_file(values), check=False)
    assert done.returncode != 0, f"helm accepted {values}"
    return str(done.stderr)


GROUP = {"name": "cpu", "replicas": 1, "cpus": 2, "memory": "4Gi"}


@pytest.mark.parametrize(("values", "key", "why"), [
    ({"experts": {"groups": [{**GROUP, "replicas": -1}]}}, "/experts/groups/0/replicas", "minimum"),
    ({"router": {"replicas": -2}}, "/router/replicas", "minimum"),
    ({"ray": {"mode": "ray-on-vms"}}, "/ray/mode", "kuberay"),
    ({"model": {"path": None}}, "/model", "path"),
    ({"model": {"path": ""}}, "/model/path", "minLength"),
    ({"experts": {"groups": [{**GROUP, "gpusPerPod": 1.5}]}}, "/experts/groups/0/gpusPerPod", "integer"),
    ({"router": {"port": 70000}}, "/router/port", "maximum"),
    ({"metrics": {"port": 0}}, "/metrics/port", "minimum"),
    ({"router": {"service": {"port": "grpc"}}}, "/router/service/port", "integer"),
    ({"image": {"digest": "sha256:1234"}}, "/image/digest", "pattern"),
    ({"model": {"source": "huggingface"}}, "/model/source", "pvc"),
    ({"experts": {"placementStrategy": "RANDOM"}}, "/experts/placementStrategy", "SPREAD"),
    ({"experts": {"groups": [{**GROUP, "name": "GPU_Pool"}]}}, "/experts/groups/0/name", "pattern"),
    ({"router": {"replica": 2}}, "/router", "replica"),
    ({"experts": {"groups": []}}, "/experts/groups", "minItems"),
    ({"tls": {"enabled": "yes"}}, "/tls/enabled", "boolean"),
])
def test_schema_rejects_a_wrong_value_naming_the_key_when_it_is_given(
        run_helm: RunHelm, values_file: ValuesFile, values: dict[str, Any], key: str, why: str) -> None:
    message = rejected(run_helm, values_file, values)
    assert "schema" in message
    assert re.search(rf"at '{re.escape(key)}'", message), message
    assert why in message, message


@pytest.mark.parametrize(("values", "message"), [
    ({"model": {"source": "image"}}, "model.image.repository is empty"),
    ({"model": {"source": "image", "image": {"repository": "w"}}}, "model.image.tag and model.image.digest"),
    ({"model": {"source": "pvc", "pvc": {"claimName": ""}}}, "model.pvc.claimName is empty"),
    ({"model": {"path": "../etc"}}, 'model.path="../etc"'),
    ({"experts": {"groups": [{**GROUP, "minReplicas": 3}]}}, "experts.groups[0].minReplicas=3"),
    ({"experts": {"groups": [{**GROUP, "replicas": 2, "maxReplicas": 1}]}}, "experts.groups[0].maxReplicas=1"),
    ({"experts": {"groups": [GROUP, GROUP]}}, 'experts.groups[1].name="cpu" is used twice'),
    ({"experts": {"gpusPerHost": 1}}, "experts.gpusPerHost=1 needs 2 GPUs"),
    ({"experts": {"hosts": 4}}, "experts.hosts=4 x experts.cpusPerHost=1 needs 4 CPUs"),
    ({"experts": {"replicas": 3}}, "experts.replicas=3 is more than experts.hosts=2"),
    ({"tls": {"enabled": True}}, "tls.existingSecret is empty"),
    ({"tls": {"clientCA": {"existingSecret": "ca"}}}, 'tls.clientCA.existingSecret="ca" needs tls.enabled=true'),
    ({"auth": {"enabled": True}}, "auth.existingSecret is empty"),
    ({"metrics": {"port": 50051}}, "metrics.port=50051 is also router.port"),
    ({"router": {"port": 6379}}, "router.port=6379 is also a Ray port"),
    ({"router": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
     "router.autoscaling.minReplicas=5"),
    ({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}}, "metrics.serviceMonitor.enabled"),
])
def test_validate_fails_naming_key_and_value_when_values_contradict(
        run_helm: RunHelm, values_file: ValuesFile, values: dict[str, Any], message: str) -> None:
    assert message in rejected(run_helm, values_file, values)
