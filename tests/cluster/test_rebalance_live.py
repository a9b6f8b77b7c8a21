"""Live re-placement on the session's real 2-node Ray cluster, under 16 concurrent streams.

The cluster starts round-robin (host-0 serves experts 0 and 2 of both layers, host-1 experts 1 and 3).
The new plan moves layer 0's experts 1 and 3 to host-0 (host-1 then serves nothing of layer 0) and
replicates layer 1's expert 0 on both hosts. It is applied while 16 greedy streams run: every stream
must finish with the tokens of an undisturbed in-process run, and afterwards the hosts' own row
counters (their Describe RPC) must show rows going where the new plan says.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cluster.deploy import ExpertCluster
from cluster.placement import HostPlan, PlacementPlan
from cluster.rebalance import RebalanceError
from mixtral.block import Experts
from mixtral.config import ModelConfig
from protos import expert_pb2, expert_pb2_grpc, router_pb2
from tests.raynodes import RayNodes
from tests.serving import ServerHandle, SlowExperts, generated_alone, merge, request, serve_on_cluster

pytestmark = pytest.mark.slow

STREAMS = 16
NEW_TOKENS = 80  # about 5 s of steps: longer than the re-placement (its drop waits 2 s to settle)
PROMPTS = [[1, *range(300 + 37 * i, 300 + 37 * i + 3 + i % 7)] for i in range(STREAMS)]
LAYER_DELAY_S = 0.03  # steps of about 60 ms: the streams outlast the re-placement
TARGET = {"host-0": [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 2)], "host-1": [(1, 0), (1, 1), (1, 3)]}


@pytest.fixture(scope="module")
def served(ray_cluster: RayNodes, tiny_checkpoint: Path) -> Iterator[tuple[ServerHandle, ExpertCluster]]:
    def slow(experts: Experts) -> Experts:
        return SlowExperts(experts, LAYER_DELAY_S)

    with serve_on_cluster(tiny_checkpoint, "rebalance", replicas=1, num_slots=STREAMS, wrap=slow) as served:
        yield served


@pytest.fixture(scope="module")
def undisturbed(tiny_checkpoint: Path) -> list[list[int]]:
    """Each prompt alone, every expert in this process."""
    return generated_alone(tiny_checkpoint, PROMPTS, NEW_TOKENS)


def target_plan() -> PlacementPlan:
    return PlacementPlan(2, 4, tuple(HostPlan(h, tuple(e)) for h, e in TARGET.items()))


def run_streams(srv: ServerHandle, during: Any = None, after_tokens: int = 4) -> tuple[list[Any], list[int]]:
    """16 concurrent streams; `during()` runs once each has `after_tokens` tokens. Returns (results,
    tokens each stream had when `during` returned)."""
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    results: list[Any] = [None] * STREAMS
    barrier = threading.Barrier(STREAMS)

    def client(i: int) -> None:
        stub = srv.stub()
        barrier.wait()
        parts = []
        try:
            for part in stub.GenerateStream(request(PROMPTS[i], max_new_tokens=NEW_TOKENS), timeout=120):
                parts.append(part)
                tokens[i].extend(part.token_ids)
            results[i] = merge(parts)
        except Exception as err:  # reported with the stream's index by the caller
            results[i] = err

    threads = [threading.Thread(target=client, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    progress_at_end: list[int] = []
    if during is not None:
        deadline = time.monotonic() + 60
        while min(len(t) for t in tokens) < after_tokens:
            assert time.monotonic() < deadline, "the streams did not start"
            time.sleep(0.005)
        during()
        progress_at_end = [len(t) for t in tokens]
    for t in threads:
        t.join(180)
    return results, progress_at_end


def assert_undisturbed(results: list[Any], undisturbed: list[list[int]]) -> None:
    for i, (result, want) in enumerate(zip(results, undisturbed, strict=True)):
        assert isinstance(result, router_pb2.GenerateResponse), f"stream {i}: {result!r}"
        assert list(result.token_ids) == want, f"stream {i} differs from the undisturbed run"


def rows_by_host(cluster: ExpertCluster) -> dict[str, dict[tuple[int, int], int]]:
    """Rows each host computed per (layer, expert), from its own Describe RPC."""
    rows = {}
    for host in cluster.hosts_info():
        with grpc.insecure_channel(host["endpoint"]) as channel:
            info = expert_pb2_grpc.ExpertServiceStub(channel).Describe(expert_pb2.DescribeRequest(), timeout=10)
        rows[host["host_id"]] = {(e.layer, e.expert): e.rows_served for e in info.experts}
    return rows


def delta(before: dict[str, dict[tuple[int, int], int]], after: dict[str, dict[tuple[int, int], int]]
          ) -> dict[str, dict[tuple[int, int], int]]:
    return {h: {entry: n - before[h].get(entry, 0) for entry, n in held.items()} for h, held in after.items()}


def test_a_plan_that_does_not_fit_the_memory_is_refused_and_nothing_changes(
        served: tuple[ServerHandle, ExpertCluster]) -> None:
    _, cluster = served
    before = cluster.placement()
    expert_bytes = ModelConfig.from_json(cluster.cfg.model_dir / "config.json").expert_num_params * 4

    with pytest.raises(RebalanceError, match="bytes per host"):
        cluster.rebalance(target_plan(), host_memory_bytes=4 * expert_bytes)

    assert cluster.placement() == before


def test_16_streams_keep_their_tokens_while_experts_move_and_replicate(
        served: tuple[ServerHandle, ExpertCluster], undisturbed: list[list[int]]) -> None:
    srv, cluster = served
    reports: list[dict[str, Any]] = []

    results, progress = run_streams(srv, during=lambda: reports.append(cluster.rebalance(target_plan())))

    assert max(progress) < NEW_TOKENS, f"a stream had finished before the re-placement did: {progress}"
    assert reports[0]["steps"] >= 3
    assert_undisturbed(results, undisturbed)
    assert {h.host_id: sorted(h.entries) for h in cluster.placement().hosts} == TARGET

    # Measured, not predicted: with the streams done, a fresh run's rows land where the plan says.
    srv.wait_idle()
    before = rows_by_host(cluster)
    results, _ = run_streams(srv)
    assert_undisturbed(results, undisturbed)
    moved = delta(before, rows_by_host(cluster))
    assert {entry for entry in moved["host-1"] if entry[0] == 0} == set(), "host-1 still serves layer 0"
    assert all(moved["host-0"][(0, e)] > 0 for e in range(4))
    assert moved["host-0"][(1, 0)] > 0 and moved["host-1"][(1, 0)] > 0, "the replicas of layer 1 expert 0 split rows"
    fed = sum(len(p) + NEW_TOKENS - 1 for p in PROMPTS)  # tokens through the model: 2 layers x top-2 rows each
    assert sum(moved["host-0"].values()) + sum(moved["host-1"].values()) == 2 * 2 * fed


def test_a_host_restarted_after_a_replacement_reloads_its_new_experts(
        served: tuple[ServerHandle, ExpertCluster], undisturbed: list[list[int]]) -> None:
    srv, cluster = served
    if {h.host_id: sorted(h.entries) for h in cluster.placement().hosts} != TARGET:
        cluster.rebalance(target_plan())
    victim = next(h for h in cluster.hosts_info() if h["host_id"] == "host-0")

    os.kill(victim["pid"], signal.SIGKILL)  # Ray restarts it with its constructor's (round-robin) entries
    results, _ = run_streams(srv)

    assert_undisturbed(results, undisturbed)
    restarted = next(h for h in cluster.hosts_info() if h["host_id"] == "host-0")
    assert restarted["pid"] != victim["pid"]
    assert sorted(rows_by_host(cluster)["host-0"]) == TARGET["host-0"]
