"""`moe-cluster scale`: its flags, and the scaler they build (cluster/scaler.py holds the scaling).

Kept out of cli.py so that the command line's main module only registers the subcommand. Nothing
here prints: lines for the operator go to the `show` callable cli.py passes in.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.arguments import number
from cluster.capacity import CapacityConfig, CapacityError, plan_capacity, read_host_rate
from cluster.load import ExpertLoad, LoadFileError
from cluster.scaler import (
    HOSTS,
    Bounds,
    HostsNeeded,
    LoopConfig,
    Outcome,
    RayClusterScaler,
    RayResourceRequest,
    ScaleError,
    ScaleLoop,
    ScalerConfig,
    Target,
    pods_for_hosts,
    raycluster_name,
    static_target,
)

if TYPE_CHECKING:
    from kubernetes.client import CustomObjectsApi

Show = Callable[[str], None]


def add_scale_command(commands: argparse._SubParsersAction[Any], run: Callable[[argparse.Namespace], int]) -> None:
    p = commands.add_parser("scale", help="set the worker pods of expert groups (KubeRay) or ask Ray's autoscaler")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--release", help="Helm release whose RayCluster to scale (named as the chart names it)")
    where.add_argument("--raycluster", help="the RayCluster's name, where nameOverride/fullnameOverride changed it")
    where.add_argument("--ray-address", help="standalone Ray: ask this cluster's autoscaler for room for --hosts")
    p.add_argument("--namespace", help="namespace of the RayCluster (required with --release/--raycluster)")
    p.add_argument("--kubeconfig", type=Path, default=None,
                   help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    p.add_argument("--in-cluster", action="store_true", help="use the pod's service account (the chart's scaler)")
    target = p.add_argument_group("target")
    target.add_argument("--group", action="append", type=_group_count, default=[], metavar="NAME=PODS",
                        help="worker pods wanted in a group (repeatable)")
    hosts = target.add_mutually_exclusive_group()
    hosts.add_argument("--hosts", type=_count, default=None,
                       help="expert hosts wanted: pods of --hosts-group (KubeRay) or bundles (--ray-address)")
    hosts.add_argument("--from-capacity", type=Path, default=None, metavar="load.json",
                       help="expert hosts from the capacity model (`moe-cluster capacity`) for this load file, "
                       "re-read every round of the loop")
    target.add_argument("--target-tokens-per-s", type=float, default=None, metavar="X",
                        help="with --from-capacity: the rate to serve")
    target.add_argument("--measured", type=Path, default=None, metavar="bench.json",
                        help='with --from-capacity: the host speed, as for `moe-cluster capacity`')
    target.add_argument("--hosts-group", default=None, help="the worker group that holds the hosts (KubeRay)")
    target.add_argument("--cpus-per-host", type=float, default=1.0, help="Ray CPUs of one expert host")
    target.add_argument("--gpus-per-host", type=float, default=0.0, help="Ray GPUs of one expert host")
    target.add_argument("--min", action="append", type=_group_count, default=[], metavar="NAME=PODS",
                        help="fewest pods the scaler sets in a group (beside the RayCluster's minReplicas)")
    target.add_argument("--max", action="append", type=_group_count, default=[], metavar="NAME=PODS",
                        help="most pods the scaler sets in a group (beside the RayCluster's maxReplicas)")
    how = p.add_argument_group("how")
    how.add_argument("--dry-run", action="store_true", help="print the JSON Patch (or bundles); send no write")
    how.add_argument("--interval", type=float, default=None, metavar="SECONDS",
                     help="run in a loop, re-reading the target every SECONDS (default: once)")
    how.add_argument("--cooldown", type=float, default=300.0, metavar="SECONDS",
                     help="in the loop, how long a group keeps its pods after a change")
    how.add_argument("--heartbeat", type=Path, default=None, help="file touched after every round of the loop")
    how.add_argument("--max-attempts", type=int, default=5, help="patches tried when the RayCluster keeps changing")
    p.set_defaults(run=run)


def _count(text: str) -> int:
    value = number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 0")
    return value


def _group_count(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=COUNT")
    return name, _count(count)


def run_scale(args: argparse.Namespace, show: Show) -> int:
    target = scale_target(args)  # checked before connecting to anything
    apply = _ray_applier(args) if args.ray_address else _kuberay_applier(args)

    def report(outcome: Outcome) -> None:
        for line in describe(outcome, args.dry_run):
            show(line)

    if args.interval is None:
        report(apply(target, lambda name: True))
        return 0
    ScaleLoop(apply, target, LoopConfig(args.interval, args.cooldown, args.heartbeat), report).run()
    return 0


def scale_target(args: argparse.Namespace) -> Target:
    hosts = _hosts_needed(args)
    if args.ray_address:
        if hosts is None or args.group:
            raise ValueError("--ray-address scales by --hosts N or --from-capacity (the Ray autoscaler knows no "
                             "worker groups)")
        return lambda groups: {HOSTS: hosts()}
    if (hosts is None) != (args.hosts_group is None):
        raise ValueError("--hosts-group goes with --hosts or --from-capacity, and they with it")
    if hosts is None and not args.group:
        raise ValueError("nothing to scale: give --group NAME=PODS, or --hosts N (or --from-capacity) --hosts-group")
    fixed = dict(args.group)
    if hosts is None:
        return static_target(fixed)
    group, cpus, gpus = args.hosts_group, args.cpus_per_host, args.gpus_per_host

    def with_hosts(groups: Any) -> dict[str, int]:
        if group not in groups:
            raise ValueError(f"--hosts-group {group!r} is not a worker group of the RayCluster: {sorted(groups)}")
        return {**fixed, group: pods_for_hosts(hosts(), groups[group], cpus, gpus)}

    return with_hosts


def _hosts_needed(args: argparse.Namespace) -> HostsNeeded | None:
    if args.from_capacity is None:
        if args.target_tokens_per_s is not None or args.measured is not None:
            raise ValueError("--target-tokens-per-s and --measured go with --from-capacity")
        count = args.hosts
        return None if count is None else lambda: int(count)
    if args.target_tokens_per_s is None or args.measured is None:
        raise ValueError("--from-capacity needs --target-tokens-per-s and --measured")
    for path in (args.from_capacity, args.measured):
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
    return capacity_hosts(args.from_capacity, args.measured, args.target_tokens_per_s)


def capacity_hosts(load_path: Path, measured: Path, target_tokens_per_s: float) -> HostsNeeded:
    """The capacity model's answer (cluster/capacity.py, as `moe-cluster capacity` gives it), computed
    afresh from the load file at every call: in the loop, whatever rewrites that file drives the scale.
    A file caught half-written or a target no host count reaches fails the round, not the loop."""
    round_errors = (LoadFileError, CapacityError, OSError)

    def hosts() -> int:
        try:
            load = ExpertLoad.read(load_path)
            rate = read_host_rate(measured, load.rows_per_token())
            cfg = CapacityConfig(target_tokens_per_s, rate.rows_per_s)
            return plan_capacity(load.rows, load.token_count(), cfg).num_hosts
        except round_errors as err:
            raise ScaleError(f"capacity model: {err}") from None

    return hosts


def _kuberay_applier(args: argparse.Namespace) -> Any:
    if not args.namespace:
        raise ValueError("--namespace is required with --release/--raycluster")
    bounds = {name: Bounds(low=dict(args.min).get(name, 0), high=dict(args.max).get(name))
              for name in {*dict(args.min), *dict(args.max)}}
    cfg = ScalerConfig(namespace=args.namespace, raycluster=args.raycluster or raycluster_name(args.release),
                       bounds=bounds, max_attempts=args.max_attempts, dry_run=args.dry_run)
    return RayClusterScaler(kube_api(args.kubeconfig, args.context, args.in_cluster), cfg).apply


def _ray_applier(args: argparse.Namespace) -> Any:
    if args.min or args.max:
        raise ValueError("--min/--max bound worker groups of a RayCluster; with --ray-address give --hosts alone")
    request = RayResourceRequest(args.cpus_per_host, args.gpus_per_host, dry_run=args.dry_run)
    if not args.dry_run:
        import ray

        if not ray.is_initialized():
            ray.init(address=args.ray_address, log_to_driver=False, configure_logging=False)
    return request.apply


def kube_api(kubeconfig: Path | None, context: str | None, in_cluster: bool) -> CustomObjectsApi:
    """A CustomObjectsApi from a kubeconfig (or the pod's service account), with its own configuration
    object so that nothing global of the kubernetes package is set."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None, context=context,
                                    client_configuration=configuration, persist_config=False)
    except config.ConfigException as err:
        raise ValueError(f"cannot load the Kubernetes configuration: {err}") from None
    return client.CustomObjectsApi(client.ApiClient(configuration))


def describe(outcome: Outcome, dry_run: bool) -> list[str]:
    """Lines for the operator: the patch of a dry run, else one line per change."""
    if dry_run:
        return [json.dumps(outcome.patch)] if outcome.patch else ["no change"]
    return [f"{name}: {old} -> {new}" for name, (old, new) in outcome.changes.items()] or ["no change"]
