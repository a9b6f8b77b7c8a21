"""The expert-group scaler: sets how many worker pods each expert group runs.

On Kubernetes with KubeRay it changes `replicas` of named worker groups of the Helm release's
RayCluster (ray.io/v1) and nothing else; KubeRay then adds or removes the pods. On a standalone
Ray cluster (no KubeRay) it asks Ray's autoscaler for room for N expert hosts instead. Either can
run once or in a loop that re-reads the target, holding a group for a cool-down after each change.

The kubernetes client and ray.autoscaler are imported where they are used: `moe-cluster serve`
and `generate` never need them, and the kubernetes client takes a second to import.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes.client import CustomObjectsApi

log = logging.getLogger(__name__)

# KubeRay's RayCluster custom resource: API group, version, plural.
RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayclusters"
CHART_NAME = "moe-cluster"
# The key of the one scaling unit of the Ray autoscaler mode: expert hosts, not pods of a group.
HOSTS = "hosts"
JSON_PATCH = "application/json-patch+json"
REQUEST_TIMEOUT_S = 30.0

Manifest = dict[str, Any]
# The worker groups of the RayCluster as read (groupName -> its spec) -> wanted replicas per group.
# The specs let a target turn a number of expert hosts into pods of a group (pods_for_hosts).
Target = Callable[[Mapping[str, Manifest]], dict[str, int]]
# Expert hosts needed now: a fixed count, or the capacity model's answer for the latest load.
HostsNeeded = Callable[[], int]
MayChange = Callable[[str], bool]


class ScaleError(RuntimeError):
    """A round that could not be applied: the API server refused or kept conflicting, or the capacity
    model had no answer. The message says what to check."""


@dataclass(frozen=True, slots=True)
class Bounds:
    """The scaler's own limits for one group, on top of the RayCluster's minReplicas/maxReplicas."""

    low: int = 0
    high: int | None = None

    def __post_init__(self) -> None:
        if self.low < 0:
            raise ValueError(f"min replicas={self.low} must be at least 0")
        if self.high is not None and self.high < self.low:
            raise ValueError(f"max replicas={self.high} is less than min replicas={self.low}")


@dataclass(frozen=True, slots=True)
class ScalerConfig:
    """Which RayCluster to scale and how to write to it."""

    namespace: str
    raycluster: str
    bounds: Mapping[str, Bounds] = field(default_factory=dict)
    max_attempts: int = 5  # PATCHes tried before giving up on conflicts
    backoff_s: float = 0.5  # wait after the first conflict, doubled after each further one
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts} must be at least 1")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One round: the changes (group -> (replicas before, after)), the JSON Patch, whether it was sent."""

    changes: dict[str, tuple[int, int]]
    patch: list[Manifest]
    sent: bool


def raycluster_name(release: str, name_override: str = "", fullname_override: str = "") -> str:
    """The chart's RayCluster name for a release, as templates/_helpers.tpl makes it: the full
    name ("<release>-moe-cluster", or the release alone when it holds the chart name) cut to 40.

    Example: release "moe" -> "moe-moe-cluster"; release "moe-cluster-prod" -> "moe-cluster-prod".
    """
    if fullname_override:
        full = _trim(fullname_override[:63])
    else:
        name = name_override or CHART_NAME
        full = _trim((release if name in release else f"{release}-{name}")[:63])
    return _trim(full[:40])


def _trim(text: str) -> str:
    """Helm's `trimSuffix "-"`: one trailing dash, not all of them."""
    return text[:-1] if text.endswith("-") else text


def pods_for_hosts(num_hosts: int, group: Manifest, cpus_per_host: float, gpus_per_host: float) -> int:
    """Pods of a worker group that hold `num_hosts` expert hosts, from the group's Ray resources
    (rayStartParams num-cpus / num-gpus, which the chart sets on every worker group).

    Example: pods of 8 CPUs and 2 GPUs, hosts of 1 CPU and 1 GPU -> 2 hosts per pod; 5 hosts -> 3 pods.
    """
    params = group.get("rayStartParams") or {}
    fits = []
    for key, need in (("num-cpus", cpus_per_host), ("num-gpus", gpus_per_host)):
        if need > 0:
            fits.append(math.floor(float(params.get(key, 0)) / need + 1e-9))
    if not fits:
        raise ValueError("cpus_per_host and gpus_per_host are both 0: a host must need some resource")
    per_pod = min(fits)
    if per_pod < 1:
        raise ValueError(f"a pod of worker group {group.get('groupName')!r} (num-cpus={params.get('num-cpus')}, "
                         f"num-gpus={params.get('num-gpus')}) cannot hold one host of {cpus_per_host} CPUs and "
                         f"{gpus_per_host} GPUs")
    return math.ceil(num_hosts / per_pod)


