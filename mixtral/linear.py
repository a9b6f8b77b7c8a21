"""Matmuls by fixed weights (nn.Linear layout [N, K]), pre-packed for oneDNN where that is faster and exact.

On a CPU, torch's bfloat16 `F.linear` reorders its weight into oneDNN's blocked layout on every call.
Reordering once at load time (`pack`) and calling oneDNN's linear on the result gives the same bits and,
measured on the 2-core CPU machine, is 1.35-1.5x faster at 1 to 16 rows, 1.6x for the LM head at 32
rows, and level with `F.linear` from a few hundred rows on. float32 is left alone: packing changes its
bits (by about 2e-6), and the reference tests hold float32 to the reference's own rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def packs(weight: Tensor) -> bool:
    """Whether `Projection.of` and the experts pack this weight (`packs_for` its dtype and device)."""
    return weight.numel() > 0 and packs_for(weight.dtype, weight.device)


def packs_for(dtype: torch.dtype, device: str | torch.device) -> bool:
    """bfloat16 on a CPU whose torch has oneDNN: the only case measured to give equal bits."""
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]


def pack(weight: Tensor) -> Tensor:
    """`weight` [N, K] in oneDNN's blocked layout: an opaque tensor only `packed_linear` can use."""
    packed: Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    return packed


def packed_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [M, K] @ weight.T for a weight made by `pack`: [M, N]."""
    out: Tensor = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")
    return out


@dataclass(frozen=True, slots=True)
class Projection:
    """A fixed weight [N, K] and the kernel that multiplies by it: `projection(x)` is F.linear(x, weight)."""

    weight: Tensor  # [N, K], or its packed form when `packed`
    packed: bool = False

    @classmethod
    def of(cls, weight: Tensor) -> Projection:
        """The weight packed where that is exact (`packs`), as it is otherwise."""
        return cls(pack(weight), packed=True) if packs(weight) else cls(weight)

    def __call__(self, x: Tensor) -> Tensor:
        """[..., K] -> [..., N]."""
        if not self.packed:
            return F.linear(x, self.weight)
        rows = x.reshape(-1, x.shape[-1])
        return packed_linear(rows, self.weight).reshape(*x.shape[:-1], -1)
