"""Rows routed to each (layer, expert): the measured load a capacity planner starts from.

`CountingExperts` counts since the router started; `LoadWindow` keeps timestamped copies of that
count so the rows of the last W seconds are a subtraction, with no cost per token or per step.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mixtral.block import Experts, PendingExperts


class CountingExperts:
    """Wraps an expert backend and counts the (token, k) slots the gate sends to each expert.

    The engine thread adds; other threads (admin, metrics) read through `snapshot`. A snapshot taken
    while a step runs holds that step's rows for the layers already run only. The count lives on the
    device of the expert ids it is given, so that on a GPU counting reads nothing back to the host.
    """

    def __init__(self, inner: Experts, num_layers: int, num_experts: int) -> None:
        self.inner = inner
        self.rows = torch.zeros(num_layers, num_experts, dtype=torch.int64)  # [L, E] since start
        self._lock = threading.Lock()

    def __call__(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        self._count(layer, expert_ids)
        return self.inner(layer, hidden, expert_ids, weights)

    def submit(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> PendingExperts:
        self._count(layer, expert_ids)
        return self.inner.submit(layer, hidden, expert_ids, weights)

    def snapshot(self) -> Tensor:
        """A copy of the rows so far, [L, E] int64 on the CPU, never half-way through a layer's update."""
        with self._lock:
            return self.rows.to("cpu", copy=True)

    def reset(self) -> None:
        """Count from zero again (after a warm-up, whose rows are no one's load)."""
        with self._lock:
            self.rows = torch.zeros_like(self.rows)  # a new tensor: the engine may have made rows in inference mode

    def _count(self, layer: int, expert_ids: Tensor) -> None:
        ids = expert_ids.reshape(-1).long()
        with self._lock:
            if self.rows.device != ids.device:
                with torch.inference_mode(False):  # a plain tensor, which other threads may update outside it
                    self.rows = self.rows.to(ids.device)
            # index_add_, not bincount: CUDA's bincount reads the largest id back to the host
            self.rows[layer].index_add_(0, ids, torch.ones_like(ids))


@dataclass(frozen=True, slots=True)
class LoadWindowConfig:
    """How finely and how far back the load window remembers."""

    interval_s: float = 5.0  # least time between two snapshots: the window's granularity
    max_window_s: float = 3600.0  # snapshots older than this are dropped (a longer window gets what is held)

    def __post_init__(self) -> None:
        if not 0 < self.interval_s < math.inf:
            raise ValueError(f"interval_s={self.interval_s} must be a positive number of seconds")
        if not self.interval_s <= self.max_window_s < math.inf:
            raise ValueError(f"max_window_s={self.max_window_s} must be finite and at least interval_s "
                             f"({self.interval_s})")


@dataclass(frozen=True, slots=True)
class WindowedLoad:
    """Rows per (layer, expert) counted over `window_s` seconds up to now."""

    rows: tuple[tuple[int, ...], ...]  # [L][E]
    window_s: float


class LoadWindow:
    """Rows of the last W seconds, from snapshots of a CountingExperts taken at least `interval_s` apart.

    `sample()` is called often (the serve loop calls it every second; it copies only when `interval_s`
    has passed); `over(W)` also samples, then subtracts the newest snapshot at least W seconds old from
    the count now. So the window answered starts 0 to one snapshot spacing before now - W, and
    `WindowedLoad.window_s` is its exact length.

    Example: interval 5 s, snapshots at t = 0, 5, 10, 15; at t = 17, over(10) subtracts the snapshot
    of t = 5 and answers 12 s; over(0) answers everything since t = 0 (the window's creation).
    """

    def __init__(self, counter: CountingExperts, cfg: LoadWindowConfig = LoadWindowConfig(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counter, self.cfg, self.clock = counter, cfg, clock
        self._start = (clock(), counter.snapshot())
        # One more than the window needs, so a snapshot at least max_window_s old is kept.
        self._snapshots = deque([self._start], maxlen=math.ceil(cfg.max_window_s / cfg.interval_s) + 2)
        self._lock = threading.Lock()  # sample() runs on the event loop's executor and the admin service

    def sample(self) -> None:
        """Keep a snapshot of the count if `interval_s` has passed since the last one."""
        now = self.clock()
        with self._lock:
            if now - self._snapshots[-1][0] >= self.cfg.interval_s:
                self._snapshots.append((now, self.counter.snapshot()))

    def over(self, window_s: float) -> WindowedLoad:
        """Rows of the last `window_s` seconds (0: since the window was made); see the class doc."""
        if not 0 <= window_s < math.inf:
            raise ValueError(f"window_s={window_s} must be a finite number of seconds >= 0")
        self.sample()
        now, current = self.clock(), self.counter.snapshot()
        with self._lock:
            since, base = self._start if window_s == 0 else self._baseline(now - window_s)
        rows = (current - base).tolist()
        return WindowedLoad(tuple(tuple(int(v) for v in layer) for layer in rows), now - since)

    def _baseline(self, cutoff: float) -> tuple[float, Tensor]:
        """The newest snapshot taken at or before `cutoff`, else the oldest held."""
        older = [snap for snap in self._snapshots if snap[0] <= cutoff]
        return older[-1] if older else self._snapshots[0]
