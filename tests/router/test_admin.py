"""moe.v1.Admin on a real server (loopback, the tiny checkpoint): the load window, placement calls, statuses, auth.

The window itself is tested with an injected clock (no sleeping); the servers check what crosses the wire:
the since-start load equals the router's counter, the local backend has nothing to re-place
(FAILED_PRECONDITION), a malformed plan is INVALID_ARGUMENT, a plan the hosts refuse is FAILED_PRECONDITION,
and the bearer token guards Admin as it guards Generation. The expert hosts are a stand-in with
ExpertCluster's `placement` and `rebalance` (the real re-placement is tested in tests/cluster/).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster.placement import PlacementPlan
from cluster.rebalance import RebalanceError
from protos import admin_pb2, admin_pb2_grpc
from router.admin import NO_HOSTS
from router.api import ServerConfig
from router.expert_load import CountingExperts, LoadWindow, LoadWindowConfig
from tests.serving import ServerHandle, request, rpc_error, start_server

TOKEN = "admin-token-for-tests"
UNAUTHENTICATED = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"
REPORT = {"steps": 2, "seconds": 0.5, "version": 7, "peak_bytes": {"host-0": 10, "host-1": 0}}


# --- the window, with an injected clock ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def identity(layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return hidden


def route_one_token(counter: CountingExperts, second: int) -> None:
    """The token of second s goes to experts s % 4 and (s + 1) % 4 in both layers."""
    ids = torch.tensor([[second % 4, (second + 1) % 4]])
    for layer in range(2):
        counter(layer, torch.zeros(1, 8), ids, torch.full((1, 2), 0.5))


def expected_rows(seconds: range) -> tuple[tuple[int, ...], ...]:
    rows = [0, 0, 0, 0]
    for s in seconds:
        rows[s % 4] += 1
        rows[(s + 1) % 4] += 1
    return (tuple(rows), tuple(rows))


def run_seconds(cfg: LoadWindowConfig, until: int) -> tuple[LoadWindow, Clock]:
    """A token a second for seconds 1..until, sampled after each (as the serve loop samples every second)."""
    clock = Clock()
    counter = CountingExperts(identity, num_layers=2, num_experts=4)  # type: ignore[arg-type]
    window = LoadWindow(counter, cfg, clock)
    for second in range(1, until + 1):
        clock.now = float(second)
        route_one_token(counter, second)
        window.sample()
    return window, clock


def test_counting_restarts_from_zero_after_a_warm_up_whatever_mode_made_its_count() -> None:
    # On a GPU the count moves to the device inside the engine's inference mode; the serve loop resets it
    # after the warm-up, outside that mode (an in-place update of an inference tensor there fails).
    counter = CountingExperts(identity, num_layers=2, num_experts=4)  # type: ignore[arg-type]
    with torch.inference_mode():
        counter(0, torch.zeros(2, 8), torch.tensor([[0, 1], [1, 3]]), torch.ones(2, 2))
        counter.rows = counter.rows.clone()  # what a move to the ids' device makes inside inference mode
    counter.reset()
    assert counter.snapshot().tolist() == [[0] * 4, [0] * 4]
    with torch.inference_mode():
        counter(1, torch.zeros(2, 8), torch.tensor([[0, 1], [1, 3]]), torch.ones(2, 2))
    assert counter.snapshot().tolist() == [[0] * 4, [1, 2, 0, 1]]
    # The move itself, to the device of the ids ("meta" stands in for a GPU here), makes a plain tensor.
    with torch.inference_mode():
        counter(0, torch.zeros(2, 8, device="meta"), torch.zeros(2, 2, dtype=torch.int64, device="meta"),
                torch.ones(2, 2, device="meta"))
    assert counter.rows.device.type == "meta" and not counter.rows.is_inference()


@pytest.mark.parametrize(("window_s", "answered_s", "seconds"), [
    (10.0, 12.0, range(6, 18)),  # the newest snapshot at least 10 s old is t = 5 (snapshots at 0, 5, 10, 15)
    (2.0, 2.0, range(16, 18)),  # t = 15
    (1.0, 2.0, range(16, 18)),  # still t = 15: the window is up to one snapshot spacing longer than asked
    (0.0, 17.0, range(1, 18)),  # since the start
    (100.0, 17.0, range(1, 18)),  # longer than the window has run: everything it has seen
])
def test_a_window_excludes_rows_older_than_its_start_snapshot(window_s: float, answered_s: float,
                                                               seconds: range) -> None:
    window, _ = run_seconds(LoadWindowConfig(interval_s=5.0), until=17)

    load = window.over(window_s)

    assert load.window_s == answered_s
    assert load.rows == expected_rows(seconds)


def test_the_snapshot_ring_is_bounded_and_a_too_long_window_gets_the_oldest_snapshot_held() -> None:
    window, _ = run_seconds(LoadWindowConfig(interval_s=1.0, max_window_s=5.0), until=100)

    load = window.over(50.0)

    assert load.window_s == 6.0 and load.rows == expected_rows(range(95, 101))  # 7 snapshots held: 94..100
    assert window.over(0.0).rows == expected_rows(range(1, 101))


def test_over_samples_on_demand_so_a_later_window_can_start_there() -> None:
    window, clock = run_seconds(LoadWindowConfig(interval_s=5.0), until=3)  # only the start snapshot so far
    clock.now = 6.0
    window.over(0.0)  # takes a snapshot at t = 6 (holding seconds 1..3)
    clock.now = 20.0

    assert window.over(14.0).window_s == 14.0 and window.over(14.0).rows == expected_rows(range(0))


@pytest.mark.parametrize("window_s", [-1.0, math.nan, math.inf])
def test_a_window_must_be_finite_and_not_negative(window_s: float) -> None:
    window, _ = run_seconds(LoadWindowConfig(), until=1)
    with pytest.raises(ValueError, match="must be a finite number of seconds >= 0"):
        window.over(window_s)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(interval_s=0.0), "interval_s=0.0 must be a positive number"),
    (dict(interval_s=10.0, max_window_s=5.0), "max_window_s=5.0 must be finite and at least interval_s"),
])
def test_window_config_is_validated(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoadWindowConfig(**kwargs)


# --- servers -----------------------------------------------------------------------------------------------


class StandInCluster:
    """ExpertCluster's `placement` and `rebalance`, recording calls; refuses with RebalanceError if told to."""

    def __init__(self) -> None:
        self.plan = PlacementPlan.round_robin(2, 4, 2)
        self.calls: list[tuple[PlacementPlan, int | None]] = []
        self.refusal: str | None = None
        self.failure: Exception | None = None  # raised part-way, as a host lost during a step would

    def placement(self) -> PlacementPlan:
        return self.plan

    def rebalance(self, plan: PlacementPlan, host_memory_bytes: int | None = None) -> dict[str, Any]:
        self.calls.append((plan, host_memory_bytes))
        if self.refusal is not None:
            raise RebalanceError(self.refusal)
        if self.failure is not None:
            raise self.failure
        self.plan = plan
        return REPORT


