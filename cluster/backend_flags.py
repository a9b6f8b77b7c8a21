"""Where a command's model runs: every expert in this process (--backend local), or expert hosts as
Ray actors called over gRPC (--backend cluster): the flags and the loader they feed."""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster.arguments import Parser, positive_int
from cluster.deploy import (
    CLUSTER_DEFAULTS,
    ClusterConfig,
    ExpertCluster,
    ExpertsWrapper,
    LocalConfig,
    load_cluster_model,
    load_local_model,
)
from cluster.placement import HostResources
from mixtral.allocator import keep_freed_memory
from mixtral.model import Mixtral
from router.dispatch import DispatchConfig


def add_cluster_flags(p: Parser) -> None:
    group = p.add_argument_group("experts on a Ray cluster (--backend cluster)")
    group.add_argument("--backend", choices=["local", "cluster"], default="local",
                       help="local: every expert in this process; cluster: expert hosts as Ray actors over gRPC")
    group.add_argument("--hosts", type=positive_int, default=2, help="expert hosts (round-robin plan)")
    group.add_argument("--replicas", type=positive_int, default=1, help="hosts serving each expert")
    group.add_argument("--plan", type=Path, default=None, help="a placement plan JSON instead of round-robin")
    group.add_argument("--host-memory", type=positive_int, default=None, metavar="BYTES",
                       help="refuse a plan that puts more expert weights than this on any host")
    group.add_argument("--ray-address", default=None,
                       help="join this Ray cluster (default: start a local instance and stop it afterwards)")
    group.add_argument("--cpus-per-host", type=float, default=1.0, help="Ray CPUs (and torch threads) per host")
    group.add_argument("--gpus-per-host", type=float, default=0.0, help="Ray GPUs per host (fractions allowed)")
    group.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                       default="PACK", help="how the hosts' placement group spreads over nodes")
    group.add_argument("--max-restarts", type=int, default=3, help="Ray restarts of a failed host (-1: forever)")
    group.add_argument("--expert-tls", nargs=3, type=Path, default=None, metavar=("CERT", "KEY", "CA"),
                       help="mutual TLS between router and expert hosts: PEM cert, key and CA, at the same paths "
                       "on every node (the host certificate needs the DNS name moe-expert-host)")
    group.add_argument("--restart-wait", type=float, default=30.0, metavar="SECONDS",
                       help="how long a layer waits for a restarted host when no replica of an expert answers")
    group.add_argument("--controller", default=CLUSTER_DEFAULTS["name"], metavar="NAME",
                       help="the controller actor's name: routers started with the same name (and namespace) on "
                       "one Ray cluster share its expert hosts")
    group.add_argument("--namespace", default=CLUSTER_DEFAULTS["namespace"], help="the controller's Ray namespace")


def load_model(args: argparse.Namespace, model_dir: Path, wrap: ExpertsWrapper | None = None
                ) -> tuple[Mixtral, ExpertCluster | None]:
    """The model of the command's backend; from here on, this process keeps freed memory for its steps."""
    model, cluster = _load(args, model_dir, wrap)
    keep_freed_memory()
    return model, cluster


def _load(args: argparse.Namespace, model_dir: Path, wrap: ExpertsWrapper | None
          ) -> tuple[Mixtral, ExpertCluster | None]:
    if args.backend == "local":
        return load_local_model(LocalConfig(model_dir, dtype=args.dtype, device=args.device), wrap), None
    hosts = HostResources(num_cpus=args.cpus_per_host, num_gpus=args.gpus_per_host,
                          strategy=args.placement_strategy, max_restarts=args.max_restarts)
    cfg = ClusterConfig(model_dir, num_hosts=args.hosts, replicas=args.replicas, plan_path=args.plan,
                        host_memory_bytes=args.host_memory, ray_address=args.ray_address, dtype=args.dtype,
                        device=args.device, hosts=hosts,
                        dispatch_tls=tuple(args.expert_tls) if args.expert_tls else None,
                        dispatch=DispatchConfig(restart_wait_s=args.restart_wait), name=args.controller,
                        namespace=args.namespace)
    return load_cluster_model(cfg, wrap)
