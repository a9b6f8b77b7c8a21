"""Wiring: a model directory -> an engine whose experts run in-process or on Ray-hosted gRPC servers."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from cluster.placement import HostResources, PlacementError, PlacementPlan
from cluster.rebalance import RebalanceError
from experts.backend import InProcessExperts
from experts.weights import all_experts, load_shard
from mixtral.block import Experts
from mixtral.checkpoint import Checkpoint
from mixtral.config import DTYPES, ModelConfig, check_dtype
from mixtral.model import Mixtral
from protos.security import DispatchTls
from router.dispatch import DispatchConfig, RemoteExperts, RoutingTable
from router.engine import Engine, EngineConfig
from router.kv_cache import CacheConfig, KVCache

log = logging.getLogger(__name__)

ROUTER_LEASE_S = 15.0  # default of ClusterConfig.router_lease_s (see Controller.detach)


def _ray() -> ModuleType:
    """Ray, imported when first needed: only the cluster backend uses it, so the local backend and the client
    commands run where Ray is not installed, and skip its half-second import."""
    import ray

    return ray


@dataclass(frozen=True, slots=True)
class LocalConfig:
    """One process holding the whole model."""

    model_dir: Path
    dtype: str | None = None  # None: bfloat16 on a GPU, float32 on the CPU
    device: str | None = None  # None: cuda when torch sees a GPU, else cpu
    cache: CacheConfig = field(default_factory=CacheConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        if self.device is not None:
            check_device(self.device)

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def resolved_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return torch.bfloat16 if self.resolved_device.startswith("cuda") else torch.float32


def check_device(device: str) -> None:
    """Raise ValueError naming `device` unless torch can place tensors there."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise ValueError(f"device={device!r} is not available: torch sees {count} CUDA device(s)")
    elif parsed.type != "cpu":
        raise ValueError(f"device={device!r} is not supported: use cpu, cuda or cuda:N")


ExpertsWrapper = Callable[[Experts], Experts]  # e.g. CountingExperts, around whatever backend is built


def load_local_model(cfg: LocalConfig, wrap: ExpertsWrapper | None = None) -> Mixtral:
    """Load config, router weights and every expert of `cfg.model_dir` into this process."""
    model_config = ModelConfig.from_json(cfg.model_dir / "config.json")
    checkpoint = Checkpoint(cfg.model_dir, model_config)
    dtype, device = cfg.resolved_dtype, cfg.resolved_device
    shard = load_shard(checkpoint, all_experts(checkpoint), dtype, device)
    experts: Experts = InProcessExperts(shard, model_config.num_local_experts)
    return Mixtral.load(checkpoint, dtype, device, wrap(experts) if wrap else experts)


def build_engine(model: Mixtral, cache: CacheConfig, engine: EngineConfig) -> Engine:
    """An engine over `model` with a fresh KV cache in the model's dtype and device."""
    return Engine(model, KVCache(model.config, cache, model.dtype, model.device), engine)


