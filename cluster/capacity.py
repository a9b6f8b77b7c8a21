"""Capacity planning: how many expert hosts, with which replicas, serve a target rate of tokens per second.

Model (the planner's): a step of B tokens puts B * load[l][h] / T rows on host h in layer l (T: the
tokens behind the measured load), every layer waits for its busiest host, and a host works through
R rows per second. So

    tokens/s = B / step time = R * T / sum over layers of max over hosts of load[l][h].

The answer is the fewest hosts whose planned placement reaches the target; headroom is how far the
predicted rate is above it. Attention, the LM head and network time are not in this model: it is
the expert-compute bound of the serving rate.

R, rows per second one host sustains, comes from `--measured FILE`, either
  - {"host_rows_per_s": R}: a rate measured any way you like, or
  - the JSON list bench/dispatch.py writes (bench/results/dispatch-*.json). Read from it: the rows
    whose "backend" is "in-process" (one process holding all of a layer's experts, no network),
    their "batch" (tokens B) and "layer_expert_us" (one layer's expert call on those B tokens, i.e.
    B * K rows). R = B * K / layer_expert_us, the best over batch sizes (a loaded server runs large
    batches). Every other field is ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.placement import PlacementPlan
from cluster.planner import Load, PlanError, PlannerConfig, PlanReport, compare_with_round_robin, plan_placement


class CapacityError(ValueError):
    """The target cannot be met within the limits, or the measurement cannot be read."""


@dataclass(frozen=True, slots=True)
class HostRate:
    """Rows per second one expert host sustains, and where that number came from."""

    rows_per_s: float
    source: str


def read_host_rate(path: Path, rows_per_token: float) -> HostRate:
    """R from a measurement file (see the module docstring); rows_per_token is the gate's K."""
    try:
        raw: Any = json.loads(path.read_text())
    except ValueError as err:
        raise CapacityError(f"{path}: not JSON ({err})") from None
    try:
        rate = _host_rate(raw, rows_per_token, path)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise CapacityError(f"{path}: malformed measurement ({err!r})") from None
    if rate is not None:
        return _checked(rate, path)
    raise CapacityError(f'{path}: expected {{"host_rows_per_s": R}} or bench/dispatch.py output with '
                        f'"in-process" rows (batch, layer_expert_us)')


def _host_rate(raw: Any, rows_per_token: float, path: Path) -> HostRate | None:
    if isinstance(raw, dict) and "host_rows_per_s" in raw:
        return HostRate(float(raw["host_rows_per_s"]), f"{path} host_rows_per_s")
    if not isinstance(raw, list):
        return None
    rates = [HostRate(float(r["batch"]) * rows_per_token / (float(r["layer_expert_us"]) * 1e-6),
                      f"{path} in-process batch {r['batch']}")
             for r in raw if isinstance(r, dict) and r.get("backend") == "in-process"]
    return max(rates, key=lambda r: r.rows_per_s) if rates else None


def _checked(rate: HostRate, path: Path) -> HostRate:
    if not (rate.rows_per_s > 0 and math.isfinite(rate.rows_per_s)):
        raise CapacityError(f"{path}: a host rate of {rate.rows_per_s} rows/s is not a positive number")
    return rate


@dataclass(frozen=True, slots=True)
class CapacityConfig:
    """The target, the measured host speed, and the limits of the search."""

    target_tokens_per_s: float
    host_rows_per_s: float
    max_hosts: int = 256
    spare_slots: int | None = None  # per layer; None: as many as there are hosts
    expert_bytes: int = 1  # only matters with host_memory_bytes
    host_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("target_tokens_per_s", "host_rows_per_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value} must be a positive number")
        if self.max_hosts < 1:
            raise ValueError(f"max_hosts={self.max_hosts} must be at least 1")


