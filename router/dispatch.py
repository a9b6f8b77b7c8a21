"""The remote expert backend: one concurrent request per host per layer, replicas and failover.

Shapes: T tokens of the step, D hidden, K experts per token. For a layer, each (token, k) slot is
assigned to one replica of its expert; every host that got slots receives ONE request with its
rows (each row once, the slots served elsewhere marked -1) and answers one row per input row.
All hosts are called at once; the answers are summed into the output. Requests travel on one
long-lived DispatchStream per host (router/expert_client.py), each with a deadline of its own.

Failures: a host that does not answer (UNAVAILABLE, DEADLINE_EXCEEDED) is dropped for this call,
the routing table is refreshed, and its slots go to another replica. A host that no longer serves
an expert (FAILED_PRECONDITION: a live re-placement moved it and this router's table is stale) is
treated the same way. The table is also re-read between steps once it is `table_max_age_s` old,
so re-placements and restarted hosts are picked up without a failure. When an expert has no live
replica, dispatch waits for Ray to restart one, up to `restart_wait_s`, then raises
ExpertUnavailableError naming the layer and expert. Retries live here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch
from torch import Tensor

from protos.keepalive import check_seconds
from protos.security import DispatchTls
from router.expert_client import KEEPALIVE_S, KEEPALIVE_TIMEOUT_S, ExpertClient, PendingAnswer

log = logging.getLogger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
STALE_ROUTE = grpc.StatusCode.FAILED_PRECONDITION  # the host does not serve that expert (any more)


class ExpertUnavailableError(RuntimeError):
    """No replica of an expert answered within the retry budget."""

    def __init__(self, layer: int, expert: int, waited_s: float) -> None:
        super().__init__(f"no host of layer {layer} expert {expert} answered within {waited_s:.1f} s")
        self.layer, self.expert = layer, expert


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    """Deadlines and retry budget of expert calls."""

    call_timeout_s: float = 10.0  # deadline of one host call
    restart_wait_s: float = 30.0  # how long a layer waits for a replacement when no replica answers
    retry_interval_s: float = 0.2  # pause between routing-table refreshes while waiting
    table_max_age_s: float = 1.0  # re-read the routing table between steps once it is this old
    max_message_bytes: int = 256 * 2**20
    tls: DispatchTls | None = None  # mutual TLS to the hosts; None: plaintext
    # An HTTP/2 ping on a host's connection after this long without traffic, so a connection that a
    # firewall or NAT dropped in silence fails within keepalive_s + keepalive_timeout_s instead of
    # costing the next layer a whole call_timeout_s. Hosts accept pings every
    # ExpertServerConfig.min_ping_interval_s (10 s): keep keepalive_s at or above it.
    keepalive_s: float = KEEPALIVE_S
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("call_timeout_s", "restart_wait_s", "retry_interval_s", "table_max_age_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for name in ("keepalive_s", "keepalive_timeout_s"):
            check_seconds(name, getattr(self, name))


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Versioned map (layer, expert) -> endpoints of its live replicas."""

    version: int
    routes: dict[tuple[int, int], tuple[str, ...]]

    @classmethod
    def from_json(cls, text: str) -> RoutingTable:
        """{"version": v, "routes": [[layer, expert, ["host:port", ...]], ...]} -> RoutingTable."""
        raw = json.loads(text)
        routes = {(int(layer), int(expert)): tuple(endpoints) for layer, expert, endpoints in raw["routes"]}
        return cls(int(raw["version"]), routes)


TableSource = Callable[[bool], RoutingTable]  # refresh=True asks the controller to re-probe its hosts


@dataclass(frozen=True, slots=True)
class Call:
    """One Dispatch request in flight: its host, the rows [T_h] and slots [T, K] it carries, its answer."""

    endpoint: str
    rows: Tensor
    slots: Tensor
    answer: PendingAnswer


