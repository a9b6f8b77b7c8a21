"""The controller: a named, detached Ray actor that creates the expert hosts of a plan, watches them,
and serves the versioned routing table (layer, expert) -> live endpoints.

Hosts are placed through a placement group (one bundle per host, PACK or SPREAD over nodes) and
restarted by Ray after a crash (`max_restarts`); a restarted host listens on a new port, which the
next table refresh publishes under a new version. Everything it returns is plain JSON text or
JSON-able data: no project objects travel through Ray.

Several routers may use one controller and its hosts (router replicas, or a router restarted after a
crash while the hosts it started kept running). Each holds a lease it renews (`attach`); a router that
leaves calls `detach`, and the hosts stop with the last router that holds a live lease.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.placement import HostPlan, HostResources, PlacementPlan
from cluster.rebalance import Step, plan_after, plan_steps
from experts.actor import ExpertHost
from mixtral.config import DTYPES, ModelConfig

log = logging.getLogger(__name__)

class ControllerStopping(RuntimeError):
    """attach() on a controller whose last router has left: its hosts are stopping."""


RESTART_LEASE_GRACE_S = 60.0  # after a restart, longer than any router's lease (cluster.deploy.ROUTER_LEASE_S)


class Controller:
    """Creates and watches the hosts of one placement plan."""

    def __init__(self, name: str, plan_json: str, model_dir: str, dtype: str, resources: dict[str, Any],
                 max_message_bytes: int, tls_files: list[str] | None = None) -> None:
        self.plan = PlacementPlan.from_json(plan_json)
        self.initial_plan = self.plan  # what the hosts' constructors load (and a restarted host reloads)
        self.expert_bytes = ModelConfig.from_json(Path(model_dir) / "config.json").expert_num_params * \
            DTYPES[dtype].itemsize
        self.resources = HostResources(**resources)
        # What a router must agree with to use these hosts (see settings())
        self._settings = {"model_dir": model_dir, "dtype": dtype, "max_message_bytes": max_message_bytes,
                          "tls_files": tls_files or None}
        self._routers: dict[str, float] = {}  # router id -> time.monotonic() at which its lease ends
        self._leaving = False  # the last router has detached: the hosts are stopping
        self._hosts_down = threading.Event()  # set once shutdown() has stopped them
        self._adopted_at: float | None = None  # a restart knows no leases: see retire_if_unused
        self._watching = False
        self.version = 0
        self.endpoints: dict[str, str] = {}
        self._lock = threading.Lock()
        self._rebalancing = threading.Lock()  # one re-placement at a time
        self._stopped = threading.Event()
        # The placement group and the hosts are named and detached: they outlive this actor, so a
        # controller that Ray restarts adopts them (get_if_exists) instead of starting new ones.
        self.group, adopted = _placement_group(f"{name}-hosts", self._bundles(), self.resources.strategy)
        remote_host = ray.remote(ExpertHost)
        self.hosts: dict[str, Any] = {  # host id -> actor handle
            host.host_id: remote_host.options(
                name=f"{name}-{host.host_id}", lifetime="detached", get_if_exists=True,
                num_cpus=self.resources.num_cpus, num_gpus=self.resources.num_gpus,
                max_restarts=self.resources.max_restarts, max_concurrency=2,
                # Hosts wait on the network between layers: OpenMP threads should sleep, not spin on
                # cores the router and other hosts share.
                runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i),
            ).remote(host.host_id, model_dir, [list(e) for e in host.entries], dtype, max_message_bytes, tls_files)
            for i, host in enumerate(self.plan.hosts)
        }
        if adopted:
            log.warning("controller restarted: adopting the %d hosts of %s", len(self.hosts), name)
            self._adopted_at = time.monotonic()
            self._adopt_placement()
            self._probe()
            self._start_watch()

    def retire_if_unused(self, grace_s: float = 1.0) -> bool:
        """Stop every host if no router holds a live lease (hosts a router left when it died); True if stopped.

        A controller that Ray restarted knows no leases: it counts as in use for RESTART_LEASE_GRACE_S,
        while its routers' renewals come in again.
        """
        now = time.monotonic()
        with self._lock:
            in_use = self._live_routers(now) > 0 or (
                self._adopted_at is not None and now - self._adopted_at < RESTART_LEASE_GRACE_S)
            if in_use and not self._leaving:
                return False
            first = not self._leaving
            self._leaving = True
        self._stop_hosts_once(first, grace_s)
        return True

    def _bundles(self) -> list[dict[str, float]]:
        bundle = {"CPU": self.resources.num_cpus}
        if self.resources.num_gpus:
            bundle["GPU"] = self.resources.num_gpus
        return [dict(bundle) for _ in self.plan.hosts]

    def wait_ready(self) -> str:
        """Block until every host serves; returns the routing table. Raises naming hosts that did not start."""
        timeout = self.resources.ready_timeout_s
        ready, _ = ray.wait([self.group.ready()], timeout=timeout)
        if not ready:
            raise RuntimeError(f"Ray could not place {len(self.plan.hosts)} hosts of {self._bundle_text()} "
                               f"within {timeout:.0f} s; cluster resources: {ray.cluster_resources()}")
        refs = {host_id: handle.endpoint.remote() for host_id, handle in self.hosts.items()}
        _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        late = [h for h, ref in refs.items() if ref in pending]
        if late:
            raise RuntimeError(f"hosts {late} did not start serving within {timeout:.0f} s")
        with self._lock:
            self.endpoints = {h: ray.get(ref) for h, ref in refs.items()}
            self.version += 1
        self._start_watch()
        return self._table_json()

    def _start_watch(self) -> None:
        with self._lock:
            if self._watching:  # a second router's wait_ready, or a restarted controller's adoption
                return
            self._watching = True
        threading.Thread(target=self._watch, name="host-health", daemon=True).start()

    def settings(self) -> str:
        """JSON of what these hosts were started for, which a router must share to use them: model_dir, dtype,
        max_message_bytes, tls_files, the host resources and the initial plan (a re-placement since is kept)."""
        return json.dumps({**self._settings, "plan": self.initial_plan.to_json(),
                           "resources": dataclasses.asdict(self.resources)})

    def attach(self, router_id: str, lease_s: float) -> int:
        """Start or renew a router's lease on these hosts; returns the routers holding a live lease.

        Raises ControllerStopping once the last router has detached (the hosts are stopping): a router
        that arrives then starts a new controller when this one is gone.
        """
        now = time.monotonic()
        with self._lock:
            if self._leaving:
                raise ControllerStopping("the expert hosts are stopping: their last router left")
            self._routers[router_id] = now + lease_s
            return self._live_routers(now)

    def detach(self, router_id: str, lease_s: float, grace_s: float = 1.0) -> int:
        """A router leaves: returns how many other routers hold a live lease. With none, every host is
        stopped (after `grace_s` for calls in flight) before this returns 0, and attach refuses from then on.

        A router that died without detaching holds its lease until it runs out, so the hosts outlive it
        by up to one lease: a restarted router finds them running and attaches. A controller that Ray
        restarted first waits for a round of renewals (every third of `lease_s`, the leaving router's
        lease), so routers it has not heard from yet count.
        """
        if self._adopted_at is not None:
            time.sleep(max(0.0, self._adopted_at + lease_s / 3 + 1.0 - time.monotonic()))
        now = time.monotonic()
        with self._lock:
            self._routers.pop(router_id, None)
            others = self._live_routers(now)
            if others and not self._leaving:
                return others
            first = not self._leaving
            self._leaving = True
        self._stop_hosts_once(first, grace_s)
        return 0

    def _live_routers(self, now: float) -> int:
        """Routers whose lease has not run out at `now` (the caller holds the lock)."""
        return sum(1 for end in self._routers.values() if end > now)

    def _stop_hosts_once(self, first: bool, grace_s: float) -> None:
        """The first caller to find the hosts unused stops them; a later one waits until they are stopped."""
        if first:
            self.shutdown(grace_s)
        else:
            self._hosts_down.wait(timeout=120)

    def is_serving(self) -> bool:
        """True while every (layer, expert) of the plan has at least one live host."""
        with self._lock:
            live = set(self.endpoints)
        return all(any(h in live for h in self.plan.replicas(layer, expert))
                   for layer in range(self.plan.num_layers) for expert in range(self.plan.num_experts))

    def routing_table(self, refresh: bool = False) -> str:
        """JSON {"version", "routes": [[layer, expert, [endpoint, ...]], ...]}; refresh re-probes the hosts."""
        if refresh:
            self._probe()
        return self._table_json()

    def hosts_info(self) -> list[dict[str, Any]]:
        """Per host: id, endpoint, node id and IP, GPU ids, device, pid, expert bytes, resident bytes."""
        refs = [handle.info.remote() for handle in self.hosts.values()]
        return [ray.get(ref, timeout=self.resources.probe_timeout_s * 5) for ref in refs]

    def rebalance(self, plan_json: str, host_memory_bytes: int | None = None, settle_s: float = 1.0) -> str:
        """Move the running hosts to a new plan without stopping service; returns a JSON report.

        Steps come from cluster.rebalance.plan_steps (RebalanceError when no order fits the memory).
        An add is published once the host serves it; a drop is published first, and the host lets
        the experts go `settle_s` later, when routers have picked up the table (a router that has not
        gets FAILED_PRECONDITION and re-routes the rows after refreshing).
        """
        target = PlacementPlan.from_json(plan_json)
        with self._rebalancing:
            started = time.monotonic()
            steps = plan_steps(self.plan, target, self.expert_bytes, host_memory_bytes)
            for step in steps:
                self._apply(step, settle_s)
            log.warning("re-placement done: %d steps in %.1f s, routing table v%d", len(steps),
                        time.monotonic() - started, self.version)
            return json.dumps({"steps": len(steps), "seconds": time.monotonic() - started, "version": self.version,
                               "peak_bytes": {h.host_id: max([s.peak_bytes for s in steps if s.host_id == h.host_id],
                                                             default=0) for h in target.hosts}})

    def placement(self) -> str:
        """The plan being served now, as JSON (it changes with each re-placement step)."""
        with self._lock:
            return self.plan.to_json()

    def _apply(self, step: Step, settle_s: float) -> None:
        host, entries = self.hosts[step.host_id], [list(e) for e in step.entries]
        if step.dropped:
            self._publish(plan_after(self.plan, step))
            time.sleep(settle_s)
            ray.get(host.apply.remote(entries))
        else:
            ray.get(host.apply.remote(entries))
            self._publish(plan_after(self.plan, step))
        log.info("%s layer %d: +%s -%s (peak %.1f MiB)", step.host_id, step.layer, list(step.added),
                 list(step.dropped), step.peak_bytes / 2**20)

    def _publish(self, plan: PlacementPlan) -> None:
        with self._lock:
            self.plan = plan
            self.version += 1

    def _adopt_placement(self) -> None:
        """After a controller restart: the plan is what the adopted hosts serve (a re-placement may have
        changed it since the constructor's plan)."""
        try:
            held = {host_id: ray.get(handle.entries.remote(), timeout=self.resources.probe_timeout_s * 5)
                    for host_id, handle in self.hosts.items()}
        except Exception:  # a host is down: its restart reloads the constructor's plan, which stays
            log.warning("could not read every host's entries; serving the initial plan")
            return
        plan = PlacementPlan(self.plan.num_layers, self.plan.num_experts,
                             tuple(HostPlan(h, tuple((int(a), int(b)) for a, b in held[h])) for h in held))
        if all(plan.replicas(layer, expert) for layer in range(plan.num_layers) for expert in range(plan.num_experts)):
            self.plan = plan

    def shutdown(self, grace_s: float = 1.0) -> None:
        """Stop every host (after `grace_s` for calls in flight) and release the placement group."""
        self._stopped.set()
        try:
            for handle in self.hosts.values():
                try:
                    ray.get(handle.stop.remote(grace_s), timeout=grace_s + 5)
                except Exception:  # a host that is already gone needs no stopping
                    log.info("host already stopped")
                ray.kill(handle, no_restart=True)
            remove_placement_group(self.group)
        finally:
            self._hosts_down.set()

    def _watch(self) -> None:
        """Re-probe the hosts periodically, so a restarted host is published without a router asking."""
        while not self._stopped.wait(self.resources.health_interval_s):
            self._probe()

    def _probe(self) -> None:
        refs = {host_id: handle.endpoint.remote() for host_id, handle in self.hosts.items()}
        deadline = time.monotonic() + self.resources.probe_timeout_s
        endpoints = {}
        for host_id, ref in refs.items():
            try:
                endpoints[host_id] = ray.get(ref, timeout=max(0.01, deadline - time.monotonic()))
            except Exception:  # dead, restarting or slow: left out of the table until it answers
                log.warning("host %s did not answer its probe; left out of the routing table", host_id)
        for host_id in [h for h, ep in endpoints.items() if self.endpoints.get(h) != ep]:
            if not self._restore_entries(host_id):
                del endpoints[host_id]
        with self._lock:
            if endpoints != self.endpoints:
                gone = sorted(set(self.endpoints) - set(endpoints))
                new = sorted(h for h, ep in endpoints.items() if self.endpoints.get(h) != ep)
                log.warning("routing table v%d: hosts down %s, (re)started %s", self.version + 1, gone, new)
                self.endpoints = endpoints
                self.version += 1

    def _restore_entries(self, host_id: str) -> bool:
        """A (re)started host loads its constructor's entries: give it the current plan's, if they differ."""
        entries = [list(e) for e in self._host_plan(self.plan, host_id)]
        if entries == [list(e) for e in self._host_plan(self.initial_plan, host_id)]:
            return True
        try:
            ray.get(self.hosts[host_id].apply.remote(entries), timeout=self.resources.ready_timeout_s)
            return True
        except Exception:  # still starting or gone again: the next probe retries
            log.warning("host %s restarted but could not reload its re-placed experts", host_id)
            return False

    @staticmethod
    def _host_plan(plan: PlacementPlan, host_id: str) -> tuple[tuple[int, int], ...]:
        return next(tuple(sorted(h.entries)) for h in plan.hosts if h.host_id == host_id)

    def _table_json(self) -> str:
        with self._lock:
            routes = [[layer, expert, [self.endpoints[h] for h in self.plan.replicas(layer, expert)
                                       if h in self.endpoints]]
                      for layer in range(self.plan.num_layers) for expert in range(self.plan.num_experts)]
            return json.dumps({"version": self.version, "routes": routes})

    def _bundle_text(self) -> str:
        return f"{self.resources.num_cpus} CPU / {self.resources.num_gpus} GPU each"


def _placement_group(name: str, bundles: list[dict[str, float]], strategy: str) -> tuple[PlacementGroup, bool]:
    """The detached placement group `name`: (group, True) if it already existed, else a new one."""
    try:
        return get_placement_group(name), True
    except ValueError:
        return placement_group(bundles, strategy=strategy, name=name, lifetime="detached"), False
