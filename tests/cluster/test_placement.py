"""Placement plans: round-robin covers every expert evenly, validation names what is wrong, JSON round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.placement import HostPlan, PlacementError, PlacementPlan


@given(layers=st.integers(1, 6), experts=st.integers(1, 16), hosts=st.integers(1, 8), data=st.data())
def test_round_robin_covers_every_expert_with_distinct_replicas_and_spreads_each_layer(
        layers: int, experts: int, hosts: int, data: st.DataObject) -> None:
    replicas = data.draw(st.integers(1, hosts))
    plan = PlacementPlan.round_robin(layers, experts, hosts, replicas)
    plan.validate()
    for layer in range(layers):
        for expert in range(experts):
            owners = plan.replicas(layer, expert)
            assert len(owners) == len(set(owners)) == replicas
        per_host = [sum(1 for lyr, _ in h.entries if lyr == layer) for h in plan.hosts]
        assert max(per_host) - min(per_host) <= 1


def test_worked_example_eight_experts_on_two_hosts() -> None:
    plan = PlacementPlan.round_robin(num_layers=2, num_experts=8, num_hosts=2)
    assert [e for lyr, e in plan.hosts[0].entries if lyr == 1] == [0, 2, 4, 6]
    assert plan.replicas(1, 3) == ["host-1"]


def test_a_missing_expert_is_named() -> None:
    plan = PlacementPlan(1, 2, (HostPlan("a", ((0, 0),)),))
    with pytest.raises(PlacementError, match="layer 0 expert 1 has no host"):
        plan.validate()


def test_a_host_over_its_memory_budget_is_named() -> None:
    plan = PlacementPlan.round_robin(2, 4, 2)
    plan.validate(expert_bytes=100, host_memory_bytes=400)
    with pytest.raises(PlacementError, match="host-0: 4 experts need 400 bytes, more than its memory budget of 399"):
        plan.validate(expert_bytes=100, host_memory_bytes=399)


def test_an_entry_outside_the_model_is_named() -> None:
    plan = PlacementPlan(1, 2, (HostPlan("a", ((0, 0), (0, 1), (3, 0))),))
    with pytest.raises(PlacementError, match="a: entry \\(layer 3, expert 0\\) is outside"):
        plan.validate()


@pytest.mark.parametrize(("hosts", "replicas", "message"), [(0, 1, "hosts=0"), (2, 3, "replicas=3")])
def test_impossible_round_robin_is_refused(hosts: int, replicas: int, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        PlacementPlan.round_robin(2, 4, hosts, replicas)


def test_json_round_trip_and_bad_files(tmp_path: Path) -> None:
    plan = PlacementPlan.round_robin(3, 8, 3, replicas=2)
    plan.save(tmp_path / "plan.json")
    assert PlacementPlan.load(tmp_path / "plan.json") == plan
    (tmp_path / "bad.json").write_text('{"layers": 1}')
    with pytest.raises(PlacementError, match=r"bad\.json: not a placement plan"):
        PlacementPlan.load(tmp_path / "bad.json")
    with pytest.raises(PlacementError, match="unique"):
        PlacementPlan(1, 1, (HostPlan("a", ((0, 0),)), HostPlan("a", ((0, 0),))))
