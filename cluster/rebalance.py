"""Live re-placement: the ordered steps that take running hosts from one placement plan to another.

Hosts keep serving throughout. Each step changes one layer on one host: it either adds experts
(read from the checkpoint into a new stack for that layer, built beside the old one) or drops
experts (a smaller stack, likewise). The order keeps two promises:

- every (layer, expert) always has a host that holds it: an entry is dropped only while another
  host holds it too, and adds come first;
- no host goes over its memory budget at any moment, counting the transient of a re-stacked
  layer (the new stack exists beside everything the host holds until the old one is freed).

When no order keeps both (say two full hosts must swap experts and no host has room for the
transient), `plan_steps` raises RebalanceError naming the hosts and the bytes they lack.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cluster.placement import Entry, HostPlan, PlacementPlan


class RebalanceError(ValueError):
    """The target plan cannot be reached from the running one within the memory budgets."""


@dataclass(frozen=True, slots=True)
class Step:
    """Host `host_id` serves exactly `entries` after this step (one layer changed: `added` or `dropped`)."""

    host_id: str
    layer: int
    added: tuple[int, ...]  # experts of `layer` loaded by this step
    dropped: tuple[int, ...]  # experts of `layer` released by this step
    entries: tuple[Entry, ...]  # everything the host serves afterwards
    peak_bytes: int  # the host's expert memory at the step's highest point (old and new stack together)


def plan_steps(current: PlacementPlan, target: PlacementPlan, expert_bytes: int,
               host_memory_bytes: int | None = None) -> list[Step]:
    """The steps from `current` to `target` (same hosts); [] when they already agree."""
    _check_same_shape(current, target)
    state = {h.host_id: set(h.entries) for h in current.hosts}
    wanted = {h.host_id: set(h.entries) for h in target.hosts}
    budget = host_memory_bytes
    steps: list[Step] = []
    while state != wanted:
        progress = _adds(state, wanted, expert_bytes, budget) + _drops(state, wanted, expert_bytes, budget)
        if not progress:
            raise RebalanceError(_blocked(state, wanted, expert_bytes, budget))
        steps += progress
    return steps


def plan_after(plan: PlacementPlan, step: Step) -> PlacementPlan:
    """`plan` with `step` applied."""
    hosts = tuple(HostPlan(h.host_id, step.entries) if h.host_id == step.host_id else h for h in plan.hosts)
    return PlacementPlan(plan.num_layers, plan.num_experts, hosts)


def _adds(state: dict[str, set[Entry]], wanted: dict[str, set[Entry]], expert_bytes: int,
          budget: int | None) -> list[Step]:
    """Every add that fits now, a layer at a time, host by host; as many of a layer's experts as fit."""
    steps = []
    for host_id in sorted(state):
        missing = sorted(wanted[host_id] - state[host_id])
        for layer in sorted({layer for layer, _ in missing}):
            experts = [e for lyr, e in missing if lyr == layer]
            while experts:
                step = _step(host_id, layer, state[host_id], experts, [], expert_bytes)
                if budget is None or step.peak_bytes <= budget:
                    steps.append(step)
                    state[host_id] = set(step.entries)
                    break
                experts = experts[:-1]  # try fewer of them
    return steps


def _drops(state: dict[str, set[Entry]], wanted: dict[str, set[Entry]], expert_bytes: int,
           budget: int | None) -> list[Step]:
    """Every drop whose entries another host holds, if the host has room for the layer's smaller stack."""
    steps = []
    for host_id in sorted(state):
        extra = sorted(state[host_id] - wanted[host_id])
        for layer in sorted({layer for layer, _ in extra}):
            experts = [e for lyr, e in extra if lyr == layer
                       and any((lyr, e) in held for other, held in state.items() if other != host_id)]
            if not experts:
                continue
            step = _step(host_id, layer, state[host_id], [], experts, expert_bytes)
            if budget is None or step.peak_bytes <= budget:
                steps.append(step)
                state[host_id] = set(step.entries)
    return steps


def _step(host_id: str, layer: int, held: set[Entry], add: list[int], drop: list[int], expert_bytes: int) -> Step:
    after = (held | {(layer, e) for e in add}) - {(layer, e) for e in drop}
    new_stack = sum(1 for lyr, _ in after if lyr == layer)
    # The new stack of `layer` is built while everything held now (its old stack included) stays resident.
    peak = (len(held) + new_stack) * expert_bytes
    return Step(host_id, layer, tuple(add), tuple(drop), tuple(sorted(after)), peak)


def _blocked(state: dict[str, set[Entry]], wanted: dict[str, set[Entry]], expert_bytes: int,
             budget: int | None) -> str:
    waiting = [f"{host_id} (holds {len(state[host_id]) * expert_bytes} bytes, must still load "
               f"{len(wanted[host_id] - state[host_id])} experts)"
               for host_id in sorted(state) if wanted[host_id] - state[host_id]]
    return (f"no order of steps reaches the plan within {budget} bytes per host, counting the transient of "
            f"re-stacking a layer: {', '.join(waiting[:4])}; give the hosts more memory, or apply a plan "
            "that moves fewer experts first")


def _check_same_shape(current: PlacementPlan, target: PlacementPlan) -> None:
    if (current.num_layers, current.num_experts) != (target.num_layers, target.num_experts):
        raise RebalanceError(f"the plan is for {target.num_layers} layers x {target.num_experts} experts, the "
                             f"cluster serves {current.num_layers} x {current.num_experts}")
    running, planned = _ids(current.hosts), _ids(target.hosts)
    if running != planned:
        raise RebalanceError(f"the plan's hosts {sorted(planned)} differ from the running hosts {sorted(running)}: "
                             "a re-placement moves experts between the running hosts; change the host count "
                             "by scaling and restarting with the plan")
    orphans = [(layer, expert) for layer in range(target.num_layers) for expert in range(target.num_experts)
               if not target.replicas(layer, expert)]
    if orphans:
        raise RebalanceError(f"the plan leaves {len(orphans)} experts without a host, first (layer, expert) "
                             f"{orphans[0]}")


def _ids(hosts: Iterable[HostPlan]) -> set[str]:
    return {h.host_id for h in hosts}
