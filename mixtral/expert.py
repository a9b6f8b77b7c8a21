"""SwiGLU experts and the grouped MoE combine shared by the reference model and the expert hosts.

Shapes: T tokens, D hidden, F FFN width, E experts, K experts per token, R routed rows (T * K).
Weights are in nn.Linear layout; w1 (gate) and w3 (up) are concatenated into one [2F, D] matrix so
an expert runs two matmuls instead of three. The experts of a layer that a process holds are stored
stacked ([N, 2F, D] and [N, D, F]): one allocation per layer. Each weight is kept in a `Layout`
(`mixtral.linear`): on a CPU with AVX512-BF16, bfloat16 stacks hold moe-cluster's tiled layout
(same shapes); on other CPUs bfloat16 experts are packed for oneDNN one tensor each (`PackedExperts`).

The experts run in a loop, each on exactly its rows; for tiled stacks the whole loop (grouping,
gather, SwiGLU, weighted sum) is one call of the CPU kernels (`moe_forward`), with the same bits. A
batched matmul over the stacks (rows padded to the busiest expert) was measured on the 2-core CPU
machine: no faster at 32 decoding sequences (uneven routing pads 64 rows to about 110) and 20% slower
at 8, so it is not used there. On a GPU, batches of decode size (`DENSE_MAX_TOKENS`) run every held expert on
every row instead (`moe_dense`): the loop's per-expert kernels and the host syncs of grouping (the rows per
expert are read back to size each expert's matmul) cost far more than reading each expert's weights once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mixtral import cpu_kernels
from mixtral.linear import Layout, lay_out, linear, plain


@dataclass(frozen=True, slots=True)
class ExpertWeights:
    """One expert: w13 = cat(w1, w3) [2F, D], w2 [D, F], both kept in `layout`."""

    w13: Tensor
    w2: Tensor
    layout: Layout = Layout.PLAIN

    @classmethod
    def from_checkpoint(cls, w1: Tensor, w2: Tensor, w3: Tensor) -> ExpertWeights:
        """Own copies of the weights (the inputs may be views of a memory-mapped checkpoint)."""
        return cls(w13=torch.cat((w1, w3), dim=0), w2=w2.clone(memory_format=torch.contiguous_format))

    @property
    def num_bytes(self) -> int:
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()

    def laid_out(self, layout: Layout) -> ExpertWeights:
        """Copies of plain weights in `layout`."""
        return ExpertWeights(lay_out(self.w13, layout), lay_out(self.w2, layout), layout)

    def plain(self) -> ExpertWeights:
        """The weights in nn.Linear layout (copies unless PLAIN already): for inspecting, not computing."""
        return ExpertWeights(plain(self.w13, self.layout), plain(self.w2, self.layout))


class LayerExperts(Mapping[int, ExpertWeights]):
    """The experts of one layer held by a process, stacked: w13 [N, 2F, D], w2 [N, D, F] for `ids` ascending,
    each expert's weights in `layout` (PLAIN or TILES: the layouts that stack).

    As a mapping it gives each expert's weights as views into the stacks: there is one copy.
    """

    def __init__(self, ids: Sequence[int], w13: Tensor, w2: Tensor, layout: Layout = Layout.PLAIN) -> None:
        if list(ids) != sorted(set(ids)) or w13.shape[0] != len(ids) or w2.shape[0] != len(ids):
            raise ValueError(f"expert ids {list(ids)} must be ascending and match stacks of {w13.shape[0]} experts")
        if layout is Layout.ONEDNN:
            raise ValueError("oneDNN-packed experts do not stack: use PackedExperts")
        self.ids = tuple(ids)
        self.w13 = w13
        self.w2 = w2
        self.layout = layout
        self._index = {expert: i for i, expert in enumerate(self.ids)}
        self._slots: Tensor | None = None

    @classmethod
    def stack(cls, experts: Mapping[int, ExpertWeights]) -> LayerExperts:
        """Copy separately held experts (all in one stackable layout) into stacks (tests and small models;
        hosts fill stacks in place)."""
        ids = sorted(experts)
        if not ids:
            return cls((), torch.empty(0, 0, 0), torch.empty(0, 0, 0))
        layouts = {experts[i].layout for i in ids}
        if len(layouts) != 1:
            raise ValueError(f"experts in several layouts do not stack: {sorted(lay.value for lay in layouts)}")
        return cls(ids, torch.stack([experts[i].w13 for i in ids]), torch.stack([experts[i].w2 for i in ids]),
                   layouts.pop())

    def __getitem__(self, expert: int) -> ExpertWeights:
        i = self._index[expert]
        return ExpertWeights(self.w13[i], self.w2[i], self.layout)

    def slots(self, num_experts: int) -> Tensor:
        """[E] int64 on the stacks' device: each expert's index in the stacks, -1 for the layer's experts not
        held here."""
        if self._slots is None or self._slots.shape[0] != num_experts:
            self._slots = torch.tensor([self._index.get(e, -1) for e in range(num_experts)], dtype=torch.int64,
                                       device=self.w13.device)
        return self._slots

    def pack_for_cpu(self) -> LayerExperts | PackedExperts:
        """The same experts in their fastest layout (`Layout.for_weight`): tiled into new stacks, packed for
        oneDNN one tensor each, or self when PLAIN is best or they are laid out already."""
        if self.layout is not Layout.PLAIN or not self.ids:
            return self
        layout = Layout.for_weight(self.w13[0])
        if layout is Layout.TILES:
            return LayerExperts(self.ids, self.w13.clone(), self.w2.clone()).tile_in_place()
        if layout is Layout.ONEDNN:
            return PackedExperts({expert: weights.laid_out(layout) for expert, weights in self.items()}, self.num_bytes)
        return self

    def tile_in_place(self) -> LayerExperts:
        """These stacks re-laid as TILES in place, one expert at a time (a loader's step: the peak is one
        expert beside the stacks). Only when `Layout.for_weight` picks TILES."""
        for stack in (self.w13, self.w2):
            for i in range(len(self.ids)):
                stack[i].copy_(cpu_kernels.to_tiles(stack[i]))
        return LayerExperts(self.ids, self.w13, self.w2, Layout.TILES)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_bytes(self) -> int:
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()


class PackedExperts(Mapping[int, ExpertWeights]):
    """The experts of one layer with every weight packed for oneDNN (Layout.ONEDNN): one tensor per
    weight, as packed tensors are opaque and do not stack. Serves `moe_combine` only.
    """

    def __init__(self, experts: Mapping[int, ExpertWeights], num_bytes: int) -> None:
        """`num_bytes`: the experts' size unpacked (the packed layout is the same data, reordered)."""
        self.ids = tuple(sorted(experts))
        self._experts = dict(experts)
        self.num_bytes = num_bytes

    def __getitem__(self, expert: int) -> ExpertWeights:
        return self._experts[expert]

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def pack_for_cpu(self) -> PackedExperts:
        return self


