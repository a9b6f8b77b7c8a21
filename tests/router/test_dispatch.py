"""RemoteExperts against real ExpertService hosts on loopback: routing-table changes of a live re-placement.

Host A serves every expert of the tiny checkpoint's layers; host B only layer 0's experts 1 and 3.
The routing table comes from a plain function standing in for the controller, so each test decides
which table a router holds and which one a refresh returns. A hung host is a real one whose single
compute worker is held busy, so its calls queue until the test lets it go.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from experts.service import ExpertServerConfig, ExpertServiceServicer, ServingThread
from experts.weights import load_shard
from mixtral.checkpoint import Checkpoint
from mixtral.config import ModelConfig
from mixtral.expert import group_by_expert, moe_combine
from mixtral.gate import route
from router.dispatch import DispatchConfig, RemoteExperts, RoutingTable
from router.expert_client import ExpertClient
from tests.freezing_proxy import FreezingProxy

E = 4


EVERY_EXPERT = [(layer, e) for layer in range(2) for e in range(E)]


def servicer(tiny_checkpoint: Path, name: str, entries: list[tuple[int, int]]) -> ExpertServiceServicer:
    """A float32 host of the tiny checkpoint's `entries`, not started."""
    model = ModelConfig.from_json(tiny_checkpoint / "config.json")
    shard = load_shard(Checkpoint(tiny_checkpoint, model), entries, torch.float32)
    return ExpertServiceServicer(shard, model, name, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def hosts(tiny_checkpoint: Path) -> Iterator[dict[str, str]]:
    """{"A": endpoint, "B": endpoint} and the full shard's servers, stopped at the end."""
    shards = {"A": EVERY_EXPERT, "B": [(0, 1), (0, 3)]}
    servers = {name: ServingThread.start(servicer(tiny_checkpoint, name, entries), ExpertServerConfig())
               for name, entries in shards.items()}
    yield {name: f"127.0.0.1:{s.port}" for name, s in servers.items()}
    for server in servers.values():
        server.stop(grace_s=0)


@pytest.fixture
def hung(tiny_checkpoint: Path) -> Iterator[tuple[str, threading.Event]]:
    """(endpoint, release) of a host serving every expert whose calls wait until `release` is set."""
    host = servicer(tiny_checkpoint, "hung", EVERY_EXPERT)
    release = threading.Event()
    host._worker.submit(release.wait)  # its one compute thread is busy until released
    server = ServingThread.start(host, ExpertServerConfig())
    yield f"127.0.0.1:{server.port}", release
    release.set()
    server.stop(grace_s=0)


def table(version: int, routes: dict[tuple[int, int], list[str]]) -> RoutingTable:
    return RoutingTable(version, {key: tuple(endpoints) for key, endpoints in routes.items()})


def every_expert_on(endpoint: str) -> dict[tuple[int, int], list[str]]:
    return {key: [endpoint] for key in EVERY_EXPERT}


def local_answer(tiny_checkpoint: Path, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                 ) -> torch.Tensor:
    model = ModelConfig.from_json(tiny_checkpoint / "config.json")
    shard = load_shard(Checkpoint(tiny_checkpoint, model), [(0, e) for e in range(E)], torch.float32)
    return moe_combine(hidden, group_by_expert(ids, weights, E), shard.layer(0))


def rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(12, 64, generator=g)
    weights, ids = route(torch.randn(12, E, generator=g), 2)
    return hidden, ids, weights


def assert_layer_0_answered(backend: RemoteExperts, tiny_checkpoint: Path) -> None:
    """One layer-0 call through `backend` (closed afterwards) equals the local combine of the same rows."""
    hidden, ids, weights = rows()
    try:
        out = backend(0, hidden, ids, weights)
    finally:
        backend.close()
    torch.testing.assert_close(out, local_answer(tiny_checkpoint, hidden, ids, weights), rtol=0, atol=1e-5)


def test_a_host_that_no_longer_serves_an_expert_sends_its_rows_to_the_new_one(
        hosts: dict[str, str], tiny_checkpoint: Path) -> None:
    """The router's table still lists B for layer 0 (it moved to A): B answers FAILED_PRECONDITION,
    the router refreshes and gets every row answered, with no error."""
    stale = every_expert_on(hosts["A"]) | {(0, 1): [hosts["B"]], (0, 3): [hosts["B"]], (0, 0): [hosts["B"]]}
    fetched: list[bool] = []

    def fetch(probe: bool) -> RoutingTable:
        fetched.append(probe)
        return table(1, stale) if len(fetched) == 1 else table(2, every_expert_on(hosts["A"]))

    backend = RemoteExperts(fetch, E, DispatchConfig(restart_wait_s=5))

    assert_layer_0_answered(backend, tiny_checkpoint)
    assert fetched == [False, True] and backend.table.version == 2


def test_the_table_is_reread_between_steps_once_it_is_old(hosts: dict[str, str]) -> None:
    versions = iter(range(1, 100))
    backend = RemoteExperts(lambda probe: table(next(versions), every_expert_on(hosts["A"])), E,
                            DispatchConfig(table_max_age_s=0.05))
    try:
        hidden, ids, weights = rows()
        for layer in (0, 1):
            backend(layer, hidden, ids, weights)
        assert backend.table.version == 1, "a fresh table is not re-read"
        backend.table_read_at -= 1.0  # the table is now a second old
        backend(1, hidden, ids, weights)
        assert backend.table.version == 1, "never re-read in the middle of a step"
        backend(0, hidden, ids, weights)
        assert backend.table.version == 2
    finally:
        backend.close()


def on_the_wire(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch as RemoteExperts sends it: int32 expert ids."""
    return hidden, ids.to(torch.int32), weights


def test_answers_on_one_stream_come_back_to_their_own_requests(hosts: dict[str, str], tiny_checkpoint: Path) -> None:
    client = ExpertClient(hosts["A"], 2**24)
    try:
        batches = [on_the_wire(*rows(seed)) for seed in range(3)]
        pending = [client.dispatch(0, *batch, timeout_s=10) for batch in batches]  # all in flight at once

        answers = [ExpertClient.output(p.result()) for p in reversed(pending)]  # collected out of order
    finally:
        client.close()

    for answer, batch in zip(reversed(answers), batches, strict=True):
        torch.testing.assert_close(answer, local_answer(tiny_checkpoint, *batch), rtol=0, atol=1e-5)


def test_a_refused_request_fails_alone_and_the_next_one_opens_a_new_stream(
        hosts: dict[str, str], tiny_checkpoint: Path) -> None:
    client = ExpertClient(hosts["B"], 2**24)
    hidden, _, weights = rows()
    ids = torch.tensor([[1, 3], [3, -1]] * 6, dtype=torch.int32)
    try:
        refused = client.dispatch(1, hidden, ids, weights, timeout_s=10)  # B serves no expert of layer 1
        with pytest.raises(grpc.RpcError) as caught:
            refused.result()
        answer = ExpertClient.output(client.dispatch(0, hidden, ids, weights, timeout_s=10).result())
    finally:
        client.close()

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "layer 1" in caught.value.details()
    torch.testing.assert_close(answer, local_answer(tiny_checkpoint, hidden, ids, weights), rtol=0, atol=1e-5)


def test_failed_streams_leave_no_thread_behind(hosts: dict[str, str]) -> None:
    """Each refused request ends its stream; grpc's thread that fed that stream's requests must end too."""
    client = ExpertClient(hosts["B"], 2**24)
    hidden, _, weights = rows()
    ids = torch.tensor([[1, 3]] * 12, dtype=torch.int32)
    try:
        client.dispatch(0, hidden, ids, weights, timeout_s=10).result()
        time.sleep(0.2)
        before = threading.active_count()
        for _ in range(20):
            with pytest.raises(grpc.RpcError):
                client.dispatch(1, hidden, ids, weights, timeout_s=10).result()  # B serves no layer 1
        deadline = time.monotonic() + 5
        while threading.active_count() > before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = threading.active_count()
    finally:
        client.close()

    assert after <= before + 2, f"{after - before} more threads after 20 failed streams"


# gRPC's client sends at most one ping a second while no data flows, and a host ends the connection at the
# third ping that came sooner than it allows after another: here 4 s into the silence, so 7 s leave room.
IDLE_S = 7.0


def idle_then_dispatch(endpoint: str) -> tuple[bool, grpc.StatusCode | None]:
    """A client that pings after 0.1 s without traffic: one request, IDLE_S of silence, one more request ->
    (whether the second went out on the first one's stream, the second's error code or None)."""
    client = ExpertClient(endpoint, 2**24, keepalive_s=0.1, keepalive_timeout_s=1.0)
    batch = on_the_wire(*rows())
    try:
        client.dispatch(0, *batch, timeout_s=10).result()
        first = client._stream
        time.sleep(IDLE_S)
        try:
            client.dispatch(0, *batch, timeout_s=10).result()
            return client._stream is first, None
        except grpc.RpcError as err:
            return False, err.code()
    finally:
        client.close()


def test_an_idle_stream_stays_open_under_keepalive_pings_the_host_accepts(tiny_checkpoint: Path) -> None:
    server = ServingThread.start(servicer(tiny_checkpoint, "pinged", [(0, e) for e in range(E)]),
                                 ExpertServerConfig(min_ping_interval_s=0.05))
    try:
        same_stream, error = idle_then_dispatch(f"127.0.0.1:{server.port}")
    finally:
        server.stop(grace_s=0)

    assert (same_stream, error) == (True, None)


def test_a_host_refuses_pings_more_often_than_its_min_interval(hosts: dict[str, str]) -> None:
    """The control of the test above: the client does ping while idle, and a host left at its 10 s minimum
    ends the connection (gRPC's GOAWAY "too_many_pings"), so the stream's next request fails over."""
    same_stream, error = idle_then_dispatch(hosts["A"])

    assert (same_stream, error) == (False, grpc.StatusCode.UNAVAILABLE)


def test_a_host_whose_network_path_drops_in_silence_fails_the_next_layer_within_the_keepalive(
        tiny_checkpoint: Path) -> None:
    """Pings after 0.5 s without traffic, answered within 0.5 s or the connection is closed: a request sent
    into a path that drops everything fails UNAVAILABLE about 1 s later (failover can act), not at its
    10 s deadline."""
    server = ServingThread.start(servicer(tiny_checkpoint, "behind-a-link", [(0, e) for e in range(E)]),
                                 ExpertServerConfig())
    proxy = FreezingProxy(server.port)
    client = ExpertClient(f"127.0.0.1:{proxy.port}", 2**24, keepalive_s=0.5, keepalive_timeout_s=0.5)
    batch = on_the_wire(*rows())
    try:
        client.dispatch(0, *batch, timeout_s=10).result()
        proxy.freeze()
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            client.dispatch(0, *batch, timeout_s=10).result()
        waited = time.monotonic() - start
    finally:
        client.close()
        proxy.close()
        server.stop(grace_s=0)

    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE and waited < 5, (failed.value.code(), waited)


def test_keepalive_settings_must_be_whole_milliseconds_grpc_can_hold() -> None:
    for bad in (0.0, 1e-4, -1.0, float("inf"), float("nan"), 3e6):
        with pytest.raises(ValueError, match="keepalive_s"):
            DispatchConfig(keepalive_s=bad)
        with pytest.raises(ValueError, match="min_ping_interval_s"):
            ExpertServerConfig(min_ping_interval_s=bad)


def test_a_host_that_misses_the_deadline_fails_with_deadline_exceeded_then_serves_again(
        hosts: dict[str, str], hung: tuple[str, threading.Event], tiny_checkpoint: Path) -> None:
    """The hung host's request fails at its deadline; the healthy host's answer, which arrived in time
    while the router waited on the hung one, is still good when read after the deadline."""
    endpoint, release = hung
    stuck, healthy = ExpertClient(endpoint, 2**24), ExpertClient(hosts["A"], 2**24)
    batch = on_the_wire(*rows())
    try:
        started = time.monotonic()
        late, in_time = stuck.dispatch(0, *batch, timeout_s=0.3), healthy.dispatch(0, *batch, timeout_s=0.3)
        with pytest.raises(grpc.RpcError) as caught:
            late.result()
        waited = time.monotonic() - started
        answered = ExpertClient.output(in_time.result())
        release.set()
        answer = ExpertClient.output(stuck.dispatch(0, *batch, timeout_s=10).result())
    finally:
        stuck.close()
        healthy.close()

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value.details()
    assert endpoint in caught.value.details()
    assert 0.3 <= waited < 5.0
    for output in (answered, answer):
        torch.testing.assert_close(output, local_answer(tiny_checkpoint, *batch), rtol=0, atol=1e-5)


def test_the_rows_of_a_hung_replica_go_to_the_other_one_after_the_deadline(
        hosts: dict[str, str], hung: tuple[str, threading.Event], tiny_checkpoint: Path) -> None:
    endpoint, _ = hung
    both = {key: [endpoint, hosts["A"]] for key in every_expert_on(hosts["A"])}  # the hung one is tried first
    backend = RemoteExperts(lambda probe: table(1, both), E, DispatchConfig(call_timeout_s=0.3, restart_wait_s=5))

    assert_layer_0_answered(backend, tiny_checkpoint)


def test_each_expert_goes_whole_to_its_least_loaded_replica_biggest_first() -> None:
    both = {(0, e): ["a:1", "b:1"] for e in range(E)}
    backend = RemoteExperts(lambda probe: table(1, both), E)
    ids = torch.tensor([[0, 1]] * 5 + [[2, 0]] * 2 + [[3, 2]])  # slots: expert 0: 7, 1: 5, 2: 3, 3: 1
    everything = torch.ones(ids.shape, dtype=torch.bool)

    def experts_of(masks: dict[str, torch.Tensor]) -> dict[str, set[int]]:
        assert int(sum(m.int() for m in masks.values()).max()) == 1, "a slot went to two hosts"
        return {endpoint: set(ids[mask].tolist()) for endpoint, mask in masks.items()}

    # 0 (7 slots) -> a; 1 (5) -> b; 2 (3) -> b, at 5 rows against a's 7; 3 (1) -> a, at 7 against 8
    assert experts_of(backend.assign(0, ids, everything, set())) == {"a:1": {0, 3}, "b:1": {1, 2}}
    not_expert_0 = everything & (ids != 0)  # expert 0's slots already answered: 1 -> a, 2 -> b, 3 -> b (3 < 5)
    assert experts_of(backend.assign(0, ids, not_expert_0, set())) == {"a:1": {1}, "b:1": {2, 3}}
    backend.outstanding["a:1"] = 100  # rows still in flight on a
    assert experts_of(backend.assign(0, ids, everything, set())) == {"b:1": {0, 1, 2, 3}}
    assert experts_of(backend.assign(0, ids, everything, {"b:1"})) == {"a:1": {0, 1, 2, 3}}
    assert backend.assign(0, ids, everything, {"a:1", "b:1"}) is None
