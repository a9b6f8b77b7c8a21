"""RemoteExperts against real ExpertService hosts on loopback: routing-table changes of a live re-placement.

Host A serves every expert of the tiny checkpoint's layers; host B only layer 0's experts 1 and 3.
The routing table comes from a plain function standing in for the controller, so each test decides
which table a router holds and which one a refresh returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from experts.service import ExpertServerConfig, ExpertServiceServicer, ServingThread
from experts.weights import load_shard
from mixtral.checkpoint import Checkpoint
from mixtral.config import ModelConfig
from mixtral.expert import group_by_expert, moe_combine
from mixtral.gate import route
from router.dispatch import DispatchConfig, RemoteExperts, RoutingTable

E = 4


@pytest.fixture(scope="module")
def hosts(tiny_checkpoint: Path) -> Iterator[dict[str, str]]:
    """{"A": endpoint, "B": endpoint} and the full shard's servers, stopped at the end."""
    model = ModelConfig.from_json(tiny_checkpoint / "config.json")
    checkpoint = Checkpoint(tiny_checkpoint, model)
    shards = {"A": [(layer, e) for layer in range(2) for e in range(E)], "B": [(0, 1), (0, 3)]}
    servers = {name: ServingThread.start(ExpertServiceServicer(load_shard(checkpoint, entries, torch.float32), model,
                                                               name, torch.float32, torch.device("cpu")),
                                         ExpertServerConfig()) for name, entries in shards.items()}
    yield {name: f"127.0.0.1:{s.port}" for name, s in servers.items()}
    for server in servers.values():
        server.stop(grace_s=0)


def table(version: int, routes: dict[tuple[int, int], list[str]]) -> RoutingTable:
    return RoutingTable(version, {key: tuple(endpoints) for key, endpoints in routes.items()})


def every_expert_on(endpoint: str) -> dict[tuple[int, int], list[str]]:
    return {(layer, e): [endpoint] for layer in range(2) for e in range(E)}


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
    try:
        hidden, ids, weights = rows()
        out = backend(0, hidden, ids, weights)
    finally:
        backend.close()

    torch.testing.assert_close(out, local_answer(tiny_checkpoint, hidden, ids, weights), rtol=0, atol=1e-5)
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
