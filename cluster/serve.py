"""The `moe-cluster serve` process: engine thread, public gRPC server, metrics endpoint, health, drain.

SIGTERM (or SIGINT): health turns NOT_SERVING, new requests get UNAVAILABLE, running and queued
requests finish within the grace period, the server stops, the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import start_http_server

from cluster.deploy import ExpertCluster, build_engine
from cluster.placement import PlacementError, PlacementPlan
from cluster.rebalance import RebalanceError
from mixtral.model import Mixtral
from protos import router_pb2
from router import admin
from router.admin import AdminService, InvalidPlanError, PlacementControl, RebalanceRefusedError
from router.api import GenerationService, PublicServer, ServerConfig, build_server
from router.engine import EngineConfig
from router.expert_load import CountingExperts, LoadWindow, LoadWindowConfig
from router.kv_cache import CacheConfig
from router.metrics import Metrics
from router.scheduler import Scheduler, SchedulerConfig
from router.tokenizer import Tokenizer

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything `moe-cluster serve` runs with, apart from where the experts are."""

    server: ServerConfig = field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    metrics_port: int | None = 9090  # None: no metrics endpoint
    load_window: LoadWindowConfig = field(default_factory=LoadWindowConfig)  # Admin.GetLoad's snapshots
    grace_s: float = 30.0
    model_name: str = "mixtral"  # the model's name in KServe v2 requests (the model directory's name)
    warm_up: bool | None = None  # one full-size step before serving (Engine.warm_up); None: on a GPU only

    def __post_init__(self) -> None:
        if self.grace_s < 0:
            raise ValueError(f"grace_s={self.grace_s} must be >= 0")


@dataclass
class Served:
    """What a running server exposes to its owner (tests, the CLI)."""

    public: PublicServer
    scheduler: Scheduler
    metrics: Metrics
    stop: asyncio.Event
    load: LoadWindow


async def serve(model: Mixtral, counting: CountingExperts, tokenizer: Tokenizer, cfg: ServeConfig,
                info: router_pb2.ModelInfoResponse, is_healthy: Callable[[], bool],
                on_ready: Callable[[Served], None] | None = None, cluster: ExpertCluster | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `Served.stop` is set), then drain and return.

    `cluster`: the expert hosts (cluster backend), which Admin.GetPlacement and Rebalance act on;
    None: the local backend, where they answer FAILED_PRECONDITION.
    """
    engine = build_engine(model, cfg.cache, cfg.engine)
    if cfg.warm_up if cfg.warm_up is not None else model.device.type == "cuda":
        started = time.monotonic()
        sequences, length = engine.warm_up()
        counting.reset()
        log.info("warmed up in %.2f s: %d sequences of %d prompt tokens, then a decode step",
                 time.monotonic() - started, sequences, length)
    scheduler = Scheduler(engine, cfg.scheduler)
    scheduler.start()
    metrics = Metrics()
    generation = GenerationService(scheduler, tokenizer, info, cfg.server.limits, metrics, cfg.server.guardrail,
                                   cfg.server.log_content)
    # Imported here, not at the top: protos.kserve_pb2 defines package `inference`, as tritonclient's stubs do, and
    # protobuf refuses both in one process; importing cluster.serve (e.g. via cluster.cli) should not claim it.
    from router.kserve import KServeService, add_to_server

    kserve = KServeService(generation, cfg.model_name, lambda: is_healthy() and not scheduler.is_draining)
    load = LoadWindow(counting, cfg.load_window)
    control = placement_control(cluster) if cluster is not None else None
    admin_service = AdminService(load, model.config.num_experts_per_tok, control)
    public = await build_server(generation, cfg.server, extra=(add_to_server(kserve),
                                                               admin.add_to_server(admin_service)))
    http = start_http_server(cfg.metrics_port, registry=metrics.registry) if cfg.metrics_port is not None else None
    served = Served(public, scheduler, metrics, asyncio.Event(), load)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(RuntimeError, ValueError):  # not the main thread (tests): no signals
            loop.add_signal_handler(sig, served.stop.set)
    watcher = asyncio.create_task(_watch(served, counting, is_healthy))
    if on_ready is not None:
        on_ready(served)
    await served.stop.wait()
    await _drain(served, watcher, cfg.grace_s, http)


async def _watch(served: Served, counting: CountingExperts, is_healthy: Callable[[], bool]) -> None:
    """Keep health and gauges current: SERVING only while every expert has a live host."""
    loop = asyncio.get_running_loop()
    serving: bool | None = None
    while True:
        healthy = await loop.run_in_executor(None, is_healthy)
        if healthy != serving:
            serving = healthy
            await served.public.set_serving(healthy)
            log.info("health: %s", "SERVING" if healthy else "NOT_SERVING")
        _update_gauges(served, counting)
        served.load.sample()
        await asyncio.sleep(HEALTH_INTERVAL_S)


def _update_gauges(served: Served, counting: CountingExperts) -> None:
    m, scheduler = served.metrics, served.scheduler
    m.queue_depth.set(scheduler.num_waiting)
    m.running.set(scheduler.num_running)
    m.free_slots.set(scheduler.engine.cache.num_free)
    for (layer, expert), rows in _nonzero(counting):
        m.expert_rows.labels(layer=str(layer), expert=str(expert)).set(rows)


def _nonzero(counting: CountingExperts) -> list[tuple[tuple[int, int], int]]:
    rows = counting.snapshot()
    return [((int(layer), int(expert)), int(rows[layer, expert])) for layer, expert in rows.nonzero().tolist()]


def placement_control(cluster: ExpertCluster) -> PlacementControl:
    """Admin's view of the expert hosts: the plan they serve, and re-placement with cluster errors
    turned into the admin service's (a malformed plan: InvalidPlanError; one the hosts cannot reach:
    RebalanceRefusedError)."""

    def rebalance(plan_json: str, host_memory_bytes: int | None) -> str:
        try:
            plan = PlacementPlan.from_json(plan_json)
            plan.validate()
        except PlacementError as err:
            raise InvalidPlanError(str(err)) from None
        try:
            return json.dumps(cluster.rebalance(plan, host_memory_bytes))
        except RebalanceError as err:
            raise RebalanceRefusedError(str(err)) from None

    return PlacementControl(placement=lambda: cluster.placement().to_json(), rebalance=rebalance)


async def _drain(served: Served, watcher: asyncio.Task[Any], grace_s: float, http: Any) -> None:
    log.info("draining: refusing new requests, finishing running ones within %.0f s", grace_s)
    watcher.cancel()
    await served.public.set_serving(False)
    await asyncio.get_running_loop().run_in_executor(None, served.scheduler.stop, grace_s)
    await served.public.server.stop(grace=1.0)
    if http is not None:
        http[0].shutdown()
    log.info("stopped")