def build_local_engine(cfg: LocalConfig) -> Engine:
    """The whole model in this process, with the cache and step limits of `cfg`."""
    return build_engine(load_local_model(cfg), cfg.cache, cfg.engine)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Experts on Ray actors (the cluster backend); the router runs in this process."""

    model_dir: Path
    num_hosts: int = 2
    replicas: int = 1
    plan_path: Path | None = None  # a saved PlacementPlan; None: round-robin over num_hosts
    host_memory_bytes: int | None = None  # expert-weight budget of each host; None: not checked
    ray_address: str | None = None  # None: start an embedded local Ray instance
    dtype: str | None = None  # None: bfloat16 when hosts or router use a GPU, else float32
    device: str | None = None  # the router's device
    hosts: HostResources = field(default_factory=HostResources)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    dispatch_tls: tuple[Path, Path, Path] | None = None  # (cert, key, CA) PEM paths, the same on every node
    name: str = "moe-controller"  # the controller actor's name in the Ray namespace
    namespace: str = "moe-cluster"
    # How long this router's claim on the hosts lasts unrenewed (renewed every third of it): if it dies
    # without leaving, its hosts outlive it by up to this long before another router may stop them.
    router_lease_s: float = ROUTER_LEASE_S

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        if self.device is not None:
            check_device(self.device)
        if self.num_hosts < 1:
            raise ValueError(f"num_hosts={self.num_hosts} must be at least 1")
        if not self.router_lease_s > 0:
            raise ValueError(f"router_lease_s={self.router_lease_s} must be a positive number of seconds")

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        uses_gpu = self.hosts.num_gpus > 0 or self.resolved_device.startswith("cuda")
        return "bfloat16" if uses_gpu else "float32"


CLUSTER_DEFAULTS = {f.name: f.default for f in fields(ClusterConfig)}  # the command lines' defaults


class ClusterStartError(RuntimeError):
    """The expert hosts could not be placed or did not start serving."""


class ExpertCluster:
    """A running set of expert hosts behind a controller, and the remote backend that calls them."""

    def __init__(self, cfg: ClusterConfig, model_config: ModelConfig) -> None:
        self.cfg = cfg
        plan = self._plan(model_config)
        self._table: RoutingTable | None = None
        self.router_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._leaving = threading.Event()
        self._started_ray = connect_ray(cfg.ray_address, cfg.namespace)
        try:
            self.controller = self._attach_controller(plan)
        except BaseException:
            self._disconnect()
            raise
        try:
            _ray().get(self.controller.wait_ready.remote())
        except _ray().exceptions.RayTaskError as err:
            self.close()
            raise ClusterStartError(f"expert hosts did not start: {err.cause}") from None
        except Exception:
            self.close()
            raise
        threading.Thread(target=self._renew_lease, name="router-lease", daemon=True).start()
        dispatch = cfg.dispatch
        if cfg.dispatch_tls is not None:
            dispatch = replace(dispatch, tls=DispatchTls.from_files(*cfg.dispatch_tls))
        self.backend = RemoteExperts(self._fetch_table, model_config.num_local_experts, dispatch)

    def _attach_controller(self, plan: PlacementPlan) -> Any:
        """The controller of `cfg.name`, started with `plan` unless one runs already, with this router's lease.

        A running controller (another router replica's, or one a router left when it died) is used when it
        serves the same model, dtype, message limit, dispatch TLS files, host resources and initial plan.
        One that serves something else is stopped and replaced when no router holds a lease on it (a dead
        router's leftover); while one does, ClusterStartError names what differs and the hosts are left alone.
        """
        from cluster.controller import ControllerStopping

        cfg = self.cfg
        give_up_at = time.monotonic() + cfg.hosts.ready_timeout_s
        while True:
            controller = self._start_controller(plan)
            try:
                running = json.loads(_ray().get(controller.settings.remote(), timeout=60))
                differ = self._differences(running, plan)
                if differ and _ray().get(controller.retire_if_unused.remote(), timeout=120):
                    log.warning("controller %r was left running by a router that did not stop, for another "
                                "configuration (%s): stopped its hosts; starting this router's", cfg.name, differ)
                    _ray().kill(controller, no_restart=True)
                    continue
                if differ:
                    raise ClusterStartError(
                        f"controller {cfg.name!r} in Ray namespace {cfg.namespace!r} runs expert hosts for another "
                        f"router configuration ({differ}) and a router still uses them: stop that router first "
                        f"(the hosts stop with the last router that leaves)")
                others = _ray().get(controller.attach.remote(self.router_id, cfg.router_lease_s), timeout=60) - 1
            except (_ray().exceptions.RayTaskError, _ray().exceptions.RayActorError) as err:
                # Its last router is stopping it, or it was killed and its name is not free yet: try again.
                if isinstance(err, _ray().exceptions.RayTaskError) and not isinstance(err.cause, ControllerStopping):
                    raise
                if time.monotonic() > give_up_at:
                    raise ClusterStartError(f"the controller {cfg.name!r} did not start within "
                                            f"{cfg.hosts.ready_timeout_s:.0f} s: {err}") from None
                time.sleep(0.5)
                continue
            if others:
                log.warning("controller %r is in use by %d other router(s): serving on its running hosts",
                            cfg.name, others)
            return controller

    def _differences(self, running: dict[str, Any], plan: PlacementPlan) -> str:
        """What a running controller serves differently from what this router was started for ("": nothing).

        The plan compared is the one the controller started with: a live re-placement since then is its own.
        """
        mine = self._controller_settings(plan)
        differ = [f"{key} {running[key]!r}, this router {value!r}" for key, value in mine.items()
                  if key != "plan" and running[key] != value]
        if running["plan"] != mine["plan"]:
            theirs = PlacementPlan.from_json(running["plan"])
            differ.append(f"a placement plan of {len(theirs.hosts)} hosts, this router's of {len(plan.hosts)}"
                          if len(theirs.hosts) != len(plan.hosts) else "another placement plan")
        return "; ".join(differ)

    def _renew_lease(self) -> None:
        """Renew this router's lease every third of it until close(); a failed renewal is retried."""
        lease = self.cfg.router_lease_s
        while not self._leaving.wait(lease / 3):
            try:
                _ray().get(self.controller.attach.remote(self.router_id, lease), timeout=lease / 3)
            except Exception as err:  # the controller is restarting or unreachable: the next round retries
                log.warning("could not renew this router's lease on the expert hosts (%s)", type(err).__name__)

    def _start_controller(self, plan: PlacementPlan) -> Any:
        """The controller actor (a handle): the running one of cfg.name, or a new one, which starts creating
        the plan's hosts at once."""
        from cluster.controller import Controller

        cfg = self.cfg
        # On the head node (whose loss ends the cluster anyway), restarted by Ray if its process dies;
        # calls made while it restarts are retried rather than failed.
        remote_controller = _ray().remote(Controller).options(
            name=cfg.name, namespace=cfg.namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
            max_concurrency=8, max_restarts=-1, max_task_retries=-1, resources={"node:__internal_head__": 0.001})
        settings = self._controller_settings(plan)
        return remote_controller.remote(cfg.name, settings["plan"], settings["model_dir"], settings["dtype"],
                                        settings["resources"], settings["max_message_bytes"], settings["tls_files"])

    def _controller_settings(self, plan: PlacementPlan) -> dict[str, Any]:
        """What this router starts a controller with, keyed as `Controller.settings()` reports it back."""
        cfg = self.cfg
        return {"model_dir": str(cfg.model_dir), "dtype": cfg.resolved_dtype,
                "max_message_bytes": cfg.dispatch.max_message_bytes,
                "tls_files": [str(p) for p in cfg.dispatch_tls] if cfg.dispatch_tls else None,
                "resources": asdict(cfg.hosts), "plan": plan.to_json()}

    def _plan(self, model_config: ModelConfig) -> PlacementPlan:
        cfg = self.cfg
        if cfg.plan_path is not None:
            plan = PlacementPlan.load(cfg.plan_path)
        else:
            plan = PlacementPlan.round_robin(model_config.num_hidden_layers, model_config.num_local_experts,
                                             cfg.num_hosts, cfg.replicas)
        if (plan.num_layers, plan.num_experts) != (model_config.num_hidden_layers, model_config.num_local_experts):
            raise PlacementError(f"the plan covers {plan.num_layers} layers x {plan.num_experts} experts; the "
                                 f"model has {model_config.num_hidden_layers} x {model_config.num_local_experts}")
        itemsize = DTYPES[cfg.resolved_dtype].itemsize
        plan.validate(model_config.expert_num_params * itemsize, cfg.host_memory_bytes)
        return plan

    def _fetch_table(self, refresh: bool) -> RoutingTable:
        try:
            reply = self.controller.routing_table.remote(refresh)
            text: str = _ray().get(reply, timeout=self.cfg.dispatch.call_timeout_s)
        except (_ray().exceptions.RayError, TimeoutError) as err:
            if self._table is None:
                raise
            # The controller is restarting (or unreachable): keep routing with what we know; dispatch
            # retries within its budget and names the expert if no host answers.
            log.warning("routing table refresh failed (%s); keeping version %d", type(err).__name__,
                        self._table.version)
            return self._table
        self._table = RoutingTable.from_json(text)
        return self._table

    def hosts_info(self) -> list[dict[str, Any]]:
        return list(_ray().get(self.controller.hosts_info.remote(), timeout=60))

    def rebalance(self, plan: PlacementPlan, host_memory_bytes: int | None = None) -> dict[str, Any]:
        """Move the running hosts to `plan` while serving (see Controller.rebalance); returns its report.

        RebalanceError (nothing changed) when the plan does not fit the hosts or their memory.
        """
        return rebalance_controller(self.controller, plan, host_memory_bytes,
                                    settle_s=2 * self.cfg.dispatch.table_max_age_s)

    def placement(self) -> PlacementPlan:
        """The plan the hosts serve now."""
        return PlacementPlan.from_json(_ray().get(self.controller.placement.remote(), timeout=60))

    def is_serving(self) -> bool:
        """True while every expert of the plan has a live host (the controller's view)."""
        try:
            return bool(_ray().get(self.controller.is_serving.remote(), timeout=10))
        except Exception:  # the controller itself is unreachable: not serving
            log.warning("the controller did not answer a health check")
            return False

    def close(self) -> None:
        """Leave the hosts: the last router that leaves stops them and the controller. Shut Ray down if this
        cluster started it. A second call does nothing."""
        if self._leaving.is_set():
            return
        self._leaving.set()
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()
        try:
            others = _ray().get(self.controller.detach.remote(self.router_id, self.cfg.router_lease_s), timeout=60)
            if others:
                log.info("%d other router(s) use the expert hosts of %r: leaving them running", others, self.cfg.name)
            else:
                _ray().kill(self.controller, no_restart=True)
        finally:
            self._disconnect()

    def _disconnect(self) -> None:
        if self._started_ray:
            _ray().shutdown()

    def __enter__(self) -> ExpertCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rebalance_controller(controller: Any, plan: PlacementPlan, host_memory_bytes: int | None,
                         settle_s: float) -> dict[str, Any]:
    """Ask a controller actor to apply `plan`; RebalanceError carries its reason when it refuses."""
    try:
        report: dict[str, Any] = json.loads(_ray().get(controller.rebalance.remote(
            plan.to_json(), host_memory_bytes, settle_s)))
    except _ray().exceptions.RayTaskError as err:
        if isinstance(err.cause, RebalanceError):
            raise RebalanceError(str(err.cause)) from None
        raise
    return report


def connect_ray(address: str | None, namespace: str) -> bool:
    """Join the Ray cluster at `address`, or start a light local instance; True if this call started Ray."""
    if _ray().is_initialized():
        return False
    if address is None:
        # An embedded single-machine instance: no dashboard, a small object store (no tensors go
        # through it), and no token auth on a cluster that only this process can reach.
        # address="local": always a new instance, never another cluster found on this machine.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        _ray().init(address="local", namespace=namespace, include_dashboard=False, object_store_memory=200 * 2**20,
                 log_to_driver=False, configure_logging=False)
        return True
    _ray().init(address=address, namespace=namespace, log_to_driver=False, configure_logging=False)
    return False


def load_cluster_model(cfg: ClusterConfig, wrap: ExpertsWrapper | None = None) -> tuple[Mixtral, ExpertCluster]:
    """Start the expert hosts of `cfg` and load the router's weights beside them."""
    model_config = ModelConfig.from_json(cfg.model_dir / "config.json")
    checkpoint = Checkpoint(cfg.model_dir, model_config)
    cluster = ExpertCluster(cfg, model_config)
    experts: Experts = cluster.backend
    try:
        model = Mixtral.load(checkpoint, DTYPES[cfg.resolved_dtype], cfg.resolved_device,
                             wrap(experts) if wrap else experts)
    except Exception:
        cluster.close()
        raise
    return model, cluster
