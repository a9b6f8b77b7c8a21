"""The placement planner: measured load -> a PlacementPlan with hot experts replicated, balanced per layer.

Pure and deterministic: plain numbers in, a plan out; the same input always gives the same plan.

Model of a step: in each layer the router waits for the slowest host, and a host's time is its rows
(replicas of an expert split that expert's rows evenly). So step time ~ sum over layers of the
largest host load, and the planner balances EVERY layer, not the hosts' totals.

Spare slots: `spare_slots = K` allows up to K replicas per layer beyond one per expert (so at most
E + K (layer, expert) entries per layer). A spare is used only where it lowers that layer's
busiest host (see cluster.packing), so more spare slots never make a layer worse.

Memory: each entry costs `expert_bytes` on its host. A host's slots (host memory // expert_bytes)
are shared out over the layers evenly and up front (a quota per host and layer), so layers are
planned independently and the result does not depend on the order they are planned in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.packing import LayerPacking, pack_layer
from cluster.placement import HostPlan, PlacementError, PlacementPlan

Load = Sequence[Sequence[float]]  # [layer][expert] -> rows routed there (the load file's "load")


class PlanError(PlacementError):
    """No plan satisfies the request (too little memory, a load of the wrong shape)."""


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """What the planner may use: hosts, their expert memory, spare replica slots per layer."""

    num_hosts: int
    expert_bytes: int  # bytes of one (layer, expert) entry's weights
    host_memory_bytes: int | None = None  # expert-weight budget of each host; None: unlimited
    spare_slots: int = 0  # extra replicas per layer beyond one per expert (upper bound)

    def __post_init__(self) -> None:
        if self.num_hosts < 1:
            raise ValueError(f"num_hosts={self.num_hosts} must be at least 1")
        if self.expert_bytes < 1:
            raise ValueError(f"expert_bytes={self.expert_bytes} must be at least 1")
        if self.host_memory_bytes is not None and self.host_memory_bytes < 1:
            raise ValueError(f"host_memory_bytes={self.host_memory_bytes} must be at least 1 (or unset)")
        if self.spare_slots < 0:
            raise ValueError(f"spare_slots={self.spare_slots} must be at least 0")

    @property
    def host_slots(self) -> int | None:
        """(layer, expert) entries one host can hold; None: unlimited."""
        return None if self.host_memory_bytes is None else self.host_memory_bytes // self.expert_bytes


def plan_placement(load: Load, cfg: PlannerConfig) -> PlacementPlan:
    """Replicate hot experts and pack every layer's entries onto `cfg.num_hosts` hosts.

    load[l][e]: rows the gate sent to expert e of layer l (any unit: only ratios matter).
    Raises PlanError if the hosts' memory cannot hold one replica of every expert.
    """
    num_layers, num_experts = check_load(load)
    quotas = slot_quotas(cfg, num_layers, num_experts)
    layers = [pack_layer(load[layer], quotas[layer], cfg.spare_slots) for layer in range(num_layers)]
    plan = plan_from_packings(spread_over_hosts(layers, quotas), num_experts)
    plan.validate(cfg.expert_bytes, cfg.host_memory_bytes)  # the planner's promise, checked the plan's way
    return plan


def check_load(load: Load) -> tuple[int, int]:
    """(layers, experts) of a rectangular, non-negative load; PlanError otherwise."""
    if not load or not load[0]:
        raise PlanError("the load has no layers or no experts")
    num_experts = len(load[0])
    for layer, rows in enumerate(load):
        if len(rows) != num_experts:
            raise PlanError(f"layer {layer} has {len(rows)} experts in the load, layer 0 has {num_experts}")
        if min(rows) < 0:
            raise PlanError(f"layer {layer} has a negative row count {min(rows)}")
    return len(load), num_experts


def slot_quotas(cfg: PlannerConfig, num_layers: int, num_experts: int) -> list[list[int]]:
    """[layer][host] -> entries host may hold in that layer; every host's quotas sum to its slots.

    A host of S slots gets S // L per layer, and its S % L extra slots go to consecutive layers,
    continuing where the previous host stopped, so every layer gets floor or ceil of the mean.
    Example: 2 hosts of 3 slots, 2 layers: 1 slot per layer each; host 0's extra slot goes to layer 0
    and host 1's to layer 1, so quotas = [[2, 1], [1, 2]] ([layer][host]).
    """
    slots = cfg.host_slots
    if slots is None:
        return [[num_experts] * cfg.num_hosts for _ in range(num_layers)]  # a host holds each expert once
    if cfg.num_hosts * slots < num_layers * num_experts:
        raise PlanError(_memory_message(cfg, num_layers, num_experts))
    base, extra = divmod(slots, num_layers)
    quotas = [[base] * cfg.num_hosts for _ in range(num_layers)]
    for host in range(cfg.num_hosts):
        for j in range(extra):
            quotas[(host * extra + j) % num_layers][host] += 1
    return quotas


def _memory_message(cfg: PlannerConfig, num_layers: int, num_experts: int) -> str:
    need = num_layers * num_experts
    per_host = -(-need // cfg.num_hosts)
    return (f"{cfg.num_hosts} hosts of {cfg.host_memory_bytes} bytes hold {cfg.host_slots} experts of "
            f"{cfg.expert_bytes} bytes each, but {num_layers} layers x {num_experts} experts need {need}: "
            f"give each host at least {per_host * cfg.expert_bytes} bytes (--host-memory) or add hosts")


def spread_over_hosts(layers: Sequence[LayerPacking], quotas: Sequence[Sequence[int]]) -> list[LayerPacking]:
    """Relabel each layer's hosts so its busiest go to the hosts least loaded over the layers before.

    A layer's packing does not care which host is which among hosts of equal quota, but without this
    every layer of a similar load would put its hot replicas on the same hosts, whose total work
    (and memory) would then exceed the others'. Each layer's busiest host is unchanged.
    """
    totals = [0.0] * len(quotas[0])
    spread = []
    for packing, layer_quotas in zip(layers, quotas, strict=True):
        source = list(range(len(totals)))  # source[h]: the packing's host that becomes host h
        for quota in sorted(set(layer_quotas)):
            group = [h for h in range(len(totals)) if layer_quotas[h] == quota]
            busiest = sorted(group, key=lambda h: (-packing.loads[h], h))
            idlest = sorted(group, key=lambda h: (totals[h], h))
            for src, dst in zip(busiest, idlest, strict=True):
                source[dst] = src
        packing = LayerPacking(tuple(packing.experts[s] for s in source), tuple(packing.loads[s] for s in source))
        totals = [t + load for t, load in zip(totals, packing.loads, strict=True)]
        spread.append(packing)
    return spread


def plan_from_packings(layers: Sequence[LayerPacking], num_experts: int) -> PlacementPlan:
    """Per-layer packings -> a PlacementPlan with hosts host-0 ... host-(N-1), entries sorted."""
    num_hosts = len(layers[0].experts)
    hosts = tuple(HostPlan(f"host-{h}", tuple((layer, e) for layer, p in enumerate(layers) for e in p.experts[h]))
                  for h in range(num_hosts))
    return PlacementPlan(len(layers), num_experts, hosts)


def host_loads(plan: PlacementPlan, load: Load) -> list[list[float]]:
    """[layer][host] -> rows that host serves, the rows of each expert split evenly over its replicas."""
    replicas = Counter(entry for host in plan.hosts for entry in set(host.entries))
    loads = [[0.0] * len(plan.hosts) for _ in range(plan.num_layers)]
    for h, host in enumerate(plan.hosts):
        for layer, expert in sorted(set(host.entries)):
            loads[layer][h] += load[layer][expert] / replicas[(layer, expert)]
    return loads


@dataclass(frozen=True, slots=True)
class LayerBalance:
    """Busiest host's rows and the mean over hosts, in one layer."""

    max_load: float
    mean_load: float

    @property
    def max_over_mean(self) -> float:
        return self.max_load / self.mean_load if self.mean_load > 0 else 1.0