HeldExperts = LayerExperts | PackedExperts
"""The experts of one layer that a process holds: stacked (PLAIN or TILES), or packed for oneDNN."""


def expert_ffn(x: Tensor, expert: ExpertWeights) -> Tensor:
    """SwiGLU expert on a group of rows: [T, D] -> [T, D]."""
    gate, up = linear(x, expert.w13, expert.layout).chunk(2, dim=-1)  # [T, F] each
    return linear(F.silu(gate) * up, expert.w2, expert.layout)


@dataclass(frozen=True, slots=True)
class ExpertGroups:
    """Routed rows sorted by expert id; expert e owns the next counts[e] entries."""

    token_rows: Tensor  # [R] int64, the token each routed row belongs to
    weights: Tensor  # [R] float32, its routing weight
    counts: list[int]  # [E] rows per expert


def group_by_expert(expert_ids: Tensor, weights: Tensor, num_experts: int) -> ExpertGroups:
    """Sort the (token, k) routing pairs by expert id; pairs whose id is -1 (served elsewhere) are dropped.

    Example: expert_ids [[2, 0], [0, 1]] (T=2, K=2), E=3 -> token_rows [0, 1, 1, 0], counts [2, 1, 1]:
    expert 0 gets tokens 0 and 1, expert 1 token 1, expert 2 token 0.
    """
    top_k = expert_ids.shape[-1]
    flat_ids = expert_ids.reshape(-1).long()  # [R]
    pairs = torch.arange(flat_ids.shape[0], device=flat_ids.device)  # [R] index of each (token, k) pair
    if bool((flat_ids < 0).any()):
        pairs = torch.nonzero(flat_ids >= 0).flatten()
        flat_ids = flat_ids[pairs]
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    chosen = pairs[order]
    return ExpertGroups(token_rows=chosen // top_k, weights=weights.reshape(-1)[chosen], counts=counts)


def moe_combine(hidden: Tensor, groups: ExpertGroups, experts: Mapping[int, ExpertWeights]) -> Tensor:
    """Weighted sum of each token's experts: [T, D] -> [T, D].

    Experts run in ascending id order, each on all its rows at once; contributions are weighted in
    float32 and accumulated in the hidden dtype, the order Hugging Face's Mixtral uses, so bf16
    results round as the reference's do. Every expert with rows must be in `experts`.
    """
    out = torch.zeros_like(hidden)
    start = 0
    for expert_id, count in enumerate(groups.counts):
        if count == 0:
            continue
        rows = groups.token_rows[start:start + count]
        y = expert_ffn(hidden.index_select(0, rows), experts[expert_id])  # [count, D]
        weighted = y * groups.weights[start:start + count, None]
        out.index_add_(0, rows, weighted.to(out.dtype))
        start += count
    return out


DENSE_MAX_TOKENS = 64  # on a GPU, batches up to this many tokens run every held expert (`moe_dense`)


def dense_fits(hidden: Tensor, experts: Mapping[int, ExpertWeights]) -> bool:
    """Whether `moe_dense` runs these rows: a decode-sized batch on a GPU, plain stacked experts."""
    return (hidden.device.type == "cuda" and 0 < hidden.shape[0] <= DENSE_MAX_TOKENS
            and isinstance(experts, LayerExperts) and experts.layout is Layout.PLAIN and len(experts.ids) > 0)


def moe_dense(hidden: Tensor, expert_ids: Tensor, weights: Tensor, experts: LayerExperts, num_experts: int
              ) -> Tensor:
    """`moe_combine`'s weighted sum, computed by running every held expert on every row: hidden [T, D],
    expert_ids and weights [T, K] (-1 or an expert not held: no contribution) -> [T, D].

    Fixed shapes and no value read back to the host, so a GPU runs a layer's experts in a few kernels while
    the host goes on queueing: [S, T, D] x [S, D, 2F] and [S, T, F] x [S, F, D] batched matmuls for the S held
    experts, then each row's routing weights (0 for the experts it did not choose) in float32. The sum is
    rounded once, where `moe_combine` rounds after each expert: the difference is within a rounding step.
    """
    tokens, held = hidden.shape[0], len(experts.ids)
    ids = expert_ids.long()
    slot = experts.slots(num_experts)[ids.clamp(min=0)]  # [T, K] index in the stacks, -1 if not held
    slot = torch.where((ids >= 0) & (slot >= 0), slot, held)  # not computed here: an extra column, dropped
    dense = torch.zeros(tokens, held + 1, dtype=torch.float32, device=hidden.device)
    dense.scatter_add_(1, slot, weights.float())  # [T, S + 1] each row's weight for each held expert
    gate_up = torch.bmm(hidden.expand(held, tokens, hidden.shape[1]), experts.w13.transpose(1, 2))  # [S, T, 2F]
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch.bmm(F.silu(gate) * up, experts.w2.transpose(1, 2))  # [S, T, D]
    return (y.float() * dense[:, :held].T[:, :, None]).sum(0).to(hidden.dtype)


def moe_output(hidden: Tensor, expert_ids: Tensor, weights: Tensor, experts: Mapping[int, ExpertWeights],
               num_experts: int) -> Tensor:
    """`moe_forward`'s weighted sum alone, for callers that do not count rows: on a GPU `moe_dense` then
    reads nothing back to the host."""
    if dense_fits(hidden, experts):
        assert isinstance(experts, LayerExperts)
        return moe_dense(hidden, expert_ids, weights, experts, num_experts)
    return moe_forward(hidden, expert_ids, weights, experts, num_experts)[0]


def moe_forward(hidden: Tensor, expert_ids: Tensor, weights: Tensor, experts: Mapping[int, ExpertWeights],
                num_experts: int) -> tuple[Tensor, list[int]]:
    """A layer's experts on the rows routed to them: hidden [T, D], expert_ids and weights [T, K] (-1: a
    slot served elsewhere) -> (the [T, D] weighted sum of each token's experts, rows per expert [E]).

    Tiled bf16 stacks run in one call of the CPU kernels (`cpu_kernels.moe_experts`: grouping, gather,
    SwiGLU and the weighted sum), with the bits of `group_by_expert` + `moe_combine`, which run otherwise;
    decode-sized batches on a GPU run `moe_dense`.
    """
    if (isinstance(experts, LayerExperts) and experts.layout is Layout.TILES
            and cpu_kernels.experts_fit(hidden, experts.w13, experts.w2)):
        return cpu_kernels.moe_experts(hidden, expert_ids, weights, experts.slots(num_experts), experts.w13,
                                       experts.w2)
    if dense_fits(hidden, experts):
        assert isinstance(experts, LayerExperts)
        ids = expert_ids.reshape(-1).long()
        counts = torch.bincount(ids[ids >= 0], minlength=num_experts).tolist()
        return moe_dense(hidden, expert_ids, weights, experts, num_experts), counts
    groups = group_by_expert(expert_ids, weights, num_experts)
    return moe_combine(hidden, groups, experts), groups.counts
