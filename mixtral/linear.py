"""Matmuls by fixed weights (nn.Linear layout [N, K]), with each weight laid out once for the fastest exact kernel.

Three layouts, chosen per weight when it is loaded (`Layout.for_weight`):
- TILES: moe-cluster's own AVX512-BF16 kernel (`mixtral.cpu_kernels`): bfloat16 on a CPU that has it.
  The fastest measured on the 2-core CPU machine at every row count (1.4-1.9x oneDNN at 1-4 rows).
- ONEDNN: float32, and bfloat16 on other CPUs. torch's `F.linear` reorders a bf16 weight into oneDNN's
  blocked layout on every call; reordering once at load time gives the same bf16 bits, 1.35-1.6x faster
  at 1 to 32 rows. For float32, `F.linear` runs another kernel; oneDNN on packed weights made the
  engine's float32 decode step 2.6x (8 sequences) to 3.4x (32) faster and its prefill 1.2-2x, with
  results that differ from `F.linear`'s by float32 rounding (about 1e-6 relative).
- PLAIN: everything else (CUDA; CPU builds of torch without oneDNN): `F.linear`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
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
        return cls.for_shape(weight.shape, weight.dtype, weight.device)

    @classmethod
    def for_shape(cls, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> Layout:
        """`for_weight` of a weight not yet made (a loader choosing how to fill its stacks)."""
        if cpu_kernels.tiles_fit(shape, dtype, device):
            return cls.TILES
        if onednn_packs_for(shape, dtype, device):
            return cls.ONEDNN
        return cls.PLAIN


def onednn_packs_for(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether oneDNN packs a weight of this shape, dtype and device: bfloat16 or float32 on a CPU whose
    torch has oneDNN."""
    return (torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float32) and math.prod(shape) > 0
            and torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]


def lay_out(weight: Tensor, layout: Layout) -> Tensor:
    """`weight` [N, K] in `layout` (a new tensor unless PLAIN)."""
    if layout is Layout.TILES:
        return cpu_kernels.to_tiles(weight)
    if layout is Layout.ONEDNN:
        packed: Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        return packed
    return weight


def plain(weight: Tensor, layout: Layout) -> Tensor:
    """The inverse of `lay_out`: the weight [N, K] in nn.Linear layout (a new tensor unless PLAIN)."""
    if layout is Layout.TILES:
        return cpu_kernels.from_tiles(weight)
    if layout is Layout.ONEDNN:
        return weight.to_dense()
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
    """A fixed weight [N, K] in its best layout: `projection(x)` is F.linear(x, weight).

    A bfloat16 weight whose N is not whole tiles (the gate's 8 experts) is padded with zero rows to the
    next multiple of 16 and tiled: `features` is then its own N, and the padding's outputs are cut off.
    In the engine's profile at 32 rows, `F.linear` took 134 us per gate call; alone, it takes 28 us and
    the tiled kernel 14 us.
    """

    weight: Tensor
    layout: Layout = Layout.PLAIN
    features: int | None = None  # N of the weight when the laid-out weight has padding rows

    @classmethod
    def of(cls, weight: Tensor) -> Projection:
        layout = Layout.for_weight(weight)
        if layout is not Layout.TILES and weight.dim() == 2:
            padding = -weight.shape[0] % cpu_kernels.TILE
            if padding and cpu_kernels.tiles_fit((weight.shape[0] + padding, weight.shape[1]), weight.dtype,
                                                 weight.device):
                padded = torch.cat((weight, weight.new_zeros(padding, weight.shape[1])))
                return cls(cpu_kernels.to_tiles(padded), Layout.TILES, weight.shape[0])
        return cls(lay_out(weight, layout), layout)

    def __call__(self, x: Tensor) -> Tensor:
        """[..., K] -> [..., N]."""
        if self.layout is Layout.PLAIN:
            return F.linear(x, self.weight)
        features = self.weight.shape[0] if self.features is None else self.features
        if x.numel() == 0:
            return x.new_empty(*x.shape[:-1], features)
        out = self.cut(linear(x.reshape(-1, x.shape[-1]), self.weight, self.layout))
        return out.reshape(*x.shape[:-1], features)

    def cut(self, out: Tensor) -> Tensor:
        """Outputs [M, N + padding] of the laid-out weight -> the weight's own [M, N]."""
        return out if self.features is None else out[:, :self.features]
