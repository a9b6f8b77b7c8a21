"""Grouped-query attention over a per-sequence ring-buffer KV cache, for a ragged batch of sequences.

Shapes: T new tokens in the step (all sequences, flattened), B sequences, Q = the most new tokens
of any sequence (1 in pure decode), H query heads, Hkv key/value heads, Dh head size, S cache
slots, C ring capacity (positions kept per sequence), K keys attended to.

The cache (owned by the router, passed in per layer) is [S, Hkv, C, Dh]; position p of a sequence
lives at ring index p % C. For a sliding-window model C is the window, so a long generation's cache
stops growing there (Mistral's rolling buffer); otherwise C bounds the sequence length.
The metadata is built once per step and shared by every layer. In bfloat16 on a CPU with AVX512-BF16,
`cpu_kernels.rope_store` rotates and stores a step's keys in one pass, and decode steps attend with
`cpu_kernels.decode_attention`, which reads the ring in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mixtral import cpu_kernels
from mixtral.rope import apply_rope


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where a step's tokens sit: their positions, padding, cache writes and the attention mask."""

    positions: Tensor  # [T] int64 absolute position of each new token
    slots: Tensor  # [B] int64 cache slot of each sequence
    slot_range: tuple[int, int] | None  # (first, end) when slots are consecutive: a view, no gather
    padded_index: Tensor | None  # [T] index into the padded [B * Q] layout; None: no padding
    num_new_max: int  # Q
    num_cached_keys: int  # keys read from the ring (a prefix of C)
    attend_before_write: bool  # a chunk would overwrite ring entries its own queries still need
    write_rows: Tensor  # [W] rows of the step's tokens stored in the ring (the last C of a chunk)
    write_slots: Tensor  # [W]
    write_ring: Tensor  # [W] ring index of each stored row
    mask: Tensor  # [B, 1, Q, K] bool, True = may attend


def build_metadata(slots: list[int], num_cached: list[int], num_new: list[int], capacity: int,
                   window: int | None, device: torch.device | str = "cpu") -> AttentionMetadata:
    """Metadata for one step: sequence b has num_cached[b] positions in the ring and num_new[b] new tokens.

    Example: num_cached [0, 5], num_new [3, 1] (a 3-token prompt beside a decode step) gives
    positions [0, 1, 2, 5], Q = 3 and padded_index [0, 1, 2, 3].
    """
    if max(num_new) == 1 and max(num_cached) < capacity:
        return _decode_metadata(slots, num_cached, window, device)
    return _ragged_metadata(slots, num_cached, num_new, capacity, window, device)


