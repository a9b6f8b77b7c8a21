"""One layer's experts packed onto hosts: how many replicas each expert gets and which host serves each.

The router splits an expert's rows evenly over its replicas (least-outstanding routing), and every
layer waits for its busiest host, so a layer is as fast as its largest host load. Packing a layer is
bin packing with divisible items: an expert with r replicas is r items of rows / r each.

Rules a packing keeps: a host serves an expert at most once (a second copy on the same host adds
memory, not throughput), and a host holds at most its slot quota of this layer's experts.

Example: rows [8, 2, 1, 1] on 2 hosts with one spare slot. Without the spare the best is 8 against
a mean of 6. With it expert 0 is two items of 4; LPT places 4, 4, then 2 and 1 and 1 on the lighter
host each time: loads 4 + 2 = 6 and 4 + 1 + 1 = 6, the mean, so the spare is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Gains smaller than this fraction of the busiest host's load are rounding noise, not progress:
# ignoring them keeps spare replicas from being spent on nothing and lets the swap search end.
REL_EPS = 1e-12


@dataclass(frozen=True, slots=True)
class LayerPacking:
    """Experts of one layer on each host, and each host's rows under an even replica split."""

    experts: tuple[tuple[int, ...], ...]  # [host] -> sorted expert ids it serves in this layer
    loads: tuple[float, ...]  # [host] -> rows it serves in this layer

    @property
    def max_load(self) -> float:
        return max(self.loads)


def pack_layer(rows: Sequence[float], quotas: Sequence[int], spare_slots: int) -> LayerPacking:
    """Pack one layer: rows[e] routed to expert e; quotas[h] slots host h may fill in this layer.

    Uses at most `spare_slots` extra replicas, only where they lower the busiest host: every prefix
    of the greedy replica order is packed and the best kept (ties: fewer replicas). A larger
    `spare_slots` therefore never gives a busier host. Raises ValueError if the quotas hold fewer
    slots than there are experts.
    """
    if sum(quotas) < len(rows):
        raise ValueError(f"{len(rows)} experts do not fit in {sum(quotas)} slots of this layer")
    order = replica_order(rows, min(spare_slots, sum(quotas) - len(rows)), sum(q > 0 for q in quotas))
    bound = _lower_bound(rows, len(quotas), sum(q > 0 for q in quotas))
    best: LayerPacking | None = None
    counts = [1] * len(rows)
    for k in range(len(order) + 1):
        if k:
            counts[order[k - 1]] += 1
        packing = _pack_counts(rows, counts, quotas)
        if packing is not None and (best is None or packing.max_load < best.max_load * (1 - REL_EPS)):
            best = packing
        if best is not None and best.max_load <= bound * (1 + REL_EPS):
            break  # nothing can beat the lower bound
    assert best is not None, "one replica per expert always fits when the quotas hold every expert"
    return best


def replica_order(rows: Sequence[float], spare_slots: int, max_replicas: int) -> list[int]:
    """Experts in the order they receive extra replicas: each goes to the expert with the most rows
    per replica (ties: lowest id), at most `max_replicas` replicas each, never to an idle expert.

    Example: rows [9, 4], 3 spares -> [0, 0, 1] (per replica: 9 -> 4.5 -> 4 vs 4 -> 3 vs 4 -> 3 vs 2).
    """
    counts = [1] * len(rows)
    order: list[int] = []
    for _ in range(spare_slots):
        open_ = [e for e in range(len(rows)) if counts[e] < max_replicas and rows[e] > 0]
        if not open_:
            break
        expert = max(open_, key=lambda e: (rows[e] / counts[e], -e))
        counts[expert] += 1
        order.append(expert)
    return order


def _lower_bound(rows: Sequence[float], num_hosts: int, usable_hosts: int) -> float:
    """No packing has a busiest host below the mean, nor below the top expert spread over every host."""
    return max(sum(rows) / num_hosts, max(rows) / max(1, usable_hosts))


def _pack_counts(rows: Sequence[float], counts: Sequence[int], quotas: Sequence[int]) -> LayerPacking | None:
    """Longest processing time first, then improving moves and swaps; None if the replicas do not fit."""
    share = [r / c for r, c in zip(rows, counts, strict=True)]
    items = sorted((e for e, c in enumerate(counts) for _ in range(c)), key=lambda e: (-share[e], e))
    held: list[set[int]] = [set() for _ in quotas]
    loads = [0.0] * len(quotas)
    for expert in items:
        free = [h for h in range(len(quotas)) if len(held[h]) < quotas[h] and expert not in held[h]]
        if not free:
            return None
        host = min(free, key=lambda h: (loads[h], len(held[h]), h))
        held[host].add(expert)
        loads[host] += share[expert]
    for _ in range(4 * len(items) * len(quotas)):  # each step lowers the sorted load vector; bounded anyway
        if not _improve(held, loads, share, quotas):
            break
    return LayerPacking(tuple(tuple(sorted(h)) for h in held), tuple(loads))


def _improve(held: list[set[int]], loads: list[float], share: Sequence[float], quotas: Sequence[int]) -> bool:
    """Move one item off the busiest host, or swap it for a smaller one, if that lowers its load
    without making the other host as busy. Returns whether anything changed (first such change)."""
    top = max(range(len(loads)), key=lambda h: (loads[h], -h))
    limit = loads[top] * (1 - REL_EPS)
    others = sorted((h for h in range(len(loads)) if h != top), key=lambda h: (loads[h], h))
    for expert in sorted(held[top], key=lambda e: (-share[e], e)):
        for host in others:
            if expert in held[host]:
                continue
            if len(held[host]) < quotas[host] and loads[host] + share[expert] < limit:
                _transfer(held, loads, share, expert, top, host)
                return True
            for small in sorted(held[host] - held[top], key=lambda e: (share[e], e)):
                if share[small] < share[expert] and loads[host] - share[small] + share[expert] < limit:
                    _transfer(held, loads, share, expert, top, host)
                    _transfer(held, loads, share, small, host, top)
                    return True
    return False


def _transfer(held: list[set[int]], loads: list[float], share: Sequence[float], expert: int, src: int,
              dst: int) -> None:
    held[src].remove(expert)
    held[dst].add(expert)
    loads[src] -= share[expert]
    loads[dst] += share[expert]
