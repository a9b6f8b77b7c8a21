"""The gating service's engine: batches sequences into steps and runs the model with its KV cache.

A step feeds every unfinished sequence its next tokens: one for a decoding sequence, a chunk of
the prompt (within the step's token budget) for one still prefilling. Experts are reached only
through the `ExpertBackend` given to the model, so the in-process and the distributed runs are
this same code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from mixtral.attention import build_metadata
from mixtral.model import MicroBatch, Mixtral, forward_overlapped
from router.kv_cache import KVCache
from router.sampler import SamplingParams, new_generator, sample

log = logging.getLogger(__name__)


class ExpertBackend(Protocol):
    """Where a layer's experts run: sum_k weights[t, k] * expert_{ids[t, k]}(hidden[t])."""

    def __call__(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor: ...

    def close(self) -> None: ...


class RequestError(ValueError):
    """A request the engine cannot run as given (empty prompt, unknown token id, too long)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Per-step limits."""

    max_batch_tokens: int = 2048  # new tokens (prompt chunks + decodes) in one step
    overlap_microbatches: bool = False  # split a step in two so one half's attention overlaps the other's experts

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens} must be at least 1")


@dataclass(frozen=True, slots=True)
class Completion:
    """What one request produced."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only, a stop token included
    logprobs: list[float]  # log-probability of each generated token under the model
    finish_reason: str  # "stop" (EOS, stop token or string), "length", "cancelled", "deadline" or "error"


@dataclass(slots=True)
class SequenceState:
    """A running request: its tokens, how many of them the cache holds, and its sampling state."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    slot: int
    generator: torch.Generator
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    logprobs: list[float] = field(default_factory=list)
    num_cached: int = 0
    finish_reason: str | None = None

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    def completion(self) -> Completion:
        assert self.finish_reason is not None
        return Completion(self.request_id, self.prompt, self.tokens[len(self.prompt):], self.logprobs,
                          self.finish_reason)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step did: sequences that got a new token (their last), and those that finished."""

    sampled: list[SequenceState]
    finished: list[SequenceState]


@dataclass(frozen=True, slots=True)
class StepPlan:
    """The sequences of one step and how many new tokens each feeds."""

    sequences: list[SequenceState]
    num_new: list[int]


class Engine:
    """Runs admitted sequences to completion, a step at a time."""

    def __init__(self, model: Mixtral, cache: KVCache, cfg: EngineConfig | None = None) -> None:
        self.model = model
        self.cache = cache
        self.cfg = cfg or EngineConfig()
        self.running: list[SequenceState] = []

    def add(self, request_id: str, prompt: Sequence[int], params: SamplingParams) -> SequenceState:
        """Admit a request into a free cache slot (CacheFullError when none is free)."""
        prompt = list(prompt)
        self.check(prompt, params)
        config = self.model.config
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(config.eos_token_ids))
        seq = SequenceState(request_id, prompt, params, self.cache.allocate(), new_generator(params.seed),
                            frozenset(stop_ids), tokens=list(prompt))
        self.running.append(seq)
        return seq

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise RequestError naming what is wrong with a request (before it waits for a slot)."""
        vocab = self.model.config.vocab_size
        if not prompt:
            raise RequestError("the prompt is empty: give at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        total = len(prompt) + params.max_new_tokens
        if self.model.config.sliding_window is None and total > self.cache.max_seq_len:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                               f"= {total} exceeds the maximum sequence length {self.cache.max_seq_len}")

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
                 ) -> list[Completion]:
        """Run a batch of prompts together to completion; results in the order of `prompts`."""
        seqs = [self.add(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        try:
            while self.running:
                self.step()
        except Exception:
            self.abort_all()
            raise
        return [s.completion() for s in seqs]

    def warm_up(self) -> tuple[int, int]:
        """Run one step as large as this engine takes (every free slot, the step's whole token budget of
        prompt) and a decode step over it, then free everything: a GPU loads the kernels of those shapes and
        grows its allocator here rather than during the first requests (an H100's fresh servers took 0.3-1.6 s
        to the first token of their first burst, without this). -> (sequences, prompt tokens each)."""
        n = max(1, min(self.cache.num_free, self.cfg.max_batch_tokens))
        length = max(1, min(self.cfg.max_batch_tokens // n, self.cache.max_seq_len - 2))
        params = SamplingParams(max_new_tokens=max(1, min(2, self.cache.max_seq_len - length)), temperature=0.0,
                                ignore_eos=True)
        generator = torch.Generator().manual_seed(0)
        vocab = self.model.config.vocab_size
        self.generate([torch.randint(vocab, (length,), generator=generator).tolist() for _ in range(n)], [params] * n)
        return n, length

    def abort_all(self) -> list[SequenceState]:
        """Finish every running sequence with reason "error" and free its slot (after a failed step)."""
        aborted, self.running = self.running, []
        for seq in aborted:
            seq.finish_reason = "error"
            self.cache.free(seq.slot)
        return aborted

    def finish(self, seq: SequenceState, reason: str) -> None:
        """End a running sequence now (cancelled, deadline, a stop string) and free its cache slot."""
        if seq in self.running:
            self.running.remove(seq)
            self.cache.free(seq.slot)
        seq.finish_reason = reason

    def step(self) -> StepResult:
        """Run one forward pass over the running sequences: who got a new token, and who finished."""
        plan = self._plan()
        sampling = [s for s, n in zip(plan.sequences, plan.num_new, strict=True)
                    if s.num_cached + n == len(s.tokens)]
        logits = self._forward(plan, sampling)
        for seq, n in zip(plan.sequences, plan.num_new, strict=True):
            seq.num_cached += n
        token_ids, logprobs = sample(logits, [s.params for s in sampling], [s.generator for s in sampling])
        for seq, token, logprob in zip(sampling, token_ids, logprobs, strict=True):
            self._append(seq, token, logprob)
        finished = [s for s in self.running if s.finish_reason is not None]
        for seq in finished:
            self.running.remove(seq)
            self.cache.free(seq.slot)
        return StepResult(sampling, finished)

    def _plan(self) -> StepPlan:
        """Decoding sequences first (one token each), then prompt chunks while the budget lasts."""
        budget = self.cfg.max_batch_tokens
        ordered = sorted(self.running, key=lambda s: len(s.tokens) - s.num_cached > 1)
        plan = StepPlan([], [])
        for seq in ordered:
            n = min(len(seq.tokens) - seq.num_cached, budget)
            if n == 0:
                break
            plan.sequences.append(seq)
            plan.num_new.append(n)
            budget -= n
        plan_order = sorted(range(len(plan.sequences)), key=lambda i: plan.sequences[i].slot)
        return StepPlan([plan.sequences[i] for i in plan_order], [plan.num_new[i] for i in plan_order])

    def _forward(self, plan: StepPlan, sampling: list[SequenceState]) -> Tensor:
        """Logits [R, V] of the sequences that sample this step, in plan order, on the model's device (on a
        GPU `sample` picks greedy tokens there and copies back only what it needs)."""
        wanted = {id(s) for s in sampling}
        with torch.inference_mode():
            if self.cfg.overlap_microbatches and len(plan.sequences) >= 2:
                half = _balanced_split(plan.num_new)
                first = self._microbatch(plan.sequences[:half], plan.num_new[:half], wanted)
                second = self._microbatch(plan.sequences[half:], plan.num_new[half:], wanted)
                logits = torch.cat(forward_overlapped(self.model, first, second, self.cache.layers))
            else:
                batch = self._microbatch(plan.sequences, plan.num_new, wanted)
                logits = self.model.forward(batch.token_ids, batch.meta, self.cache.layers, batch.logit_rows)
        return logits

    def _microbatch(self, seqs: list[SequenceState], num_new: list[int], wanted: set[int]) -> MicroBatch:
        """Tokens, attention metadata and logit rows of a group of the step's sequences."""
        device = self.model.device
        meta = build_metadata([s.slot for s in seqs], [s.num_cached for s in seqs], num_new, self.cache.capacity,
                              self.model.config.sliding_window, device)
        token_ids = [t for s, n in zip(seqs, num_new, strict=True) for t in s.tokens[s.num_cached:s.num_cached + n]]
        ends = torch.cumsum(torch.tensor(num_new), 0) - 1
        rows = [int(ends[i]) for i, s in enumerate(seqs) if id(s) in wanted]
        return MicroBatch(torch.tensor(token_ids, device=device), meta,
                          torch.tensor(rows, dtype=torch.int64, device=device))

    def _append(self, seq: SequenceState, token: int, logprob: float) -> None:
        seq.tokens.append(token)
        seq.logprobs.append(logprob)
        if token in seq.stop_ids:
            seq.finish_reason = "stop"
        elif seq.num_generated >= seq.params.max_new_tokens:
            seq.finish_reason = "length"


def _balanced_split(num_new: list[int]) -> int:
    """Index splitting the step's sequences into two runs of about equal token counts (both non-empty)."""
    total, running = sum(num_new), 0
    for i, n in enumerate(num_new[:-1]):
        running += n
        if 2 * running >= total:
            return i + 1
    return len(num_new) - 1
