"""A shard of expert weights: the (layer, expert) entries one host serves, read lazily from the checkpoint."""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mixtral.checkpoint import Checkpoint, expert_tensor_names
from mixtral.expert import ExpertWeights, HeldExperts, LayerExperts, PackedExperts
from mixtral.linear import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExpertShard:
    """Weights of the (layer, expert) pairs a host serves, per layer: stacked, or packed for oneDNN."""

    layers: dict[int, HeldExperts]

    @property
    def experts(self) -> dict[tuple[int, int], ExpertWeights]:
        """(layer, expert) -> that expert's weights (views into its layer's stacks, or its packed weights)."""
        return {(layer, expert): held[expert] for layer, held in sorted(self.layers.items()) for expert in held}

    def layer(self, layer: int) -> HeldExperts:
        """The experts hosted for `layer` (empty when none are)."""
        return self.layers.get(layer) or LayerExperts.stack({})

    @property
    def num_bytes(self) -> int:
        return sum(held.num_bytes for held in self.layers.values())


def all_experts(checkpoint: Checkpoint) -> list[tuple[int, int]]:
    cfg = checkpoint.config
    layers, experts = range(cfg.num_hidden_layers), range(cfg.num_local_experts)
    return [(layer, expert) for layer in layers for expert in experts]


def load_shard(checkpoint: Checkpoint, entries: Iterable[tuple[int, int]], dtype: torch.dtype,
               device: str | torch.device = "cpu") -> ExpertShard:
    """Load only the listed (layer, expert) tensors, one expert at a time, in their fastest layout
    (`mixtral.linear.Layout`): per-layer stacks, tiled in place for bfloat16 on an AVX512-BF16 CPU, or
    each expert packed for oneDNN (float32, and bfloat16 on other CPUs). The peak is the shard plus one
    expert."""
    by_layer: dict[int, list[int]] = {}
    for layer, expert in sorted(set(entries)):
        by_layer.setdefault(layer, []).append(expert)
    shard = ExpertShard({layer: _load_layer(checkpoint, layer, ids, dtype, device)
                         for layer, ids in by_layer.items()})
    log.info("loaded %d experts (%.1f MiB)", sum(len(ids) for ids in by_layer.values()), shard.num_bytes / 2**20)
    return shard


def reload_shard(checkpoint: Checkpoint, shard: ExpertShard, entries: Iterable[tuple[int, int]],
                 dtype: torch.dtype, device: str | torch.device = "cpu") -> ExpertShard:
    """The shard holding exactly `entries`: unchanged layers keep their stacks, a changed layer gets a
    new stack read from the checkpoint (built beside the old one, which is freed once no call uses it)."""
    by_layer: dict[int, list[int]] = {}
    for layer, expert in sorted(set(entries)):
        by_layer.setdefault(layer, []).append(expert)
    layers = {}
    for layer, ids in by_layer.items():
        held = shard.layers.get(layer)
        if held is not None and list(held.ids) == ids:
            layers[layer] = held
        else:
            layers[layer] = _load_layer(checkpoint, layer, ids, dtype, device)
    return ExpertShard(layers)


def _load_layer(checkpoint: Checkpoint, layer: int, ids: list[int], dtype: torch.dtype,
                device: str | torch.device) -> HeldExperts:
    cfg = checkpoint.config
    layout = Layout.for_shape((2 * cfg.intermediate_size, cfg.hidden_size), dtype, device)
    if layout is Layout.ONEDNN:
        return _load_packed_layer(checkpoint, layer, ids, dtype)
    hidden, ffn = cfg.hidden_size, cfg.intermediate_size
    w13 = torch.empty(len(ids), 2 * ffn, hidden, dtype=dtype, device=device)  # [N, 2F, D]
    w2 = torch.empty(len(ids), hidden, ffn, dtype=dtype, device=device)  # [N, D, F]
    for i, expert in enumerate(ids):
        names = expert_tensor_names(cfg, layer, expert)
        t = checkpoint.load(names.values(), dtype, device, copy=False)  # copied once, into the stacks
        w13[i, :ffn].copy_(t[names["w1"]])
        w13[i, ffn:].copy_(t[names["w3"]])
        w2[i].copy_(t[names["w2"]])
    experts = LayerExperts(ids, w13, w2)
    return experts.tile_in_place() if layout is Layout.TILES else experts


def _load_packed_layer(checkpoint: Checkpoint, layer: int, ids: list[int], dtype: torch.dtype) -> PackedExperts:
    """Each expert read and packed for oneDNN on its own: no stack of the layer is built beside the packed copy."""
    experts, num_bytes = {}, 0
    with _temporaries_unmapped():
        for expert in ids:
            names = expert_tensor_names(checkpoint.config, layer, expert)
            t = checkpoint.load(names.values(), dtype, copy=False)
            plain = ExpertWeights.from_checkpoint(t[names["w1"]], t[names["w2"]], t[names["w3"]])
            experts[expert] = plain.laid_out(Layout.ONEDNN)
            num_bytes += plain.num_bytes
    return PackedExperts(experts, num_bytes)


# glibc's mallopt parameters, and the highest values its own adjustment gives them as a process frees large blocks
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_WARM_MMAP_THRESHOLD, _WARM_TRIM_THRESHOLD = 32 * 2**20, 64 * 2**20


@contextmanager
def _temporaries_unmapped() -> Iterator[None]:
    """While packing: every allocation of 1 MiB or more gets a mapping of its own, so the plain copy freed
    after each expert is packed goes back to the system. With glibc's default, those copies came from the
    heap, between packed weights that stay, and a float32 host packed expert by expert was resident for
    30% more than its expert bytes (tests/cluster/test_memory.py); with this, 1.7%. Afterwards glibc gets
    the highest thresholds its own adjustment would set, so serving's temporaries keep coming from the
    heap. Nothing changes where the C library has no mallopt (not glibc)."""
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, 2**20)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _WARM_MMAP_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, _WARM_TRIM_THRESHOLD)


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    """The C library's mallopt among this process's symbols (looked up once), None where there is none."""
    function: Callable[[int, int], int] | None = getattr(ctypes.CDLL(None), "mallopt", None)
    return function
