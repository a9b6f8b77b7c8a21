"""The router's KV cache: per layer, one ring buffer of keys and values per sequence slot.

Shapes: L layers, S slots (sequences that can run at once), Hkv key/value heads, C ring capacity,
Dh head size. Keys of layer l live in k[l] [S, Hkv, C, Dh]. For a sliding-window model C is at
most the window (older positions are overwritten), so a sequence's memory stops growing there.
Tensors are allocated zeroed and lazily backed by the OS, so unused capacity costs no RAM on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixtral.config import ModelConfig


class CacheFullError(RuntimeError):
    """Every slot is taken; retry when a running sequence finishes."""


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Slots and length of the cache."""

    num_slots: int = 8
    max_seq_len: int = 4096  # prompt + generated tokens of one sequence

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError(f"num_slots={self.num_slots} must be at least 1")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len={self.max_seq_len} must be at least 2")


def ring_capacity(model: ModelConfig, max_seq_len: int) -> int:
    """Positions kept per sequence: the window for sliding-window models, else the whole sequence."""
    if model.sliding_window is None:
        return max_seq_len
    return min(model.sliding_window, max_seq_len)


def slots_within(model: ModelConfig, max_seq_len: int, dtype: torch.dtype, budget_bytes: int) -> int:
    """How many sequences of `max_seq_len` positions a KV-cache budget holds (each slot is reserved whole)."""
    per_slot = 2 * model.num_hidden_layers * model.kv_size * ring_capacity(model, max_seq_len) * dtype.itemsize
    slots = budget_bytes // per_slot
    if slots < 1:
        raise ValueError(f"a KV-cache budget of {budget_bytes} bytes holds no sequence of {max_seq_len} positions "
                         f"(one needs {per_slot} bytes): raise the budget or lower the prompt / new-token limits")
    return int(slots)


class KVCache:
    """Per-layer (k, v) ring buffers and the free list of their slots."""

    def __init__(self, model: ModelConfig, cfg: CacheConfig, dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> None:
        self.max_seq_len = cfg.max_seq_len
        self.capacity = ring_capacity(model, cfg.max_seq_len)
        shape = (cfg.num_slots, model.num_key_value_heads, self.capacity, model.head_size)
        self.layers: list[tuple[Tensor, Tensor]] = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(model.num_hidden_layers)
        ]
        self._free = list(range(cfg.num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_bytes(self) -> int:
        k, _ = self.layers[0]
        return 2 * len(self.layers) * k.numel() * k.element_size()

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError("no free KV-cache slot")
        return self._free.pop()

    def free(self, slot: int) -> None:
        self._free.append(slot)
        self._free.sort(reverse=True)  # keep handing out low slots: consecutive slots read as a view
