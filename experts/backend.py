"""The in-process expert backend: every expert of the model in the router's own process.

The single-process reference that the distributed backends must reproduce.
"""

from __future__ import annotations

from torch import Tensor

from experts.weights import ExpertShard
from mixtral.block import Done
from mixtral.expert import HeldExperts, moe_output


class InProcessExperts:
    """Runs each layer's experts locally on the rows routed to them."""

    def __init__(self, shard: ExpertShard, num_experts: int) -> None:
        """Takes the shard over: its layers move into this backend (and `shard` is left empty), each in its
        fastest layout (`mixtral.linear.Layout`; `load_shard` already lays out what it loads)."""
        self.num_experts = num_experts
        self._layers: dict[int, HeldExperts] = {}
        for layer in list(shard.layers):
            self._layers[layer] = shard.layers.pop(layer).pack_for_cpu()

    def __call__(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        """Weighted sum of each token's experts: hidden [T, D], expert_ids and weights [T, K] -> [T, D]."""
        return moe_output(hidden, expert_ids, weights, self._layers[layer], self.num_experts)

    def submit(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> Done:
        """Computed at once: in one process there is nothing to overlap with."""
        return Done(self(layer, hidden, expert_ids, weights))

    def close(self) -> None:
        self._layers.clear()
