"""Matmuls by fixed weights (nn.Linear layout [N, K]), with each weight laid out once for the fastest exact kernel.

Three layouts, chosen per weight when it is loaded (`Layout.for_weight`):
- TILES: moe-cluster's own AVX512-BF16 kernel (`mixtral.cpu_kernels`): bfloat16 on a CPU that has it.
  The fastest measured on the 2-core CPU machine at every row count (1.4-1.9x oneDNN at 1-4 rows).
- ONEDNN: bfloat16 on other CPUs. torch's `F.linear` reorders a bf16 weight into oneDNN's blocked layout
  on every call; reordering once at load time gives the same bits, 1.35-1.6x faster at 1 to 32 rows.
- PLAIN: everything else (float32, whose bits packing would change by about 2e-6; CUDA): `F.linear`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mixtral import cpu_kernels


class Layout(enum.Enum):
    PLAIN = "plain"
    ONEDNN = "onednn"  # opaque: usable by `linear` only
    TILES = "tiles"  # a regular tensor of the same shape: stackable, copyable

    @classmethod
    def for_weight(cls, weight: Tensor) -> Layout:
        """The layout a weight of this dtype, shape and device is best kept in."""
        if cpu_kernels.tiles_for(weight):
            return cls.TILES
        if onednn_packs(weight):
            return cls.ONEDNN
        return cls.PLAIN


def onednn_packs(weight: Tensor) -> bool:
    """bfloat16 on a CPU whose torch has oneDNN: the only case measured to give equal bits."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.numel() > 0
            and torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]


def lay_out(weight: Tensor, layout: Layout) -> Tensor:
    """`weight` [N, K] in `layout` (a new tensor unless PLAIN)."""
    if layout is Layout.TILES:
        return cpu_kernels.to_tiles(weight)
    if layout is Layout.ONEDNN:
        packed: Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        return packed
    return weight


def linear(x: Tensor, weight: Tensor, layout: Layout) -> Tensor:
    """x [M, K] @ W.T for a weight W kept in `layout`: [M, N]."""
    if layout is Layout.TILES:
        return cpu_kernels.tiled_linear(x, weight)
    if layout is Layout.ONEDNN:
        out: Tensor = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")
        return out
    return F.linear(x, weight)


@dataclass(frozen=True, slots=True)
class Projection:
    """A fixed weight [N, K] in its best layout: `projection(x)` is F.linear(x, weight)."""

    weight: Tensor
    layout: Layout = Layout.PLAIN

    @classmethod
    def of(cls, weight: Tensor) -> Projection:
        layout = Layout.for_weight(weight)
        return cls(lay_out(weight, layout), layout)

    def __call__(self, x: Tensor) -> Tensor:
        """[..., K] -> [..., N]."""
        if self.layout is Layout.PLAIN:
            return F.linear(x, self.weight)
        rows = x.reshape(-1, x.shape[-1])
        return linear(rows, self.weight, self.layout).reshape(*x.shape[:-1], -1)
