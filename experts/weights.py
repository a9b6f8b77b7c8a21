"""A shard of expert weights: the (layer, expert) entries one host serves, read lazily from the checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mixtral.checkpoint import Checkpoint, expert_tensor_names
from mixtral.expert import ExpertWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExpertShard:
    """Weights of the (layer, expert) pairs a host serves."""

    experts: dict[tuple[int, int], ExpertWeights]

    def layer(self, layer: int) -> dict[int, ExpertWeights]:
        """Expert id -> weights of the experts hosted for `layer`."""
        return {expert: w for (lyr, expert), w in self.experts.items() if lyr == layer}

    @property
    def num_bytes(self) -> int:
        return sum(w.num_bytes for w in self.experts.values())


def all_experts(checkpoint: Checkpoint) -> list[tuple[int, int]]:
    cfg = checkpoint.config
    layers, experts = range(cfg.num_hidden_layers), range(cfg.num_local_experts)
    return [(layer, expert) for layer in layers for expert in experts]


def load_shard(checkpoint: Checkpoint, entries: Iterable[tuple[int, int]], dtype: torch.dtype,
               device: str | torch.device = "cpu") -> ExpertShard:
    """Load only the listed (layer, expert) tensors, one expert at a time to bound peak memory."""
    experts: dict[tuple[int, int], ExpertWeights] = {}
    for layer, expert in entries:
        names = expert_tensor_names(checkpoint.config, layer, expert)
        t = checkpoint.load(names.values(), dtype, device, copy=False)  # from_checkpoint makes the one copy
        experts[(layer, expert)] = ExpertWeights.from_checkpoint(
            t[names["w1"]], t[names["w2"]], t[names["w3"]])
    shard = ExpertShard(experts)
    log.info("loaded %d experts (%.1f MiB)", len(experts), shard.num_bytes / 2**20)
    return shard