@pytest.fixture(scope="module")
def local(tiny_checkpoint: Path) -> Iterator[ServerHandle]:
    with start_server(tiny_checkpoint) as srv:
        yield srv


@pytest.fixture(scope="module")
def hosted(tiny_checkpoint: Path) -> Iterator[tuple[ServerHandle, StandInCluster]]:
    """A server with expert hosts (a stand-in) and a bearer token."""
    cluster = StandInCluster()
    with start_server(tiny_checkpoint, server=ServerConfig(auth_token=TOKEN), cluster=cluster) as srv:
        yield srv, cluster


def admin(srv: ServerHandle) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(srv.channel())


AUTH = [("authorization", f"Bearer {TOKEN}")]


def test_the_since_start_load_is_the_routers_count_and_a_request_adds_its_tokens(local: ServerHandle) -> None:
    before = admin(local).GetLoad(admin_pb2.GetLoadRequest(), timeout=10)
    local.stub().Generate(request([1, 100, 200, 300, 400], max_new_tokens=3), timeout=30)
    local.wait_idle()

    after = admin(local).GetLoad(admin_pb2.GetLoadRequest(window_s=0), timeout=10)

    assert (after.layers, after.experts, after.experts_per_token) == (2, 4, 2)
    assert [list(layer.rows) for layer in after.load] == local.counting.snapshot().tolist()
    assert after.tokens - before.tokens == 5 + 2  # the prompt, then 2 fed back (the 3rd token is sampled only)
    assert all(sum(layer.rows) == 2 * after.tokens for layer in after.load)
    assert 0 < after.window_s < 120


