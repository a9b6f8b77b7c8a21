"""One Mixtral decoder layer: RMSNorm, attention, RMSNorm, the top-k gate and the experts.

Shapes: T tokens, D hidden, H / Hkv heads, Dh head size, E experts, K experts per token.
The experts are whatever the layer is given (`Experts`): local weights in the reference model,
gRPC clients of remote hosts in the router. A dense Mistral layer routes every token to expert 0
with weight 1, so the same seam serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from mixtral import cpu_kernels
from mixtral.attention import AttentionMetadata, attend_projected
from mixtral.config import ModelConfig
from mixtral.gate import route
from mixtral.linear import Layout, Projection


class PendingExperts(Protocol):
    """Experts' answer for a layer that may still be computing elsewhere."""

    def result(self) -> Tensor: ...


class Experts(Protocol):
    """Computes sum_k weights[t, k] * expert_{ids[t, k]}(hidden[t]) for one layer: [T, D] -> [T, D]."""

    def __call__(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor: ...

    def submit(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> PendingExperts:
        """Start the computation and return at once, so other work overlaps it."""
        ...


class Done:
    """A PendingExperts that is already computed."""

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def result(self) -> Tensor:
        return self.value


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm computed in float32 and cast back before the scale, as the reference does (bf16 rows on a CPU
    with the kernels: in one call of `cpu_kernels.rms_norm`, eight torch ops fewer)."""
    if cpu_kernels.norms(x, weight):
        return cpu_kernels.rms_norm(x, weight, eps)
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """The router-side weights of one layer (everything but the experts)."""

    input_norm: Tensor  # [D]
    post_attention_norm: Tensor  # [D]
    wqkv: Projection  # [H*Dh + 2*Hkv*Dh, D]: q_proj, k_proj, v_proj stacked
    wo: Projection  # [D, H*Dh]
    gate: Projection | None  # [E, D]; None for a dense model


class DecoderLayer:
    """Pre-norm decoder layer with residual connections around attention and the MoE block."""

    def __init__(self, config: ModelConfig, index: int, weights: LayerWeights, experts: Experts) -> None:
        self.config = config
        self.index = index
        self.weights = weights
        self.experts = experts
        # Whether decode steps can run `cpu_kernels.decode_block`: every projection tiled, a gate to route with.
        self._tiled = weights.gate is not None and all(
            p.layout is Layout.TILES for p in (weights.wqkv, weights.wo, weights.gate))

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                 meta: AttentionMetadata) -> Tensor:
        """Hidden states [T, D] -> [T, D]; appends the tokens' keys and values to the caches."""
        x, h, expert_ids, gate_weights = self.attend_and_route(x, cos, sin, k_cache, v_cache, meta)
        return x + self.experts(self.index, h, expert_ids, gate_weights)

    def submit(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
               meta: AttentionMetadata) -> tuple[Tensor, PendingExperts]:
        """The layer with its experts still in flight: (residual [T, D], pending expert output [T, D])."""
        x, h, expert_ids, gate_weights = self.attend_and_route(x, cos, sin, k_cache, v_cache, meta)
        return x, self.experts.submit(self.index, h, expert_ids, gate_weights)

    def attend_and_route(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                         meta: AttentionMetadata) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Attention and the gate: (residual [T, D], normed input of the experts [T, D], ids [T, K], weights [T, K]).

        A decode step of tiled bf16 weights runs everything up to the gate's logits in one kernel call
        (`cpu_kernels.decode_block`, the bits of the separate calls below).
        """
        eps = self.config.rms_norm_eps
        w = self.weights
        if (self._tiled and meta.num_new_max == 1 and not meta.attend_before_write
                and cpu_kernels.blocks(x, k_cache, v_cache)):
            assert w.gate is not None
            x, h, logits = cpu_kernels.decode_block(
                x, w.input_norm, w.post_attention_norm, eps, w.wqkv.weight, w.wo.weight, w.gate.weight,
                self.config.num_attention_heads, cos, sin, k_cache, v_cache, meta.slots, meta.write_ring,
                meta.mask.reshape(meta.slots.shape[0], -1))
            gate_weights, expert_ids = route(w.gate.cut(logits), self.config.num_experts_per_tok)
            return x, h, expert_ids, gate_weights
        x = x + self._attention(rms_norm(x, self.weights.input_norm, eps), cos, sin, k_cache, v_cache, meta)
        h = rms_norm(x, self.weights.post_attention_norm, eps)
        expert_ids, gate_weights = self._gate(h)
        return x, h, expert_ids, gate_weights

    def _attention(self, h: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                   meta: AttentionMetadata) -> Tensor:
        qkv = self.weights.wqkv(h)  # [T, H*Dh + 2*Hkv*Dh]
        return self.weights.wo(attend_projected(qkv, cos, sin, k_cache, v_cache, self.config.num_attention_heads,
                                                meta))

    def _gate(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Expert ids [T, K] and weights [T, K] (float32) of each token."""
        if self.weights.gate is None:
            tokens = h.shape[0]
            return (torch.zeros(tokens, 1, dtype=torch.int64, device=h.device),
                    torch.ones(tokens, 1, dtype=torch.float32, device=h.device))
        weights, expert_ids = route(self.weights.gate(h), self.config.num_experts_per_tok)
        return expert_ids, weights
