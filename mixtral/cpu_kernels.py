"""moe-cluster's own bfloat16 matmul for x86 CPUs with AVX512-BF16 (cpu_kernels.cpp, built by setup.py).

A weight [N, K] is re-laid once into tiles of 16 output rows (`to_tiles`, same shape and size, permuted
contents) and multiplied by `tiled_linear`. Measured on the 2-core CPU machine against torch's oneDNN
on pre-packed weights: 1.4-1.9x faster at 1-4 rows (the decode of one to a few sequences, bound by
reading the weight), 1.15-1.6x at 6-32 rows, level from a few hundred rows on. A row's result does not
depend on the other rows of the call. Results are float32 sums rounded to bfloat16, as torch's are; the
order of the sums differs, so about 1 in 400 outputs differs from torch's by one bfloat16 spacing.

`decode_attention` is the attention of one query per sequence over the ring KV cache, read in place:
the two batched matmuls it replaces copied every cached key and value of the step's sequences first.
`moe_experts` runs a whole MoE layer on tiled expert stacks (grouping, gather, SwiGLU, weighted sum) with
the bits of the per-expert torch loop; `rms_norm` is RMSNorm of bf16 rows in one call; `rope_store` rotates
a step's queries and keys and stores its keys and values in the ring cache in one pass; `greedy` finds each
logit row's greedy token and log-normaliser in two passes over the row; `decode_block` runs a decode step's
attention half of a layer (norm, QKV, rotary embedding and cache store, attention, output projection, residual,
second norm, gate logits) in one call.

`available()` is False where the library was not built (no compiler at install, not x86-64) or the CPU
lacks AVX512-BF16; callers then use oneDNN through torch.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from collections.abc import Sequence

import torch
from torch import Tensor

TILE = 16  # output rows per tile: N must be a multiple


@functools.cache
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("mixtral._cpu_kernels")
    if spec is None or spec.origin is None:
        return None
    library = ctypes.CDLL(spec.origin)
    if not library.moe_cpu_kernels_supported():
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.moe_pack_bf16.argtypes = [pointer, pointer, size, size]
    library.moe_unpack_bf16.argtypes = [pointer, pointer, size, size]
    library.moe_linear_bf16.argtypes = [pointer, pointer, pointer, size, size, size]
    library.moe_decode_attention_bf16.argtypes = [pointer] * 6 + [size] * 6 + [ctypes.c_float]
    library.moe_rms_norm_bf16.argtypes = [pointer, pointer, pointer, size, size, ctypes.c_float]
    library.moe_experts_bf16.argtypes = [pointer, size, size, size, pointer, pointer, size, pointer, size, pointer,
                                         pointer, pointer, pointer]
    number = ctypes.c_float
    library.moe_decode_block_bf16.argtypes = [pointer, size, size, pointer, pointer, number, pointer, pointer, pointer,
                                              size, size, size, size, pointer, pointer, pointer, pointer, size,
                                              pointer, pointer, pointer, size, number, pointer, pointer, pointer]
    library.moe_greedy_f32.argtypes = [pointer, size, size, pointer, pointer, pointer]
    library.moe_rope_store_bf16.argtypes = [pointer, size, size, size, size, pointer, pointer, pointer, pointer,
                                            pointer, pointer, size, pointer, pointer, size]
    return library


def available() -> bool:
    """Whether this process can use the kernels (built, and an AVX512-BF16 CPU)."""
    return _library() is not None


def tiles_for(weight: Tensor) -> bool:
    """Whether `weight` can be tiled: bfloat16 [N, K] on the CPU, N a multiple of 16, K even, kernels available."""
    return tiles_fit(weight.shape, weight.dtype, weight.device)


def tiles_fit(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> bool:
    """`tiles_for` of a weight with this shape, dtype and device, before it exists."""
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and len(shape) == 2
            and shape[0] % TILE == 0 and shape[1] % 2 == 0 and shape[0] * shape[1] > 0 and available())


def to_tiles(weight: Tensor, out: Tensor | None = None) -> Tensor:
    """`weight` [N, K] re-laid as tiles (into `out` when given, which must not overlap it)."""
    library = _require(weight)
    source = weight.contiguous()
    tiles = torch.empty_like(source) if out is None else out
    library.moe_pack_bf16(source.data_ptr(), tiles.data_ptr(), *source.shape)
    return tiles


def from_tiles(tiles: Tensor) -> Tensor:
    """The inverse of `to_tiles`: the weight [N, K] in nn.Linear layout."""
    library = _require(tiles)
    tiles = tiles.contiguous()
    weight = torch.empty_like(tiles)
    library.moe_unpack_bf16(tiles.data_ptr(), weight.data_ptr(), *tiles.shape)
    return weight


def tiled_linear(x: Tensor, tiles: Tensor) -> Tensor:
    """x [M, K] @ weight.T for a weight made by `to_tiles` (contiguous): [M, N] bfloat16."""
    library = _require(tiles)
    if not tiles.is_contiguous():
        raise ValueError("tiled_linear needs contiguous tiles")
    n, k = tiles.shape
    if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(f"tiled_linear takes bfloat16 CPU rows [M, {k}], got {x.dtype} {tuple(x.shape)} on {x.device}")
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    if x.shape[0]:
        library.moe_linear_bf16(x.data_ptr(), tiles.data_ptr(), y.data_ptr(), x.shape[0], n, k)
    return y


def experts_fit(hidden: Tensor, w13: Tensor, w2: Tensor) -> bool:
    """Whether `moe_experts` takes these: bfloat16 CPU rows [T, D] and contiguous bfloat16 stacks w13
    [N, 2F, D] and w2 [N, D, F] with D and F multiples of 16, kernels available."""
    if w13.dim() != 3 or w2.dim() != 3 or hidden.dim() != 2:
        return False
    num, two_f, d = w13.shape
    f = two_f // 2
    return (hidden.dtype == w13.dtype == w2.dtype == torch.bfloat16 and hidden.device.type == "cpu"
            and hidden.shape[1] == d and d % TILE == 0 and two_f % (2 * TILE) == 0 and tuple(w2.shape) == (num, d, f)
            and w13.is_contiguous() and w2.is_contiguous() and available())


def moe_experts(hidden: Tensor, expert_ids: Tensor, weights: Tensor, slots: Tensor, w13: Tensor, w2: Tensor
                ) -> tuple[Tensor, list[int]]:
    """One layer's experts on their routed rows, summed per token, in one call: `mixtral.expert.moe_forward`.

    hidden [T, D] bfloat16; expert_ids [T, K] (-1: a slot served elsewhere) and weights [T, K]; slots [E]
    int64: where each expert's tiled weights are in the stacks w13 [N, 2F, D] and w2 [N, D, F] (-1: not
    held). Returns the [T, D] sum and the rows each expert computed [E]. Rounds where the per-expert torch
    loop (`moe_combine`) rounds: the matmuls' outputs, silu, its product with up, the weighted output and
    every addition to a token's sum, experts in ascending order. Raises ValueError for an expert id outside
    [-1, E) and KeyError for rows routed to an expert that is not held.
    """
    library = _library()
    if library is None or not experts_fit(hidden, w13, w2):
        raise ValueError(f"no expert kernel for {hidden.dtype} rows and stacks {tuple(w13.shape)}, {tuple(w2.shape)}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != hidden.shape[0] or weights.shape != expert_ids.shape:
        raise ValueError(f"expert_ids {tuple(expert_ids.shape)} and weights {tuple(weights.shape)} must both be "
                         f"[T, K] for the T = {hidden.shape[0]} rows")
    d, f = w13.shape[2], w13.shape[1] // 2
    hidden = hidden.contiguous()
    ids, weights = expert_ids.to(torch.int64).contiguous(), weights.to(torch.float32).contiguous()
    num_experts = slots.shape[0]
    out, counts = torch.zeros_like(hidden), torch.empty(num_experts, dtype=torch.int64)
    status = library.moe_experts_bf16(hidden.data_ptr(), hidden.shape[0], d, f, ids.data_ptr(), weights.data_ptr(),
                                      ids.shape[-1], slots.data_ptr(), num_experts, w13.data_ptr(), w2.data_ptr(),
                                      out.data_ptr(), counts.data_ptr())
    if status == -2:
        raise ValueError(f"expert ids {sorted(set(ids[(ids < -1) | (ids >= num_experts)].tolist()))} are outside "
                         f"[-1, {num_experts})")
    if status == -3:
        missing = sorted(set(ids[ids >= 0].tolist()) - set(torch.nonzero(slots >= 0).flatten().tolist()))
        raise KeyError(f"experts {missing} have rows but are not held")
    if status != 0:
        raise MemoryError(f"the expert kernel could not allocate scratch for {ids.numel()} routed rows")
    return out, counts.tolist()


def norms(x: Tensor, weight: Tensor) -> bool:
    """Whether `rms_norm` takes these: bfloat16 rows [M, D] on the CPU with D a multiple of 16, kernels available."""
    return (x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2
            and x.shape[1] % TILE == 0 and tuple(weight.shape) == (x.shape[1],) and available())


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of bfloat16 rows [M, D] with weight [D]: `mixtral.block.rms_norm` in one call, rounding at its
    steps (the sum of squares in this kernel's order)."""
    library = _library()
    if library is None or not norms(x, weight):
        raise ValueError(f"no RMSNorm kernel for {x.dtype} rows {tuple(x.shape)} on {x.device}")
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    if x.shape[0]:
        library.moe_rms_norm_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
    return out


