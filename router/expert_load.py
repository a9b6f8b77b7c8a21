"""Rows routed to each (layer, expert): the measured load a capacity planner starts from."""

from __future__ import annotations

import torch
from torch import Tensor

from mixtral.block import Experts, PendingExperts


class CountingExperts:
    """Wraps an expert backend and counts the (token, k) slots the gate sends to each expert."""

    def __init__(self, inner: Experts, num_layers: int, num_experts: int) -> None:
        self.inner = inner
        self.rows = torch.zeros(num_layers, num_experts, dtype=torch.int64)  # [L, E] since start

    def __call__(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        self._count(layer, expert_ids)
        return self.inner(layer, hidden, expert_ids, weights)

    def submit(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> PendingExperts:
        self._count(layer, expert_ids)
        return self.inner.submit(layer, hidden, expert_ids, weights)

    def _count(self, layer: int, expert_ids: Tensor) -> None:
        self.rows[layer] += torch.bincount(expert_ids.reshape(-1).cpu(), minlength=self.rows.shape[1])