@dataclass(frozen=True, slots=True)
class CapacityPlan:
    """The fewest hosts that meet the target, their placement and the predicted rate."""

    tokens_per_s: float  # predicted
    target_tokens_per_s: float
    plan: PlacementPlan
    report: PlanReport

    @property
    def num_hosts(self) -> int:
        return len(self.plan.hosts)

    @property
    def headroom(self) -> float:
        """Predicted / target - 1: 0.2 means 20% above the target."""
        return self.tokens_per_s / self.target_tokens_per_s - 1

    def replicated(self) -> list[tuple[int, int, int]]:
        """(layer, expert, replicas) of every expert served by more than one host."""
        return [(layer, expert, n) for layer in range(self.plan.num_layers) for expert in range(self.plan.num_experts)
                if (n := len(self.plan.replicas(layer, expert))) > 1]

    def to_dict(self) -> dict[str, object]:
        return {"hosts": self.num_hosts, "tokens_per_s": round(self.tokens_per_s, 2),
                "target_tokens_per_s": self.target_tokens_per_s, "headroom": round(self.headroom, 4),
                "max_over_mean": round(self.report.plan.max_over_mean, 4),
                "replicas": [{"layer": layer, "expert": e, "hosts": n} for layer, e, n in self.replicated()]}

    def to_text(self) -> str:
        extra = ", ".join(f"L{layer}E{e}x{n}" for layer, e, n in self.replicated()) or "none"
        return (f"{self.num_hosts} hosts: predicted {self.tokens_per_s:.1f} tokens/s for a target of "
                f"{self.target_tokens_per_s:g} (headroom {100 * self.headroom:.1f}%); busiest host / mean "
                f"{self.report.plan.max_over_mean:.3f} in the worst layer\nreplicated experts: {extra}")


def predicted_tokens_per_s(step_rows: float, tokens: float, host_rows_per_s: float) -> float:
    """R * T / sum over layers of the busiest host's rows (see the module docstring)."""
    return math.inf if step_rows <= 0 else host_rows_per_s * tokens / step_rows


def plan_capacity(load: Load, tokens: float, cfg: CapacityConfig) -> CapacityPlan:
    """The fewest hosts (up to cfg.max_hosts) whose plan reaches the target; CapacityError if none does.

    Host counts whose best conceivable plan falls short are skipped without planning: every layer
    waits at least for its mean host load and for its hottest expert spread over all the replicas
    it may have (hosts, or 1 + spare slots).
    """
    best: CapacityPlan | None = None
    for num_hosts in range(1, cfg.max_hosts + 1):
        if rate_bound(load, tokens, cfg, num_hosts) < cfg.target_tokens_per_s:
            continue
        candidate = _try_hosts(load, tokens, cfg, num_hosts)
        if candidate is None:
            continue
        if candidate.tokens_per_s >= cfg.target_tokens_per_s:
            return candidate
        if best is None or candidate.tokens_per_s > best.tokens_per_s:
            best = candidate
    if best is None:
        bound = rate_bound(load, tokens, cfg, cfg.max_hosts)
        reach = f"at most {bound:.1f} tokens/s even perfectly balanced"
    else:
        reach = f"at most {best.tokens_per_s:.1f} tokens/s"
    raise CapacityError(f"{cfg.max_hosts} hosts with {_spares(cfg)} spare slots per layer give {reach}, short of "
                        f"{cfg.target_tokens_per_s:g}: allow more hosts or spare slots, or measure a faster host")


def rate_bound(load: Load, tokens: float, cfg: CapacityConfig, num_hosts: int) -> float:
    """Tokens/s no plan on `num_hosts` hosts can beat (ignores memory)."""
    spare = num_hosts if cfg.spare_slots is None else cfg.spare_slots
    replicas = min(num_hosts, 1 + spare)
    step_rows = sum(max(sum(rows) / num_hosts, max(rows) / replicas) for rows in load)
    return predicted_tokens_per_s(step_rows, tokens, cfg.host_rows_per_s)


def _spares(cfg: CapacityConfig) -> str:
    return "as many" if cfg.spare_slots is None else str(cfg.spare_slots)


def _try_hosts(load: Load, tokens: float, cfg: CapacityConfig, num_hosts: int) -> CapacityPlan | None:
    spare = num_hosts if cfg.spare_slots is None else cfg.spare_slots
    try:
        plan = plan_placement(load, PlannerConfig(num_hosts, cfg.expert_bytes, cfg.host_memory_bytes, spare))
    except PlanError:
        return None  # too little memory on this many hosts; more hosts may do
    report = compare_with_round_robin(plan, load)
    rate = predicted_tokens_per_s(report.plan.step_rows, tokens, cfg.host_rows_per_s)
    return CapacityPlan(rate, cfg.target_tokens_per_s, plan, report)