@dataclass(frozen=True, slots=True)
class Balance:
    """How evenly one plan spreads one load, layer by layer."""

    layers: tuple[LayerBalance, ...]

    @property
    def max_over_mean(self) -> float:
        """The worst layer's busiest-host / mean ratio (1.0 is perfect)."""
        return max(b.max_over_mean for b in self.layers)

    @property
    def worst_layer(self) -> int:
        return max(range(len(self.layers)), key=lambda i: (self.layers[i].max_over_mean, -i))

    @property
    def step_rows(self) -> float:
        """Sum over layers of the busiest host's rows: proportional to the predicted step time."""
        return sum(b.max_load for b in self.layers)

    def to_dict(self) -> dict[str, object]:
        return {"max_over_mean": round(self.max_over_mean, 4), "worst_layer": self.worst_layer,
                "layers": [{"max": round(b.max_load, 3), "mean": round(b.mean_load, 3),
                            "max_over_mean": round(b.max_over_mean, 4)} for b in self.layers]}


def balance(plan: PlacementPlan, load: Load) -> Balance:
    """Per-layer busiest host vs mean of `plan` serving `load`."""
    return Balance(tuple(LayerBalance(max(hosts), sum(hosts) / len(hosts)) for hosts in host_loads(plan, load)))


@dataclass(frozen=True, slots=True)
class PlanReport:
    """A plan beside round-robin (one replica per expert) on the same hosts and load."""

    plan: Balance
    round_robin: Balance
    num_hosts: int
    num_entries: int  # (layer, expert) replicas in the plan, spares included

    @property
    def step_time_ratio(self) -> float:
        """Predicted step time of the plan / round-robin's (below 1: the plan is faster)."""
        rr = self.round_robin.step_rows
        return self.plan.step_rows / rr if rr > 0 else 1.0

    def to_dict(self) -> dict[str, object]:
        return {"hosts": self.num_hosts, "entries": self.num_entries, "plan": self.plan.to_dict(),
                "round_robin": self.round_robin.to_dict(), "step_time_ratio": round(self.step_time_ratio, 4)}

    def to_text(self) -> str:
        """A per-layer table and a summary, for people."""
        lines = ["layer  round-robin max/mean  plan max/mean"]
        lines += [f"{i:5d}  {rr.max_over_mean:20.3f}  {p.max_over_mean:13.3f}"
                  for i, (rr, p) in enumerate(zip(self.round_robin.layers, self.plan.layers, strict=True))]
        lines.append(f"worst layer: plan {self.plan.max_over_mean:.3f} (layer {self.plan.worst_layer}), "
                     f"round-robin {self.round_robin.max_over_mean:.3f} (layer {self.round_robin.worst_layer})")
        lines.append(f"predicted step time: plan / round-robin = {self.step_time_ratio:.3f} "
                     f"({self.num_entries} entries on {self.num_hosts} hosts)")
        return "\n".join(lines)


def compare_with_round_robin(plan: PlacementPlan, load: Load) -> PlanReport:
    """Balance of `plan` and of round-robin with one replica per expert on as many hosts."""
    rr = PlacementPlan.round_robin(plan.num_layers, plan.num_experts, len(plan.hosts))
    entries = sum(len(set(h.entries)) for h in plan.hosts)
    return PlanReport(balance(plan, load), balance(rr, load), len(plan.hosts), entries)