def test_a_window_longer_than_the_routers_life_is_everything_since_start(local: ServerHandle) -> None:
    local.stub().Generate(request([1, 5, 6], max_new_tokens=1), timeout=30)
    since_start = admin(local).GetLoad(admin_pb2.GetLoadRequest(window_s=0), timeout=10)

    recent = admin(local).GetLoad(admin_pb2.GetLoadRequest(window_s=3600), timeout=10)

    assert recent.load == since_start.load and recent.tokens == since_start.tokens > 0


@pytest.mark.parametrize("window_s", [-1.0, math.nan, math.inf])
def test_a_bad_window_is_invalid_argument(local: ServerHandle, window_s: float) -> None:
    err = rpc_error(lambda: admin(local).GetLoad(admin_pb2.GetLoadRequest(window_s=window_s), timeout=10))

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (f"window_s={window_s} must be a finite number of seconds >= 0 "
                             "(0: since the router started)")


def test_the_local_backend_has_no_placement_to_read_or_change(local: ServerHandle) -> None:
    plan = PlacementPlan.round_robin(2, 4, 2).to_json()
    calls = [lambda: admin(local).GetPlacement(admin_pb2.GetPlacementRequest(), timeout=10),
             lambda: admin(local).Rebalance(admin_pb2.RebalanceRequest(plan_json=plan), timeout=10)]

    for call in calls:
        err = rpc_error(call)
        assert (err.code(), err.details()) == (grpc.StatusCode.FAILED_PRECONDITION, NO_HOSTS)


def test_reflection_describes_the_admin_service(local: ServerHandle) -> None:
    database = ProtoReflectionDescriptorDatabase(local.channel())

    assert "moe.v1.Admin" in set(database.get_services())
    file = database.FindFileContainingSymbol("moe.v1.Admin")
    service = next(s for s in file.service if s.name == "Admin")
    assert {m.name for m in service.method} == {"GetLoad", "GetPlacement", "Rebalance"}


def test_rebalance_hands_the_plan_and_budget_to_the_hosts_and_returns_their_report(
        hosted: tuple[ServerHandle, StandInCluster]) -> None:
    srv, cluster = hosted
    target = PlacementPlan.round_robin(2, 4, 2, replicas=2)
    stub = admin(srv)

    reply = stub.Rebalance(admin_pb2.RebalanceRequest(plan_json=target.to_json(), host_memory_bytes=2**30),
                           timeout=10, metadata=AUTH)
    unlimited = stub.Rebalance(admin_pb2.RebalanceRequest(plan_json=target.to_json()), timeout=10, metadata=AUTH)

    assert json.loads(reply.report_json) == json.loads(unlimited.report_json) == REPORT
    assert cluster.calls[-2:] == [(target, 2**30), (target, None)]
    placement = stub.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=10, metadata=AUTH)
    assert PlacementPlan.from_json(placement.plan_json) == target