def _decode_metadata(slots: list[int], num_cached: list[int], window: int | None,
                     device: torch.device | str) -> AttentionMetadata:
    """`build_metadata` of a step that feeds each sequence one token, none of them past the ring's end: ring
    index p holds position p, so the keys are positions 0..num_cached[b] (5 torch ops, not about 25)."""
    cached = torch.tensor(num_cached, dtype=torch.int64)
    slot_ids = torch.tensor(slots, dtype=torch.int64, device=device)
    key_pos = torch.arange(max(num_cached) + 1)[None, :]  # [1, K]
    mask = key_pos <= cached[:, None]  # [B, K]
    if window is not None:
        mask &= cached[:, None] - key_pos < window
    positions = cached.to(device)
    first = slots[0]
    return AttentionMetadata(
        positions=positions,
        slots=slot_ids,
        slot_range=(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None,
        padded_index=None,
        num_new_max=1,
        num_cached_keys=key_pos.shape[1],
        attend_before_write=False,
        write_rows=torch.arange(len(slots), device=device),
        write_slots=slot_ids,
        write_ring=positions,
        mask=mask[:, None, None, :].to(device),
    )


def _ragged_metadata(slots: list[int], num_cached: list[int], num_new: list[int], capacity: int,
                     window: int | None, device: torch.device | str) -> AttentionMetadata:
    """`build_metadata` of any step: prompt chunks, decode tokens, rings that wrapped."""
    new = torch.tensor(num_new, dtype=torch.int64)
    cached = torch.tensor(num_cached, dtype=torch.int64)
    num_new_max = max(num_new)
    seq_of_token = torch.repeat_interleave(torch.arange(len(num_new)), new)  # [T]
    offset = torch.arange(int(new.sum())) - (torch.cumsum(new, 0) - new)[seq_of_token]  # [T]
    positions = cached[seq_of_token] + offset
    is_padded = any(n != num_new_max for n in num_new)
    kept = torch.nonzero(offset >= new[seq_of_token] - capacity).flatten()
    attend_before_write = bool(((new > 1) & (cached + new > capacity)).any())
    key_pos, key_valid = _key_positions(cached, new, capacity, attend_before_write, num_new_max)
    first = slots[0]
    return AttentionMetadata(
        positions=positions.to(device),
        slots=torch.tensor(slots, dtype=torch.int64, device=device),
        slot_range=(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None,
        padded_index=(seq_of_token * num_new_max + offset).to(device) if is_padded else None,
        num_new_max=num_new_max,
        num_cached_keys=min(int((cached if attend_before_write else cached + new).max()), capacity),
        attend_before_write=attend_before_write,
        write_rows=kept.to(device),
        write_slots=torch.tensor(slots, dtype=torch.int64)[seq_of_token[kept]].to(device),
        write_ring=(positions[kept] % capacity).to(device),
        mask=_mask(cached, new, key_pos, key_valid, window).to(device),
    )


def _key_positions(cached: Tensor, new: Tensor, capacity: int, attend_before_write: bool,
                   num_new_max: int) -> tuple[Tensor, Tensor]:
    """Absolute position [B, K] of every key attended to, and whether it holds a real entry."""
    filled = cached if attend_before_write else cached + new  # [B] ring entries written so far
    ring = torch.arange(min(int(filled.max()), capacity))[None, :]  # [1, Kc]
    # The newest position p < filled with p % C == ring index.
    pos = ring + capacity * torch.div(filled[:, None] - 1 - ring, capacity, rounding_mode="floor")
    valid = ring < filled[:, None]
    if not attend_before_write:
        return pos, valid
    new_pos = cached[:, None] + torch.arange(num_new_max)[None, :]  # [B, Q]
    new_valid = torch.arange(num_new_max)[None, :] < new[:, None]
    return torch.cat((pos, new_pos), dim=1), torch.cat((valid, new_valid), dim=1)


def _mask(cached: Tensor, new: Tensor, key_pos: Tensor, key_valid: Tensor, window: int | None) -> Tensor:
    steps = torch.arange(int(new.max()))[None, :]  # [1, Q]
    query_pos = cached[:, None] + steps  # [B, Q]
    mask = key_valid[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])  # [B, Q, K]
    if window is not None:
        mask &= query_pos[:, :, None] - key_pos[:, None, :] < window
    # Padding queries attend to everything so their (discarded) softmax stays finite.
    mask |= (steps >= new[:, None])[:, :, None]
    return mask[:, None]


def attend_projected(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, heads: int,
                     meta: AttentionMetadata) -> Tensor:
    """Rotary embedding, cache store and attention of a step's projected rows: qkv [T, (H + 2 Hkv) * Dh] (query,
    key and value heads side by side), cos and sin [T, Dh], caches [S, Hkv, C, Dh] -> [T, H * Dh].

    bf16 rows on a CPU with the kernels rotate and store in one call (`cpu_kernels.rope_store`, same bits).
    """
    if not meta.attend_before_write and cpu_kernels.ropes(qkv, cos, sin, k_cache, v_cache):
        q = cpu_kernels.rope_store(qkv, cos, sin, heads, k_cache, v_cache, meta.write_rows, meta.write_slots,
                                   meta.write_ring)
        return _attend_stored(q, k_cache, v_cache, meta)
    tokens, (_, kv_heads, _, head_size) = qkv.shape[0], k_cache.shape
    q, k, v = torch.split(qkv, [heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
    q = apply_rope(q.reshape(tokens, heads, head_size), cos, sin)  # [T, H, Dh]
    k = apply_rope(k.reshape(tokens, kv_heads, head_size), cos, sin)  # [T, Hkv, Dh]
    return attend(q, k, v.reshape(tokens, kv_heads, head_size), k_cache, v_cache, meta)


def attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
           meta: AttentionMetadata) -> Tensor:
    """Causal GQA of the step's queries over their sequences' cached and new keys; stores the new keys.

    q [T, H, Dh], k and v [T, Hkv, Dh], caches [S, Hkv, C, Dh] -> [T, H * Dh].
    """
    if meta.attend_before_write:
        out = _attend_stored(q, k_cache, v_cache, meta, new=(k, v))
        _store(k, v, k_cache, v_cache, meta)
        return out
    _store(k, v, k_cache, v_cache, meta)
    return _attend_stored(q, k_cache, v_cache, meta)


def _attend_stored(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                   new: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Attention of q [T, H, Dh] over the cached keys, and the step's own keys and values `new` (each
    [T, Hkv, Dh]) when the ring cannot hold them yet (meta.attend_before_write) -> [T, H * Dh]."""
    if meta.num_new_max == 1 and new is None and cpu_kernels.attends(q, k_cache, v_cache):
        mask = meta.mask.reshape(meta.slots.shape[0], -1)  # [B, K]
        return cpu_kernels.decode_attention(q, k_cache, v_cache, meta.slots, mask).flatten(1)  # [B = T, H * Dh]
    keys, values = _read(k_cache, meta), _read(v_cache, meta)  # [B, Hkv, Kc, Dh]
    if new is not None:
        keys = torch.cat((keys, _pad(new[0], meta)), dim=2)
        values = torch.cat((values, _pad(new[1], meta)), dim=2)
    if meta.num_new_max == 1:
        out = _decode_attention(_pad(q, meta), keys, values, meta.mask)  # [B, H, 1, Dh]
    else:
        out = F.scaled_dot_product_attention(_pad(q, meta), keys, values, attn_mask=meta.mask,
                                             enable_gqa=True)  # [B, H, Q, Dh]
    batch, heads, steps, head_size = out.shape
    out = out.transpose(1, 2).reshape(batch * steps, heads * head_size)
    if meta.padded_index is not None:
        out = out.index_select(0, meta.padded_index)  # [T, H * Dh]
    return out


def _decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """One query per sequence: [B, H, 1, Dh] over keys/values [B, Hkv, K, Dh] -> [B, H, 1, Dh].

    Two batched matmuls with the query heads of a KV group stacked, softmax in float32. On the CPU
    this is several times faster than scaled_dot_product_attention for a single query (13x in
    bfloat16, where its flash kernel is slow), and it never repeats keys across the group.
    """
    batch, heads, _, head_size = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_size)  # [B, Hkv, G, Dh]
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * head_size**-0.5  # [B, Hkv, G, K]
    scores = scores.masked_fill(~mask.reshape(batch, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(batch, heads, 1, head_size)


def _store(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata) -> None:
    rows = meta.write_rows
    k_cache[meta.write_slots, :, meta.write_ring] = k.index_select(0, rows).to(k_cache.dtype)
    v_cache[meta.write_slots, :, meta.write_ring] = v.index_select(0, rows).to(v_cache.dtype)


def _read(cache: Tensor, meta: AttentionMetadata) -> Tensor:
    prefix = cache[:, :, : meta.num_cached_keys]
    if meta.slot_range is not None:
        return prefix[meta.slot_range[0]:meta.slot_range[1]]
    return prefix.index_select(0, meta.slots)


def _pad(x: Tensor, meta: AttentionMetadata) -> Tensor:
    """[T, heads, Dh] -> [B, heads, Q, Dh], zeros where a sequence has fewer than Q new tokens."""
    batch = meta.slots.shape[0]
    if meta.padded_index is None:
        return x.reshape(batch, meta.num_new_max, *x.shape[1:]).transpose(1, 2)
    padded = x.new_zeros(batch * meta.num_new_max, *x.shape[1:])
    padded[meta.padded_index] = x
    return padded.view(batch, meta.num_new_max, *x.shape[1:]).transpose(1, 2)
