"""`moe-cluster load --server` and `moe-cluster rebalance`: clients of a running release.

`load --server` asks a router's Admin.GetLoad for the rows of the last --window seconds and writes
them as a load file. `rebalance` moves the running expert hosts to a plan, through a router
(Admin.Rebalance, --server) or straight through the controller actor on Ray (--ray-address).

As in planning_commands.py nothing here prints: results go to `show`, notes to `note`. Bad input
(and a plan the hosts refuse) raises ValueError, which cli.py turns into one line and exit 2; an
unreachable server or a failed call is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from cluster.arguments import number, positive_float, positive_int
from cluster.client import ClientConfig, open_channel
from cluster.deploy import CLUSTER_DEFAULTS, connect_ray, rebalance_controller
from cluster.load import ExpertLoad
from cluster.placement import PlacementPlan
from protos import admin_pb2, admin_pb2_grpc
from router.dispatch import DispatchConfig

Show = Callable[[str], None]
EXIT_FAILURE = 1
DEFAULT_WINDOW_S = 300.0
# The caller's mistake (or a plan the hosts cannot take): exit 2, like other bad input.
USER_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE)


def add_admin_commands(commands: argparse._SubParsersAction[Any], show: Show, note: Show) -> None:
    """Register `rebalance` (`load --server` is an option of planning_commands' `load`)."""
    _add_rebalance(commands).set_defaults(run=lambda args: run_rebalance(args, show, note))


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """--server's TLS, token and deadline flags, named as `generate --server`'s."""
    client = p.add_argument_group("client of a server (--server)")
    client.add_argument("--ca-cert", type=Path, default=None, help="CA (PEM) of the server's certificate: use TLS")
    client.add_argument("--client-cert", type=Path, default=None, help="client certificate (PEM) for mTLS")
    client.add_argument("--client-key", type=Path, default=None, help="client key (PEM) for mTLS")
    client.add_argument("--auth-token-file", type=Path, default=None, help="file holding the bearer token")
    client.add_argument("--timeout", type=positive_float, default=600.0, metavar="SECONDS",
                        help="deadline of the call")


def _add_rebalance(commands: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = commands.add_parser(
        "rebalance", help="move the running expert hosts to a placement plan without stopping service")
    p.add_argument("--plan", type=Path, required=True, metavar="plan.json", help="from `moe-cluster plan`")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", metavar="HOST:PORT", help="through a router (Admin.Rebalance)")
    where.add_argument("--ray-address", metavar="ADDR", help="through the controller actor of this Ray cluster")
    p.add_argument("--controller", default=CLUSTER_DEFAULTS["name"], help="the controller actor's name (--ray-address)")
    p.add_argument("--namespace", default=CLUSTER_DEFAULTS["namespace"], help="its Ray namespace (--ray-address)")
    p.add_argument("--host-memory", type=positive_int, default=None, metavar="BYTES",
                   help="expert-weight budget of each host during the move (default: unlimited)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_client_flags(p)
    return p


def export_live_load(args: argparse.Namespace, note: Show) -> int:
    """`load --server`: the router's load over --window seconds -> the load file --out."""
    window = DEFAULT_WINDOW_S if args.window is None else args.window
    cfg = client_config(args)
    try:
        with open_channel(cfg) as channel:
            reply = admin_pb2_grpc.AdminStub(channel).GetLoad(admin_pb2.GetLoadRequest(window_s=window),
                                                              timeout=cfg.timeout_s, metadata=_metadata(cfg))
    except grpc.RpcError as err:
        return _rpc_failed(err, note)
    load = load_from_reply(reply)
    load.save(args.out)
    note(f"wrote {args.out}: {load.num_layers} layers x {load.num_experts} experts, {load.tokens} tokens over the "
         f"last {load.window_s:.1f} s on {args.server}")
    return 0


def load_from_reply(reply: admin_pb2.GetLoadResponse) -> ExpertLoad:
    """A GetLoadResponse as a load file's contents."""
    rows = tuple(tuple(int(v) for v in layer.rows) for layer in reply.load)
    return ExpertLoad(rows, round(reply.window_s, 3), int(reply.tokens), int(reply.experts_per_token) or None, "live")


def run_rebalance(args: argparse.Namespace, show: Show, note: Show) -> int:
    plan = PlacementPlan.load(args.plan)
    plan.validate()
    if args.server is not None:
        try:
            report = _rebalance_via_server(args, plan)
        except grpc.RpcError as err:
            return _rpc_failed(err, note)
    else:
        import ray  # only this path needs Ray: the other commands start without it

        try:
            report = _rebalance_via_ray(args, plan)
        except ray.exceptions.RayError as err:
            note(f"moe-cluster: failed: {type(err).__name__}: {err}")
            return EXIT_FAILURE
    show(json.dumps(report) if args.json else _report_text(report))
    return 0


def _rebalance_via_server(args: argparse.Namespace, plan: PlacementPlan) -> dict[str, Any]:
    request = admin_pb2.RebalanceRequest(plan_json=plan.to_json())
    if args.host_memory is not None:
        request.host_memory_bytes = args.host_memory
    cfg = client_config(args)
    with open_channel(cfg) as channel:
        reply = admin_pb2_grpc.AdminStub(channel).Rebalance(request, timeout=cfg.timeout_s, metadata=_metadata(cfg))
    report: dict[str, Any] = json.loads(reply.report_json)
    return report


def _rebalance_via_ray(args: argparse.Namespace, plan: PlacementPlan) -> dict[str, Any]:
    import ray

    joined = not ray.is_initialized()  # in-process callers (tests) may already hold a connection: keep it
    connect_ray(args.ray_address, args.namespace)
    try:
        try:
            controller = ray.get_actor(args.controller, namespace=args.namespace)
        except ValueError:
            raise ValueError(f"no controller actor {args.controller!r} in namespace {args.namespace!r} on "
                             f"{args.ray_address}: give --controller and --namespace of the release") from None
        # Routers re-read the routing table when it is table_max_age_s old; a dropped expert is released
        # twice that long after the table without it is published (as ExpertCluster.rebalance does).
        settle_s = 2 * DispatchConfig().table_max_age_s
        return rebalance_controller(controller, plan, args.host_memory, settle_s)
    finally:
        if joined:
            ray.shutdown()  # disconnects this process; the cluster keeps running


def _report_text(report: dict[str, Any]) -> str:
    peaks = ", ".join(f"{host} {int(peak) / 2**20:.1f} MiB" for host, peak in sorted(report["peak_bytes"].items()))
    return (f"re-placed in {report['steps']} steps ({report['seconds']:.1f} s), routing table "
            f"v{report['version']}; peak expert memory per host: {peaks or 'unchanged'}")


def client_config(args: argparse.Namespace) -> ClientConfig:
    token = None
    if args.auth_token_file is not None:
        token = args.auth_token_file.read_text().strip()
        if not token:
            raise ValueError(f"{args.auth_token_file}: the token file is empty")
    return ClientConfig(args.server, args.ca_cert, args.client_cert, args.client_key, token, args.timeout)


def _metadata(cfg: ClientConfig) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {cfg.auth_token}")] if cfg.auth_token else None


def _rpc_failed(err: grpc.RpcError, note: Show) -> int:
    code = err.code()
    if code in USER_CODES:
        raise ValueError(f"{code.name}: {err.details()}") from None
    note(f"moe-cluster: failed: {code.name}: {err.details()}")
    return EXIT_FAILURE


def window_seconds(text: str) -> float:
    """--window: a finite number of seconds >= 0."""
    value = number(text, float, "a number of seconds")
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{value} must be a finite number of seconds >= 0 (0: since the start)")
    return value