@pytest.mark.parametrize(("plan_json", "memory", "message"), [
    ("", None, "plan_json is empty: send a placement plan (the JSON of `moe-cluster plan --out`)"),
    ("{not json", None, "not a placement plan: JSONDecodeError("),
    ('{"layers": 2, "experts": 4, "hosts": []}', None, "not a placement plan: PlacementError('a plan needs at least one host')"),
    ('{"layers": 2, "experts": 4, "hosts": [{"id": "host-0", "experts": [[0, 0]]}]}', None,
     "layer 0 expert 1 has no host in the plan"),
    (PlacementPlan.round_robin(2, 4, 2).to_json(), 0, "host_memory_bytes=0: give a positive budget"),
])
def test_a_malformed_plan_is_invalid_argument_and_reaches_no_host(
        hosted: tuple[ServerHandle, StandInCluster], plan_json: str, memory: int | None, message: str) -> None:
    srv, cluster = hosted
    calls = len(cluster.calls)
    req = admin_pb2.RebalanceRequest(plan_json=plan_json)
    if memory is not None:
        req.host_memory_bytes = memory

    err = rpc_error(lambda: admin(srv).Rebalance(req, timeout=10, metadata=AUTH))

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(message), err.details()
    assert len(cluster.calls) == calls


def test_a_plan_the_hosts_refuse_is_failed_precondition_with_their_reason(
        hosted: tuple[ServerHandle, StandInCluster]) -> None:
    srv, cluster = hosted
    refusal = "no order of steps reaches the plan within 100 bytes per host: give the hosts more memory"
    cluster.refusal = refusal
    try:
        err = rpc_error(lambda: admin(srv).Rebalance(
            admin_pb2.RebalanceRequest(plan_json=PlacementPlan.round_robin(2, 4, 2).to_json(), host_memory_bytes=100),
            timeout=10, metadata=AUTH))
    finally:
        cluster.refusal = None

    assert (err.code(), err.details()) == (grpc.StatusCode.FAILED_PRECONDITION, refusal)


def test_a_replacement_failing_part_way_is_unavailable_and_serving_goes_on(
        hosted: tuple[ServerHandle, StandInCluster]) -> None:
    srv, cluster = hosted
    cluster.failure = RuntimeError("host-1 died while loading layer 3")
    try:
        err = rpc_error(lambda: admin(srv).Rebalance(
            admin_pb2.RebalanceRequest(plan_json=PlacementPlan.round_robin(2, 4, 2).to_json()), timeout=10,
            metadata=AUTH))
    finally:
        cluster.failure = None

    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "host-1 died while loading layer 3" in err.details() and "steps completed so far" in err.details()
    answer = srv.stub().Generate(request([1, 5, 6], max_new_tokens=2), timeout=30, metadata=AUTH)
    assert len(answer.token_ids) == 2


@pytest.mark.parametrize("metadata", [None, [("authorization", "Bearer wrong")]])
def test_the_bearer_token_guards_admin_as_it_guards_generation(
        hosted: tuple[ServerHandle, StandInCluster], metadata: list[tuple[str, str]] | None) -> None:
    srv, cluster = hosted
    calls = len(cluster.calls)
    plan = PlacementPlan.round_robin(2, 4, 2).to_json()
    stub = admin(srv)

    for call in (lambda: stub.GetLoad(admin_pb2.GetLoadRequest(), timeout=10, metadata=metadata),
                 lambda: stub.GetPlacement(admin_pb2.GetPlacementRequest(), timeout=10, metadata=metadata),
                 lambda: stub.Rebalance(admin_pb2.RebalanceRequest(plan_json=plan), timeout=10, metadata=metadata),
                 lambda: srv.stub().Generate(request([1, 2]), timeout=10, metadata=metadata)):
        err = rpc_error(call)
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
    assert len(cluster.calls) == calls
    assert stub.GetLoad(admin_pb2.GetLoadRequest(), timeout=10, metadata=AUTH).layers == 2
