"""The public API over the cluster backend: expert hosts as Ray actors on the session's real 2-node cluster.

2 hosts x 2 replicas (every expert on both hosts), served by `cluster.serve.serve` on a loopback port.
16 concurrent greedy streams; one host process is SIGKILLed (its pid from `hosts_info`) once every stream
is generating: all 16 complete, with the tokens of an undisturbed in-process run.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from cluster.deploy import ExpertCluster
from protos import router_pb2
from tests.raynodes import RayNodes
from tests.serving import ServerHandle, generated_alone, merge, request, serve_on_cluster

pytestmark = pytest.mark.slow

STREAMS = 16
NEW_TOKENS = 48
KILL_AFTER_TOKENS = 6  # every stream has this many tokens when the host dies
PROMPTS = [[1, *range(200 + 53 * i, 200 + 53 * i + 2 + i % 9)] for i in range(STREAMS)]


@pytest.fixture(scope="module")
def served_cluster(ray_cluster: RayNodes, tiny_checkpoint: Path) -> Iterator[tuple[ServerHandle, ExpertCluster]]:
    with serve_on_cluster(tiny_checkpoint, "serving", replicas=2, num_slots=STREAMS) as served:
        yield served


@pytest.fixture(scope="module")
def undisturbed(tiny_checkpoint: Path) -> list[list[int]]:
    """Each prompt alone, every expert in this process."""
    return generated_alone(tiny_checkpoint, PROMPTS, NEW_TOKENS)


def test_model_info_and_health_describe_the_cluster(served_cluster: tuple[ServerHandle, ExpertCluster]) -> None:
    srv, _ = served_cluster
    info = srv.stub().ModelInfo(router_pb2.ModelInfoRequest(), timeout=10)
    assert (info.backend, info.num_hosts, info.replicas, info.num_experts) == ("cluster", 2, 2, 4)
    health = health_pb2_grpc.HealthStub(srv.channel())
    deadline = time.monotonic() + 10
    while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "health never turned SERVING with every host up"
        time.sleep(0.1)


def test_16_streams_complete_unchanged_when_an_expert_host_is_killed(
        served_cluster: tuple[ServerHandle, ExpertCluster], undisturbed: list[list[int]]) -> None:
    srv, cluster = served_cluster
    victim = next(h for h in cluster.hosts_info() if h["host_id"] == "host-1")
    version = cluster.backend.table.version
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
        except Exception as err:  # reported with the stream's index below
            results[i] = err

    threads = [threading.Thread(target=client, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while min(len(t) for t in tokens) < KILL_AFTER_TOKENS:
        assert time.monotonic() < deadline, "the streams did not start"
        time.sleep(0.005)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = [len(t) for t in tokens]
    for t in threads:
        t.join(180)

    assert max(killed_at) < NEW_TOKENS, f"a stream had finished before the kill: {killed_at}"
    for i, (result, want) in enumerate(zip(results, undisturbed)):
        assert isinstance(result, router_pb2.GenerateResponse), f"stream {i}: {result!r}"
        assert list(result.token_ids) == want, f"stream {i} differs from the undisturbed run"
        assert result.finish_reason == router_pb2.FINISH_REASON_LENGTH
    assert cluster.backend.table.version > version, "the router never noticed the dead host"
    srv.wait_idle()
    # The expert rows were counted around the remote backend: every fed token, top-2, in each layer.
    fed = sum(len(p) + NEW_TOKENS - 1 for p in PROMPTS)
    rows = srv.counting.rows
    assert int(rows[0].sum()) == int(rows[1].sum()) == 2 * fed
    assert b"moe_requests_total" in generate_latest(srv.served.metrics.registry)
