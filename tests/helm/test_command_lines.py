"""Every command line the chart renders parses with the real parsers: moe-cluster's, `ray start`'s, the
helm test hook's and the health check script's."""

from __future__ import annotations

import pytest

from tests.helm.manifests import (
    NAMESPACE,
    RELEASE,
    SCENARIO_NAMES,
    scenario_values,
)
from tests.helm.rendered import (
    GROUP,
    Render,
    ValuesFile,
    argv_of,
    flag,
    head_address,
    load_health_check,
    moe_cluster_parser,
    parse_moe_cluster,
    pod_of,
    ray_start_argvs,
    router_argv,
)

# Command lines against the real parsers


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
    keepalive = values["router"]["keepalive"]
    assert (args.client_ping_interval, args.keepalive, args.keepalive_timeout) == (
        keepalive["clientPingIntervalSeconds"], keepalive["pingSeconds"], keepalive["timeoutSeconds"])
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
    path = values_file({"router": {"threads": 8, "logContent": True, "logLevel": "DEBUG",
                                   "keepalive": {"clientPingIntervalSeconds": 2.5, "pingSeconds": 30,
                                                 "timeoutSeconds": 7.5}},
                        "model": {"tokenizer": "mistral-v1", "dtype": "float32"},
                        "experts": {"gpusPerHost": 0.5, "cpusPerHost": 0.5, "restartWaitSeconds": 12.5,
                                    "groups": [{**GROUP, "gpusPerPod": 1}]}})
    args = parse_moe_cluster(router_argv(render("defaults", "-f", path)))
    assert (args.threads, args.log_content, args.log_level) == (8, True, "DEBUG")
    assert (args.client_ping_interval, args.keepalive, args.keepalive_timeout) == (2.5, 30, 7.5)
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