def static_target(replicas: Mapping[str, int]) -> Target:
    """The same replicas every round (`--group NAME=N`)."""
    wanted = dict(replicas)
    return lambda groups: dict(wanted)


def clamp(name: str, wanted: int, group: Manifest, bounds: Bounds) -> int:
    """`wanted` within the scaler's bounds and the group's minReplicas/maxReplicas (KubeRay would
    cap replicas at maxReplicas anyway; the scaler never widens what the chart's values allow)."""
    low = max(bounds.low, int(group.get("minReplicas", 0)))
    highs = [h for h in (bounds.high, group.get("maxReplicas")) if h is not None]
    high = min(int(h) for h in highs) if highs else None
    if high is not None and low > high:
        raise ValueError(f"worker group {name!r}: no replica count fits min {low} and max {high} "
                         f"(--min/--max against the RayCluster's minReplicas/maxReplicas)")
    bounded = max(low, wanted if high is None else min(wanted, high))
    if bounded != wanted:
        log.info("worker group %s: %d replicas wanted, %d within bounds [%d, %s]", name, wanted, bounded, low, high)
    return bounded


def replica_patch(cluster: Manifest, replicas: Mapping[str, int]) -> list[Manifest]:
    """JSON Patch (RFC 6902) that sets `replicas` of the named worker groups; [] when nothing changes.

    Why JSON Patch: workerGroupSpecs is a list, so a merge patch would replace every group whole, and
    custom resources take no strategic merge patch. Why no `test` op on the resourceVersion: a failed
    test is 422, not a conflict. The first op instead writes the resourceVersion that was read back
    into the object: the API server compares it with the stored one and answers 409 Conflict when
    the object changed since (the same precondition as a PUT). The `test` of each groupName pins
    the list index to the group the patch means.
    """
    groups = cluster["spec"]["workerGroupSpecs"]
    ops: list[Manifest] = []
    for index, group in enumerate(groups):
        name = group["groupName"]
        if name not in replicas or group.get("replicas") == replicas[name]:
            continue
        path = f"/spec/workerGroupSpecs/{index}"
        ops.append({"op": "test", "path": f"{path}/groupName", "value": name})
        ops.append({"op": "replace" if "replicas" in group else "add", "path": f"{path}/replicas",
                    "value": replicas[name]})
    if not ops:
        return []
    version = cluster["metadata"]["resourceVersion"]
    return [{"op": "replace", "path": "/metadata/resourceVersion", "value": version}, *ops]