def attends(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether `decode_attention` takes these: bfloat16 on the CPU, head size a multiple of 32, contiguous
    caches, kernels available."""
    return (q.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16 and q.device.type == "cpu"
            and q.shape[-1] % 32 == 0 and k_cache.is_contiguous() and v_cache.is_contiguous() and available())


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
    """One query per sequence over its cached keys, read in place: q [B, H, Dh], caches [S, Hkv, C, Dh],
    slots [B], mask [B, K] bool (the first K ring entries; True = attend) -> [B, H, Dh] bfloat16.

    Rounds as the two bfloat16 batched matmuls it replaces do (scores and probabilities to bfloat16,
    softmax in float32); sequences are independent of each other.
    """
    library = _library()
    if library is None or not attends(q, k_cache, v_cache):
        raise ValueError(f"no attention kernel for {q.dtype} queries of head size {q.shape[-1]} on {q.device}")
    batch, heads, head_size = q.shape
    _, kv_heads, capacity, _ = k_cache.shape
    keys = mask.shape[1]
    q, slots = q.contiguous(), slots.to(torch.int64).contiguous()
    mask = mask.to(torch.uint8).contiguous()
    out = torch.empty_like(q)
    status = library.moe_decode_attention_bf16(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                               slots.data_ptr(), mask.data_ptr(), out.data_ptr(), batch, heads,
                                               kv_heads, capacity, head_size, keys, head_size**-0.5)
    if status != 0:
        raise MemoryError(f"decode attention could not allocate {keys} float32 scores per thread")
    return out


def ropes(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether `rope_store` takes these: bfloat16 on the CPU, contiguous rows and caches, head size a multiple
    of 32, angles [T, Dh], kernels available."""
    head_size = k_cache.shape[-1] if k_cache.dim() == 4 else 0
    return (qkv.dtype == cos.dtype == sin.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16
            and qkv.device.type == "cpu" and qkv.dim() == 2 and head_size > 0 and head_size % 32 == 0
            and tuple(cos.shape) == tuple(sin.shape) == (qkv.shape[0], head_size) and k_cache.shape == v_cache.shape
            and k_cache.is_contiguous() and v_cache.is_contiguous() and available())


def rope_store(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, k_cache: Tensor, v_cache: Tensor, rows: Tensor,
               slots: Tensor, ring: Tensor) -> Tensor:
    """Rotary embedding of a step's projected queries and keys, and the store of its keys and values, in one
    pass: qkv [T, (H + 2 Hkv) * Dh] (query, key, value heads), cos and sin [T, Dh], caches [S, Hkv, C, Dh].
    Row rows[i]'s rotated keys and its values go to slot slots[i], ring index ring[i] (int64 [W] each).
    Returns the rotated queries [T, H, Dh], with the bits of `mixtral.rope.apply_rope`.
    """
    library = _library()
    if library is None or not ropes(qkv, cos, sin, k_cache, v_cache):
        raise ValueError(f"no rotary kernel for {qkv.dtype} rows {tuple(qkv.shape)} and caches {tuple(k_cache.shape)}")
    _, kv_heads, capacity, head_size = k_cache.shape
    if qkv.shape[1] != (heads + 2 * kv_heads) * head_size:
        raise ValueError(f"rows of {qkv.shape[1]} values are not {heads} query and 2 x {kv_heads} key/value heads of "
                         f"{head_size}")
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    rows, slots, ring = (t.to(torch.int64).contiguous() for t in (rows, slots, ring))
    q = torch.empty(qkv.shape[0], heads, head_size, dtype=qkv.dtype)
    library.moe_rope_store_bf16(qkv.data_ptr(), qkv.shape[0], heads, kv_heads, head_size, cos.data_ptr(),
                                sin.data_ptr(), q.data_ptr(), rows.data_ptr(), slots.data_ptr(), ring.data_ptr(),
                                rows.shape[0], k_cache.data_ptr(), v_cache.data_ptr(), capacity)
    return q


def blocks(x: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether `decode_block` takes these rows and caches: bfloat16 rows [T, D] on the CPU with D a multiple of
    16, contiguous bfloat16 caches of a head size that is a multiple of 32, kernels available."""
    return (x.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2
            and x.shape[1] % TILE == 0 and k_cache.dim() == 4 and k_cache.shape[-1] % 32 == 0
            and k_cache.shape == v_cache.shape and k_cache.is_contiguous() and v_cache.is_contiguous() and available())


def decode_block(x: Tensor, norm1: Tensor, norm2: Tensor, eps: float, wqkv: Tensor, wo: Tensor, gate: Tensor,
                 heads: int, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                 ring: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A decode step's attention half of a decoder layer and its gate logits, in one call; every step rounds
    where the separate kernels do, so the bits are theirs.

    x [T, D]: one token per sequence, its keys and values stored at ring index `ring` [T] of cache slot `slots`
    [T] (cos and sin [T, Dh] are its position's angles); norm1, norm2 [D]; wqkv, wo and gate tiled
    (`to_tiles`; gate [G, D] padded to whole tiles); caches [S, Hkv, C, Dh]; mask [T, K] bool over the
    first K ring entries. Returns (x + attention [T, D], RMSNorm of it with norm2 [T, D], gate logits [T, G]).
    """
    library = _library()
    if library is None or not blocks(x, k_cache, v_cache):
        raise ValueError(f"no decode block kernel for {x.dtype} rows {tuple(x.shape)} and caches "
                         f"{tuple(k_cache.shape)}")
    tokens, d = x.shape
    _, kv_heads, capacity, head_size = k_cache.shape
    if (tuple(wqkv.shape) != ((heads + 2 * kv_heads) * head_size, d) or tuple(wo.shape) != (d, heads * head_size)
            or gate.shape[1] != d or mask.shape[0] != tokens or not all(map(tiles_for, (wqkv, wo, gate)))
            or not tuple(cos.shape) == tuple(sin.shape) == (tokens, head_size) or cos.dtype != torch.bfloat16
            or sin.dtype != torch.bfloat16 or not all(n.dtype == torch.bfloat16 and tuple(n.shape) == (d,)
                                                      for n in (norm1, norm2))):
        raise ValueError(f"decode block weights {tuple(wqkv.shape)}, {tuple(wo.shape)}, {tuple(gate.shape)}, norms "
                         f"and angles do not fit {tokens} bf16 rows, {heads} heads and caches {tuple(k_cache.shape)}")
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    slots, ring = slots.to(torch.int64).contiguous(), ring.to(torch.int64).contiguous()
    mask = mask.to(torch.bool).contiguous()
    x_out, h = torch.empty_like(x), torch.empty_like(x)
    logits = torch.empty(tokens, gate.shape[0], dtype=x.dtype)
    status = library.moe_decode_block_bf16(
        x.data_ptr(), tokens, d, norm1.contiguous().data_ptr(), norm2.contiguous().data_ptr(), eps,
        wqkv.data_ptr(), wo.data_ptr(), gate.data_ptr(), gate.shape[0], heads, kv_heads, head_size, cos.data_ptr(),
        sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), capacity, slots.data_ptr(), ring.data_ptr(),
        mask.data_ptr(), mask.shape[1], head_size**-0.5, x_out.data_ptr(), h.data_ptr(), logits.data_ptr())
    if status != 0:
        raise MemoryError(f"the decode block could not allocate scratch for {tokens} rows")
    return x_out, h, logits


def greedy(logits: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """Float32 logit rows [R, V] -> each row's first largest entry [R] int64, its value [R] and the log-normaliser
    log(sum_j e^(x_j - top)) [R] (summed in float64), so a token's log-probability is x - top - log_norm. None
    where the kernel cannot answer: not built, not contiguous float32 CPU rows, or a row holding a NaN or an
    infinite largest value. torch's argmax and log_softmax took 1.2 ms for 32 rows of 32000; this, 0.1 ms."""
    library = _library()
    if library is None or logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2:
        return None
    logits = logits.contiguous()
    rows = logits.shape[0]
    ids, top, log_norm = torch.empty(rows, dtype=torch.int64), torch.empty(rows), torch.empty(rows)
    if rows and library.moe_greedy_f32(logits.data_ptr(), rows, logits.shape[1], ids.data_ptr(), top.data_ptr(),
                                       log_norm.data_ptr()) != 0:
        return None
    return ids, top, log_norm


def _require(weight: Tensor) -> ctypes.CDLL:
    library = _library()
    if library is None or not tiles_for(weight):
        raise ValueError(f"no tiled kernel for a {weight.dtype} {tuple(weight.shape)} weight on {weight.device} "
                         f"(kernels available: {available()})")
    return library
