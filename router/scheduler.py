"""Continuous batching: requests join the running batch at the next step and leave when done.

One engine thread owns the engine (and so the KV cache): it admits waiting requests into free cache
slots, runs a step, and reports each new token and each finish through the request's `sink`.
Prompts are prefilled in chunks under the engine's per-step token budget, so running streams keep
flowing while a long prompt arrives. The waiting queue is bounded (QueueFullError with a retry
hint); cancellations and deadlines take effect between steps, freeing the slot within one step.
Other threads only call `submit`, `finish` and `stop`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from router.engine import Engine, SequenceState
from router.sampler import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is full; the client should retry after `retry_after_s`."""

    def __init__(self, queued: int, retry_after_s: float) -> None:
        super().__init__(f"the server's queue is full ({queued} requests waiting); retry in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class DrainingError(RuntimeError):
    """The server is shutting down and accepts no new requests."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Admission limits."""

    max_queue: int = 64  # requests waiting for a cache slot
    # torch threads of the engine thread; None: the process's setting. The engine thread should be the
    # only one that runs parallel torch ops: a second OpenMP team (e.g. the thread that loaded the model
    # with 2 threads) makes libgomp put its workers to sleep between ops, 25% slower steps on 2 cores.
    engine_threads: int | None = None

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError(f"max_queue={self.max_queue} must be >= 0")
        if self.engine_threads is not None and self.engine_threads < 1:
            raise ValueError(f"engine_threads={self.engine_threads} must be at least 1")


@dataclass(frozen=True, slots=True)
class Token:
    """A new token of a request."""

    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class Finished:
    """The end of a request: reason "stop", "length", "cancelled", "deadline" or "error"."""

    reason: str
    error: str | None = None


Event = Token | Finished


@dataclass
class Request:
    """A generation request as the scheduler sees it. `sink` is called on the engine thread."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    deadline: float | None = None  # time.monotonic() by which it must finish
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when it got a cache slot
    seq: SequenceState | None = None


class Scheduler:
    """Owns the engine thread; thread-safe `submit` / `finish` / `stop`."""

    def __init__(self, engine: Engine, cfg: SchedulerConfig | None = None) -> None:
        self.engine = engine
        self.cfg = cfg or SchedulerConfig()
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self._finish_asked: dict[str, str] = {}  # request id -> reason, applied between steps
        self._cond = threading.Condition()
        self._stopping = False
        self._thread_should_exit = False
        self._step_s = 0.05  # moving estimate of a step's duration, for retry hints
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def is_draining(self) -> bool:
        """True once `stop` was called: new requests are refused."""
        return self._stopping

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def submit(self, request: Request) -> None:
        """Queue a request; RequestError if it cannot run, QueueFullError / DrainingError if not now."""
        self.engine.check(request.prompt, request.params)
        with self._cond:
            if self._stopping:
                raise DrainingError("the server is shutting down; retry on another replica")
            # Requests beyond the free cache slots wait; at most max_queue of them.
            if len(self.waiting) >= self.cfg.max_queue + self.engine.cache.num_free:
                raise QueueFullError(len(self.waiting), self._retry_hint())
            self.waiting.append(request)
            self._cond.notify()

    def finish(self, request_id: str, reason: str = "cancelled") -> None:
        """End a request (client cancel, stop string): its slot is freed before the next step."""
        with self._cond:
            self._finish_asked[request_id] = reason
            self._cond.notify()

    def stop(self, drain_s: float) -> None:
        """Refuse new requests; let running and queued ones finish for up to `drain_s`, then cancel the rest."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        deadline = time.monotonic() + drain_s
        while (self.waiting or self.running) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._cond:
            for request_id in [r.request_id for r in self.waiting] + list(self.running):
                self._finish_asked[request_id] = "cancelled"
            self._thread_should_exit = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _retry_hint(self) -> float:
        return max(0.1, round(self._step_s * 16, 1))

    def _run(self) -> None:
        if self.cfg.engine_threads is not None:
            torch.set_num_threads(self.cfg.engine_threads)
        while True:
            with self._cond:
                while not (self.waiting or self.running or self._finish_asked or self._thread_should_exit):
                    self._cond.wait()
                if self._thread_should_exit and not (self.running or self.waiting or self._finish_asked):
                    return
                self._apply_finishes()
                self._expire()
                self._admit()
            if self.engine.running:
                self._step()

    def _apply_finishes(self) -> None:
        asked, self._finish_asked = self._finish_asked, {}
        for request_id, reason in asked.items():
            waiting = [r for r in self.waiting if r.request_id == request_id]
            for request in waiting:
                self.waiting.remove(request)
                request.sink(Finished(reason))
            if request_id in self.running:
                self._end(self.running[request_id], reason)

    def _expire(self) -> None:
        now = time.monotonic()
        for request in [r for r in self.waiting if r.deadline is not None and r.deadline <= now]:
            self.waiting.remove(request)
            request.sink(Finished("deadline"))
        for request in [r for r in self.running.values() if r.deadline is not None and r.deadline <= now]:
            self._end(request, "deadline")

    def _admit(self) -> None:
        while self.waiting and self.engine.cache.num_free > 0:
            request = self.waiting.popleft()
            request.seq = self.engine.add(request.request_id, request.prompt, request.params)
            request.started_at = time.monotonic()
            self.running[request.request_id] = request

    def _end(self, request: Request, reason: str) -> None:
        assert request.seq is not None
        self.engine.finish(request.seq, reason)
        del self.running[request.request_id]
        request.sink(Finished(reason))

    def _step(self) -> None:
        start = time.monotonic()
        try:
            result = self.engine.step()
        except Exception as err:  # the step failed (e.g. no expert host answered): fail its requests only
            log.error("engine step failed: %s", err)
            with self._cond:
                for seq in self.engine.abort_all():
                    request = self.running.pop(seq.request_id, None)
                    if request is not None:
                        request.sink(Finished("error", error=str(err)))
            return
        self._step_s = 0.9 * self._step_s + 0.1 * (time.monotonic() - start)
        by_id = self.running
        for seq in result.sampled:
            by_id[seq.request_id].sink(Token(seq.tokens[-1], seq.logprobs[-1]))
        with self._cond:
            for seq in result.finished:
                request = self.running.pop(seq.request_id, None)
                if request is not None:
                    assert seq.finish_reason is not None
                    request.sink(Finished(seq.finish_reason))
