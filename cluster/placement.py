"""Placement plans: which hosts serve which (layer, expert), with replicas. Plain data, saved as JSON.

A plan lists hosts; each host serves a set of (layer, expert) entries. An entry served by several
hosts has replicas: the router spreads that expert's rows over them, and any one of them can take
over the rows of another that fails. Validation rejects a plan that leaves an expert without a
host or puts more expert bytes on a host than its memory budget.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Entry = tuple[int, int]  # (layer, expert)


class PlacementError(ValueError):
    """A plan that cannot be served as written."""


@dataclass(frozen=True, slots=True)
class HostResources:
    """What each expert host asks of Ray, and how Ray supervises it."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0  # fractional allowed; 0: CPU-only hosts
    strategy: str = "PACK"  # placement group strategy over nodes: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    max_restarts: int = 3
    ready_timeout_s: float = 120.0
    probe_timeout_s: float = 2.0  # a host that does not report its endpoint in time is left out of the table
    health_interval_s: float = 2.0  # how often the controller re-probes its hosts on its own

    def __post_init__(self) -> None:
        if self.strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"strategy={self.strategy!r} must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus={self.num_cpus} must be > 0 and num_gpus={self.num_gpus} >= 0")
        if self.max_restarts < -1:
            raise ValueError(f"max_restarts={self.max_restarts} must be -1 (forever) or more")


@dataclass(frozen=True, slots=True)
class HostPlan:
    """One expert host and the (layer, expert) entries it loads and serves."""

    host_id: str
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    """Every (layer, expert) of a model -> one or more hosts."""

    num_layers: int
    num_experts: int
    hosts: tuple[HostPlan, ...]

    def __post_init__(self) -> None:
        if not self.hosts:
            raise PlacementError("a plan needs at least one host")
        ids = [h.host_id for h in self.hosts]
        if len(set(ids)) != len(ids):
            raise PlacementError(f"host ids must be unique, got {ids}")

    def replicas(self, layer: int, expert: int) -> list[str]:
        """Host ids serving (layer, expert), in plan order."""
        return [h.host_id for h in self.hosts if (layer, expert) in h.entries]

    @classmethod
    def round_robin(cls, num_layers: int, num_experts: int, num_hosts: int, replicas: int = 1) -> PlacementPlan:
        """Deal the replica slots of each layer's experts to the hosts in turn: slot r of (layer, expert)
        goes to host ((layer * E + expert) * replicas + r) % num_hosts. The replicas of an expert land on
        distinct hosts and, in every layer, host loads differ by at most one entry.

        Example: 8 experts, 2 hosts, 1 replica -> host-0 serves experts 0, 2, 4, 6 of every layer.
        """
        if num_hosts < 1:
            raise PlacementError(f"hosts={num_hosts} must be at least 1")
        if not 1 <= replicas <= num_hosts:
            raise PlacementError(f"replicas={replicas} must be between 1 and the number of hosts ({num_hosts})")
        entries: list[list[Entry]] = [[] for _ in range(num_hosts)]
        for layer in range(num_layers):
            for expert in range(num_experts):
                for r in range(replicas):
                    entries[((layer * num_experts + expert) * replicas + r) % num_hosts].append((layer, expert))
        return cls(num_layers, num_experts, tuple(HostPlan(f"host-{i}", tuple(e)) for i, e in enumerate(entries)))

    def validate(self, expert_bytes: int | None = None, host_memory_bytes: int | None = None) -> None:
        """Raise PlacementError naming the entry or host that breaks the plan."""
        for host in self.hosts:
            for layer, expert in host.entries:
                if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
                    raise PlacementError(f"{host.host_id}: entry (layer {layer}, expert {expert}) is outside "
                                         f"the model's {self.num_layers} layers x {self.num_experts} experts")
            if expert_bytes is not None and host_memory_bytes is not None:
                need = len(set(host.entries)) * expert_bytes
                if need > host_memory_bytes:
                    raise PlacementError(f"{host.host_id}: {len(host.entries)} experts need {need} bytes, more than "
                                         f"its memory budget of {host_memory_bytes} bytes")
        served = {entry for host in self.hosts for entry in host.entries}
        for layer in range(self.num_layers):
            for expert in range(self.num_experts):
                if (layer, expert) not in served:
                    raise PlacementError(f"layer {layer} expert {expert} has no host in the plan")

    def to_json(self) -> str:
        hosts = [{"id": h.host_id, "experts": [list(e) for e in h.entries]} for h in self.hosts]
        return json.dumps({"layers": self.num_layers, "experts": self.num_experts, "hosts": hosts}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PlacementPlan:
        try:
            raw: Any = json.loads(text)
            hosts = tuple(HostPlan(str(h["id"]), _entries(h["experts"])) for h in raw["hosts"])
            return cls(int(raw["layers"]), int(raw["experts"]), hosts)
        except (ValueError, KeyError, TypeError) as err:
            raise PlacementError(f"not a placement plan: {err!r}") from None

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> PlacementPlan:
        try:
            return cls.from_json(path.read_text())
        except PlacementError as err:
            raise PlacementError(f"{path}: {err}") from None


def _entries(raw: Iterable[Any]) -> tuple[Entry, ...]:
    return tuple((int(layer), int(expert)) for layer, expert in raw)
