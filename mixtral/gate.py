"""The top-k gate of a sparse MoE layer (Mixtral's rule: softmax over all experts, keep the top k,
renormalise the kept weights to sum to 1).

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def route(router_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """[T, E] logits -> gate weights [T, K] (float32, rows sum to 1) and expert ids [T, K] (int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), expert_ids
