"""The order of a live re-placement (cluster.rebalance.plan_steps), pure: no Ray."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.placement import Entry, HostPlan, PlacementPlan
from cluster.rebalance import RebalanceError, Step, plan_steps

LAYERS, EXPERTS = 3, 4
BYTES = 10


def plan(*hosts: set[Entry]) -> PlacementPlan:
    return PlacementPlan(LAYERS, EXPERTS, tuple(HostPlan(f"host-{i}", tuple(sorted(h))) for i, h in enumerate(hosts)))


def every(experts: range | list[int], layers: range = range(LAYERS)) -> set[Entry]:
    return {(layer, e) for layer in layers for e in experts}


@st.composite
def plans(draw: st.DrawFn, num_hosts: int) -> PlacementPlan:
    """Every (layer, expert) on 1..num_hosts distinct hosts."""
    held: list[set[Entry]] = [set() for _ in range(num_hosts)]
    for entry in every(range(EXPERTS)):
        for host in draw(st.sets(st.integers(0, num_hosts - 1), min_size=1)):
            held[host].add(entry)
    return plan(*held)


def replay(current: PlacementPlan, steps: list[Step]) -> list[dict[str, set[Entry]]]:
    """The hosts' entries after each step, checking each step changes one layer as it says."""
    state = {h.host_id: set(h.entries) for h in current.hosts}
    states = []
    for step in steps:
        before, after = state[step.host_id], set(step.entries)
        assert after - before == {(step.layer, e) for e in step.added}
        assert before - after == {(step.layer, e) for e in step.dropped}
        assert bool(step.added) != bool(step.dropped)
        state[step.host_id] = after
        states.append({h: set(e) for h, e in state.items()})
    return states


@settings(max_examples=150, deadline=None)
@given(data=st.data(), num_hosts=st.integers(2, 4), slack=st.integers(0, 6))
def test_steps_reach_the_plan_keeping_every_expert_served_and_every_host_within_budget(
        data: st.DataObject, num_hosts: int, slack: int) -> None:
    current, target = data.draw(plans(num_hosts)), data.draw(plans(num_hosts))
    largest = max(len(h.entries) for h in (*current.hosts, *target.hosts))
    budget = (largest + slack) * BYTES
    try:
        steps = plan_steps(current, target, BYTES, budget)
    except RebalanceError as err:
        assert "bytes per host" in str(err)
        # Room for all of a host's old and new entries plus one layer's new stack: adds alone get there.
        roomy = max(len(set(c.entries) | set(t.entries)) for c, t in zip(current.hosts, target.hosts, strict=True))
        assert budget < (roomy + EXPERTS) * BYTES, "refused although every add fits before any drop"
        return
    states = replay(current, steps)
    final = states[-1] if states else {h.host_id: set(h.entries) for h in current.hosts}
    assert final == {h.host_id: set(h.entries) for h in target.hosts}
    for step, state in zip(steps, states, strict=True):
        assert step.peak_bytes <= budget
        assert all(any(entry in held for held in state.values()) for entry in every(range(EXPERTS)))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), num_hosts=st.integers(2, 4))
def test_without_a_budget_every_plan_is_reachable(data: st.DataObject, num_hosts: int) -> None:
    current, target = data.draw(plans(num_hosts)), data.draw(plans(num_hosts))
    states = replay(current, plan_steps(current, target, BYTES, None))
    assert not states or states[-1] == {h.host_id: set(h.entries) for h in target.hosts}


def test_a_move_loads_the_new_host_before_the_old_one_lets_go() -> None:
    current = plan(every([0, 1, 2, 3]), every([1, 2, 3]))
    target = plan(every([1, 2, 3], range(1)) | every([0, 1, 2, 3], range(1, LAYERS)), every([0, 1, 2, 3]))

    steps = plan_steps(current, target, BYTES)

    first_add = min(i for i, s in enumerate(steps) if s.host_id == "host-1" and s.added)
    first_drop = min(i for i, s in enumerate(steps) if s.host_id == "host-0" and s.dropped)
    assert first_add < first_drop
    assert steps[first_add].layer == 0 and steps[first_add].added == (0,)
    # host-1 held 9 entries; adding expert 0 to layer 0 builds a 4-expert stack beside them.
    assert steps[first_add].peak_bytes == (9 + 4) * BYTES


def test_two_full_hosts_cannot_swap_experts_without_room_for_the_transient() -> None:
    current = plan(every([0, 1]), every([2, 3]))
    target = plan(every([2, 3]), every([0, 1]))

    with pytest.raises(RebalanceError, match="60 bytes per host"):
        plan_steps(current, target, BYTES, host_memory_bytes=6 * BYTES)
    assert plan_steps(current, target, BYTES, host_memory_bytes=9 * BYTES)  # room for one layer's new stack


def test_a_plan_for_other_hosts_or_with_an_orphan_expert_is_refused() -> None:
    current = plan(every(range(EXPERTS)), every(range(EXPERTS)))
    with pytest.raises(RebalanceError, match="differ from the running hosts"):
        plan_steps(current, plan(every(range(EXPERTS))), BYTES)
    with pytest.raises(RebalanceError, match="without a host"):
        plan_steps(current, plan(every([0, 1, 2]), every([1, 2])), BYTES)


def test_the_same_plan_needs_no_step() -> None:
    current = plan(every([0, 2]), every([1, 3]))
    assert plan_steps(current, current, BYTES, 6 * BYTES) == []