class RemoteExperts:
    """ExpertBackend over gRPC: sums each token's experts as computed by their hosts."""

    def __init__(self, fetch_table: TableSource, num_experts: int, cfg: DispatchConfig | None = None) -> None:
        self.fetch_table = fetch_table
        self.num_experts = num_experts
        self.cfg = cfg or DispatchConfig()
        self.table = fetch_table(False)
        self.table_read_at = time.monotonic()
        self.clients: dict[str, ExpertClient] = {}
        self.outstanding: dict[str, int] = {}  # rows in flight per endpoint

    def __call__(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        """hidden [T, D], expert_ids and weights [T, K] -> [T, D] weighted sum of each row's experts."""
        return self.submit(layer, hidden, expert_ids, weights).result()

    def submit(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> PendingDispatch:
        """Send the layer's calls and return at once; `result()` collects (and retries) them."""
        if layer == 0 and time.monotonic() - self.table_read_at > self.cfg.table_max_age_s:
            self.refresh_table(False)  # between steps: every layer of a step routes by one table
        return PendingDispatch(self, layer, hidden, expert_ids, weights)

    def refresh_table(self, probe: bool) -> None:
        """Re-read the routing table; probe=True asks the controller to re-probe its hosts first."""
        self.table = self.fetch_table(probe)
        self.table_read_at = time.monotonic()

    def assign(self, layer: int, expert_ids: Tensor, todo: Tensor, failed: set[str]) -> dict[str, Tensor] | None:
        """Endpoint -> [T, K] mask of the slots it serves; None when some expert has no live replica.

        Each expert's slots go to one replica, the one with the fewest rows in flight or already
        assigned, biggest experts first, so a replicated expert's load spreads over its hosts.
        """
        load = dict(self.outstanding)
        wanted = torch.bincount(expert_ids[todo].long(), minlength=self.num_experts).tolist()
        chosen: dict[str, int] = {}  # endpoint -> its number in `owner`
        owner = [-1] * self.num_experts  # expert -> number of the endpoint its slots go to
        for expert in sorted(range(self.num_experts), key=lambda e: -wanted[e]):  # stable: ties by expert id
            rows = wanted[expert]
            if rows == 0:
                break
            live = [ep for ep in self.table.routes.get((layer, expert), ()) if ep not in failed]
            if not live:
                return None
            endpoint = min(live, key=lambda ep: load.get(ep, 0))
            load[endpoint] = load.get(endpoint, 0) + rows
            owner[expert] = chosen.setdefault(endpoint, len(chosen))
        served_by = torch.tensor(owner)[expert_ids.long()]  # [T, K] number of the endpoint of each slot
        return {endpoint: todo & (served_by == number) for endpoint, number in chosen.items()}

    def send(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor,
             assignment: dict[str, Tensor]) -> list[Call]:
        """Start one call per assigned host, all at once."""
        calls = []
        for endpoint, slots in sorted(assignment.items()):
            rows = torch.nonzero(slots.any(dim=1)).flatten()  # [T_h] each row once
            ids = torch.where(slots[rows], expert_ids[rows], -1).to(torch.int32)
            answer = self._client(endpoint).dispatch(layer, hidden.index_select(0, rows.to(hidden.device)), ids,
                                                     weights[rows].float().cpu(), self.cfg.call_timeout_s)
            self.outstanding[endpoint] = self.outstanding.get(endpoint, 0) + len(rows)
            calls.append(Call(endpoint, rows, slots, answer))
        return calls

    def collect(self, layer: int, expert_ids: Tensor, calls: list[Call], out: Tensor, todo: Tensor) -> set[str]:
        """Add the answers of `calls` into `out` and clear their slots in `todo`; returns endpoints that failed."""
        failed: set[str] = set()
        for call in calls:
            try:
                answer = ExpertClient.output(call.answer.result())
            except grpc.RpcError as err:
                failed.add(self._failure(layer, call.endpoint, expert_ids, call.slots, err))
                continue
            finally:
                self.outstanding[call.endpoint] -= len(call.rows)
            out.index_add_(0, call.rows.to(out.device), answer.to(out.device))
            todo &= ~call.slots
        return failed

    def _failure(self, layer: int, endpoint: str, expert_ids: Tensor, slots: Tensor, err: grpc.RpcError) -> str:
        code = err.code()
        experts = sorted(set(expert_ids[slots].tolist()))
        if code == STALE_ROUTE:
            log.info("layer %d experts %s moved off host %s; re-routing", layer, experts, endpoint)
            return endpoint
        if code not in RETRYABLE:
            raise err  # a malformed request or a host bug: retrying elsewhere would not help
        log.warning("layer %d experts %s: host %s failed (%s); retrying on another replica",
                    layer, experts, endpoint, code.name)
        self._drop_client(endpoint)
        return endpoint

    def wait_for_replica(self, layer: int, expert_ids: Tensor, todo: Tensor, failed: set[str],
                         give_up_at: float) -> None:
        """No live replica for some expert: refresh the table until one appears or the budget ends."""
        if time.monotonic() >= give_up_at:
            expert = self._orphan(layer, expert_ids, todo, failed)
            raise ExpertUnavailableError(layer, expert, self.cfg.restart_wait_s)
        time.sleep(self.cfg.retry_interval_s)
        self.refresh_table(True)
        failed.clear()  # endpoints in a fresh table are worth one more try

    def _orphan(self, layer: int, expert_ids: Tensor, todo: Tensor, failed: set[str]) -> int:
        for expert in sorted(set(expert_ids[todo].tolist())):
            if not [ep for ep in self.table.routes.get((layer, expert), ()) if ep not in failed]:
                return int(expert)
        return int(expert_ids[todo][0])

    def _client(self, endpoint: str) -> ExpertClient:
        if endpoint not in self.clients:
            self.clients[endpoint] = ExpertClient(endpoint, self.cfg.max_message_bytes, self.cfg.tls,
                                                  self.cfg.keepalive_s, self.cfg.keepalive_timeout_s)
        return self.clients[endpoint]

    def _drop_client(self, endpoint: str) -> None:
        client = self.clients.pop(endpoint, None)
        if client is not None:
            client.close()

    def close(self) -> None:
        for endpoint in list(self.clients):
            self._drop_client(endpoint)


class PendingDispatch:
    """One layer's expert calls, sent on construction; `result()` gathers answers and retries failures."""

    def __init__(self, backend: RemoteExperts, layer: int, hidden: Tensor, expert_ids: Tensor,
                 weights: Tensor) -> None:
        self.backend, self.layer, self.hidden, self.weights = backend, layer, hidden, weights
        self.expert_ids = expert_ids.cpu()
        self.out = torch.zeros_like(hidden)
        self.todo = torch.ones(expert_ids.shape, dtype=torch.bool)  # [T, K] slots not yet answered
        self.failed: set[str] = set()
        self.give_up_at = time.monotonic() + backend.cfg.restart_wait_s
        self.calls = self._send()

    def result(self) -> Tensor:
        """The [T, D] sum of every row's experts, once every slot has been answered by some replica."""
        backend = self.backend
        while True:
            newly_failed = backend.collect(self.layer, self.expert_ids, self.calls, self.out, self.todo)
            if newly_failed:
                self.failed |= newly_failed
                backend.refresh_table(True)
            if not bool(self.todo.any()):
                return self.out
            self.calls = self._send()

    def _send(self) -> list[Call]:
        backend = self.backend
        while bool(self.todo.any()):
            assignment = backend.assign(self.layer, self.expert_ids, self.todo, self.failed)
            if assignment is not None:
                return backend.send(self.layer, self.hidden, self.expert_ids, self.weights, assignment)
            backend.wait_for_replica(self.layer, self.expert_ids, self.todo, self.failed, self.give_up_at)
        return []