class RayClusterScaler:
    """Sets replicas of worker groups of one RayCluster: read, patch, and on 409 read again and retry."""

    def __init__(self, api: CustomObjectsApi, cfg: ScalerConfig, sleep: Callable[[float], None] = time.sleep):
        self.api = api
        self.cfg = cfg
        self._sleep = sleep

    def apply(self, target: Target, may_change: MayChange = lambda name: True) -> Outcome:
        """One round: the groups `target` names get its replicas (bounded), except those `may_change`
        holds. A dry run reads the RayCluster and sends no write."""
        for attempt in range(1, self.cfg.max_attempts + 1):
            cluster = self.read()
            changes = self._changes(cluster, target, may_change)
            patch = replica_patch(cluster, {name: new for name, (_, new) in changes.items()})
            if not patch or self.cfg.dry_run:
                return Outcome(changes if patch else {}, patch, sent=False)
            if self._patch(patch, attempt):
                log.info("RayCluster %s/%s: %s", self.cfg.namespace, self.cfg.raycluster, changes)
                return Outcome(changes, patch, sent=True)
            if attempt < self.cfg.max_attempts:
                self._sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
        raise ScaleError(f"RayCluster {self.cfg.namespace}/{self.cfg.raycluster} changed under every one of "
                         f"{self.cfg.max_attempts} patches (409 Conflict each time): another writer keeps "
                         "changing it; is a second scaler or the Ray autoscaler running?")

    def read(self) -> Manifest:
        from kubernetes.client.exceptions import ApiException

        try:
            found = self.api.get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, self.cfg.namespace, RAY_PLURAL, self.cfg.raycluster,
                _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as err:
            raise self._error("get", err) from None
        if not isinstance(found, dict):
            raise ScaleError(f"RayCluster {self.cfg.namespace}/{self.cfg.raycluster}: the API server answered "
                             f"{type(found).__name__}, not an object")
        return found

    def _changes(self, cluster: Manifest, target: Target, may_change: MayChange) -> dict[str, tuple[int, int]]:
        groups = {g["groupName"]: g for g in cluster["spec"].get("workerGroupSpecs") or []}
        changes = {}
        for name, wanted in target(groups).items():
            if name not in groups:
                raise ValueError(f"RayCluster {self.cfg.namespace}/{self.cfg.raycluster} has no worker group "
                                 f"{name!r}; its groups: {sorted(groups)}")
            now = int(groups[name].get("replicas", 0))
            new = clamp(name, wanted, groups[name], self.cfg.bounds.get(name, Bounds()))
            if new != now and may_change(name):
                changes[name] = (now, new)
        return changes

    def _patch(self, patch: list[Manifest], attempt: int) -> bool:
        """Send the patch; False on 409 Conflict (the object changed since it was read)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.patch_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, self.cfg.namespace, RAY_PLURAL, self.cfg.raycluster, patch,
                _content_type=JSON_PATCH, _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as err:
            if err.status != 409:
                raise self._error("patch", err) from None
            log.warning("RayCluster %s/%s changed since it was read (attempt %d of %d): reading it again",
                        self.cfg.namespace, self.cfg.raycluster, attempt, self.cfg.max_attempts)
            return False
        return True

    def _error(self, verb: str, err: Any) -> Exception:
        where = f"RayCluster {self.cfg.namespace}/{self.cfg.raycluster}"
        if err.status == 404:
            return ValueError(f"{where} not found: check --release/--raycluster and --namespace "
                              "(and that ray.mode is kuberay)")
        if err.status in (401, 403):
            return ScaleError(f"{verb} {where}: {err.status} {err.reason}: the scaler's account needs a Role "
                              "allowing get and patch on that RayCluster (the chart's scaler Role)")
        return ScaleError(f"{verb} {where}: {err.status} {err.reason}: {str(err.body)[:300]}")


class RayResourceRequest:
    """Standalone Ray (no KubeRay): asks the Ray autoscaler for room for N expert hosts, one bundle
    of the hosts' resources each. The request stands until the next one; it only matters where an
    autoscaler runs (a `ray up` cluster), which then adds nodes of its configured types."""

    def __init__(self, cpus_per_host: float, gpus_per_host: float, dry_run: bool = False,
                 request: Callable[..., None] | None = None):
        if cpus_per_host <= 0 and gpus_per_host <= 0:
            raise ValueError("cpus_per_host and gpus_per_host are both 0: a host must need some resource")
        self.bundle = {"CPU": cpus_per_host, **({"GPU": gpus_per_host} if gpus_per_host > 0 else {})}
        self.dry_run = dry_run
        self._request = request
        self._hosts: int | None = None  # None: nothing requested yet by this process

    def apply(self, target: Target, may_change: MayChange = lambda name: True) -> Outcome:
        wanted = target({})[HOSTS]
        if self._hosts is not None and wanted != self._hosts and not may_change(HOSTS):
            wanted = self._hosts
        bundles = [dict(self.bundle) for _ in range(wanted)]
        before = self._hosts or 0
        changes = {HOSTS: (before, wanted)} if wanted != before else {}
        if not self.dry_run:
            self._send(bundles)
            self._hosts = wanted
        return Outcome(changes, [{"bundles": bundles}], sent=not self.dry_run)

    def _send(self, bundles: list[dict[str, float]]) -> None:
        if self._request is None:
            from ray.autoscaler.sdk import request_resources

            self._request = request_resources
        self._request(bundles=bundles)


Applier = Callable[[Target, MayChange], Outcome]


@dataclass(frozen=True, slots=True)
class LoopConfig:
    interval_s: float  # between two rounds
    cooldown_s: float = 300.0  # a group the scaler changed keeps its replicas at least this long
    heartbeat: Path | None = None  # touched after every round: the pod's liveness probe reads its age

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.cooldown_s < 0:
            raise ValueError(f"interval={self.interval_s} must be > 0 and cooldown={self.cooldown_s} >= 0")


class ScaleLoop:
    """Re-reads the target every interval and applies it, holding each group for the cool-down after
    a change, so a noisy load does not make pods come and go (each new pod loads expert weights)."""

    def __init__(self, apply: Applier, target: Target, cfg: LoopConfig, report: Callable[[Outcome], None],
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self._apply, self._target, self.cfg, self._report = apply, target, cfg, report
        self._clock, self._sleep = clock, sleep
        self._changed_at: dict[str, float] = {}

    def may_change(self, name: str) -> bool:
        last = self._changed_at.get(name)
        return last is None or self._clock() - last >= self.cfg.cooldown_s

    def round(self) -> Outcome:
        outcome = self._apply(self._target, self.may_change)
        if outcome.sent:
            self._changed_at.update({name: self._clock() for name in outcome.changes})
        self._report(outcome)
        return outcome

    def run(self, rounds: int | None = None) -> None:
        """Run `rounds` rounds (None: forever). A refused or conflicting round is logged and the next
        one tries again; a wrong group name or bound (ValueError) ends the loop."""
        done = 0
        while rounds is None or done < rounds:
            try:
                self.round()
            except ScaleError as err:
                log.error("scale round failed: %s", err)
            if self.cfg.heartbeat is not None:
                self.cfg.heartbeat.touch()
            done += 1
            if rounds is None or done < rounds:
                self._sleep(self.cfg.interval_s)
