"""The pure math: the gate, grouped expert compute, attention metadata."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtral import cpu_kernels
from mixtral.attention import _ragged_metadata, attend_projected, build_metadata
from mixtral.block import rms_norm
from mixtral.expert import (
    ExpertWeights,
    LayerExperts,
    PackedExperts,
    expert_ffn,
    group_by_expert,
    moe_combine,
    moe_dense,
    moe_forward,
)
from mixtral.gate import route
from mixtral.linear import Layout, Projection, lay_out, linear
from mixtral.rope import apply_rope, rope_cos_sin, rope_inv_freq

needs_tiles = pytest.mark.skipif(not cpu_kernels.available(),
                                 reason="moe-cluster's CPU kernels are not built here or the CPU lacks AVX512-BF16")

@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 16), experts=st.integers(2, 8), data=st.data())
def test_gate_gives_k_distinct_experts_whose_weights_sum_to_one(tokens: int, experts: int,
                                                               data: st.DataObject) -> None:
    top_k = data.draw(st.integers(1, experts))
    seed = data.draw(st.integers(0, 2**16))
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * 3
    weights, ids = route(logits, top_k)
    assert weights.dtype == torch.float32 and ids.shape == (tokens, top_k)
    assert all(len(set(row)) == top_k for row in ids.tolist())
    torch.testing.assert_close(weights.sum(-1), torch.ones(tokens))
    # softmax over all, top-k, renormalise == softmax over the top-k logits alone
    top_logits = logits.gather(1, ids)
    torch.testing.assert_close(weights, torch.softmax(top_logits, dim=-1))
    # the chosen experts are the k largest logits
    assert (top_logits.min(-1).values >= logits.topk(top_k, -1).values[:, -1] - 1e-6).all()


def test_group_by_expert_worked_example() -> None:
    groups = group_by_expert(torch.tensor([[2, 0], [0, 1]]), torch.tensor([[0.6, 0.4], [0.7, 0.3]]), 3)
    assert groups.token_rows.tolist() == [0, 1, 1, 0]
    assert groups.counts == [2, 1, 1]
    torch.testing.assert_close(groups.weights, torch.tensor([0.4, 0.7, 0.3, 0.6]))


def test_moe_combine_equals_the_per_token_sum_of_its_experts() -> None:
    g = torch.Generator().manual_seed(0)
    d, f, e, t = 16, 24, 4, 9
    experts = LayerExperts.stack({i: ExpertWeights.from_checkpoint(
        torch.randn(f, d, generator=g), torch.randn(d, f, generator=g), torch.randn(f, d, generator=g)) for i in range(e)})
    hidden = torch.randn(t, d, generator=g)
    weights, ids = route(torch.randn(t, e, generator=g), 2)
    got = moe_combine(hidden, group_by_expert(ids, weights, e), experts)
    want = torch.stack([sum(weights[i, k] * expert_ffn(hidden[i:i + 1], experts[int(ids[i, k])])[0]
                            for k in range(2)) for i in range(t)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


HOST_D, HOST_E = 16, 6  # hidden size and experts per layer of `_host_layer`


def _host_layer(tokens: int, held: set[int], dtype: torch.dtype, seed: int
                ) -> tuple[LayerExperts, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A host's share of a random layer: its `held` experts stacked, `tokens` hidden rows, and the top-2
    routing of those rows, -1 in the slots of the experts other hosts hold -> (experts, hidden, ids, weights)."""
    g = torch.Generator().manual_seed(seed)
    f = 24
    experts = LayerExperts.stack({i: ExpertWeights.from_checkpoint(
        torch.randn(f, HOST_D, generator=g).to(dtype), torch.randn(HOST_D, f, generator=g).to(dtype),
        torch.randn(f, HOST_D, generator=g).to(dtype)) for i in sorted(held)})
    hidden = torch.randn(tokens, HOST_D, generator=g).to(dtype)
    weights, ids = route(torch.randn(tokens, HOST_E, generator=g), 2)
    ids = torch.where(torch.isin(ids, torch.tensor(sorted(held))), ids, -1)  # rows of other hosts' experts
    return experts, hidden, ids, weights


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 96), held=st.sets(st.integers(0, 5), min_size=1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_a_hosts_experts_give_each_tokens_weighted_sum_over_the_experts_it_holds(
        tokens: int, held: set[int], dtype: torch.dtype, seed: int) -> None:
    """A host holding some of a layer's experts (stacked) sees -1 for the others' slots."""
    experts, hidden, ids, weights = _host_layer(tokens, held, dtype, seed)
    got = moe_combine(hidden, group_by_expert(ids, weights, HOST_E), experts)
    want = torch.zeros(tokens, HOST_D)
    for t, k in torch.nonzero(ids >= 0).tolist():
        want[t] += weights[t, k] * expert_ffn(hidden[t:t + 1].float(), _fp32(experts[int(ids[t, k])]))[0]
    tolerance = 1e-4 if dtype == torch.float32 else 0.05 * float(want.abs().max())
    torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=1e-3 if dtype == torch.float32 else 0.02)


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 64), held=st.sets(st.integers(0, 5), min_size=1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_every_held_expert_on_every_row_gives_the_grouped_weighted_sum(
        tokens: int, held: set[int], dtype: torch.dtype, seed: int) -> None:
    """moe_dense (a GPU's decode-sized batches) computes what the grouped loop does, -1 slots included; it
    rounds the sum once where the loop rounds after each expert."""
    experts, hidden, ids, weights = _host_layer(tokens, held, dtype, seed)
    got = moe_dense(hidden, ids, weights, experts, HOST_E)
    want = moe_combine(hidden, group_by_expert(ids, weights, HOST_E), experts)
    assert got.dtype == dtype and got.shape == (tokens, HOST_D)
    assert bool((got[(ids < 0).all(1)] == 0).all())  # a row none of whose experts are held gets nothing
    spacing = 0 if dtype == torch.float32 else 2 * float(want.abs().max()) * 2**-8  # two bf16 steps
    torch.testing.assert_close(got.float(), want.float(), atol=1e-4 + spacing, rtol=1e-4)


def _fp32(expert: ExpertWeights) -> ExpertWeights:
    return ExpertWeights(expert.w13.float(), expert.w2.float())


def _bf16_experts(g: torch.Generator, d: int, f: int, e: int | Iterable[int]) -> LayerExperts:
    """Random bf16 experts 0..e-1 (or the ids given), stacked."""
    ids = range(e) if isinstance(e, int) else sorted(e)
    return LayerExperts.stack({i: ExpertWeights.from_checkpoint(
        *(torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in ((f, d), (d, f), (f, d))))
        for i in ids})


def test_experts_packed_for_onednn_give_the_same_bf16_bits() -> None:
    g = torch.Generator().manual_seed(3)
    d, f, e = 64, 96, 4
    experts = _bf16_experts(g, d, f, e)
    onednn = Layout.ONEDNN
    packed = PackedExperts({i: ExpertWeights(lay_out(w.w13, onednn), lay_out(w.w2, onednn), onednn)
                            for i, w in experts.items()}, experts.num_bytes)
    for tokens in (1, 5, 40):
        hidden = torch.randn(tokens, d, generator=g).to(torch.bfloat16)
        weights, ids = route(torch.randn(tokens, e, generator=g), 2)
        groups = group_by_expert(ids, weights, e)
        assert torch.equal(moe_combine(hidden, groups, packed), moe_combine(hidden, groups, experts))
    fp32 = LayerExperts.stack({e: _fp32(w) for e, w in experts.items()})
    packed_fp32 = fp32.pack_for_cpu()  # float32: oneDNN too, equal up to float32 rounding
    assert isinstance(packed_fp32, PackedExperts) and packed_fp32[1].layout is Layout.ONEDNN
    hidden = torch.randn(9, d, generator=g)
    groups = group_by_expert(*reversed(route(torch.randn(9, e, generator=g), 2)), e)
    want = moe_combine(hidden, groups, fp32)
    torch.testing.assert_close(moe_combine(hidden, groups, packed_fp32), want, rtol=1e-5,
                               atol=1e-6 * float(want.abs().max()))


@needs_tiles
def test_bf16_experts_are_tiled_and_agree_with_torch_to_bf16_rounding() -> None:
    g = torch.Generator().manual_seed(4)
    d, f, e = 64, 96, 4
    experts = _bf16_experts(g, d, f, e)
    tiled = experts.pack_for_cpu()
    assert isinstance(tiled, LayerExperts) and tiled.layout is Layout.TILES and tiled[2].layout is Layout.TILES
    assert experts.layout is Layout.PLAIN and tiled.num_bytes == experts.num_bytes
    in_place = LayerExperts(experts.ids, experts.w13.clone(), experts.w2.clone()).tile_in_place()
    assert torch.equal(in_place.w13, tiled.w13) and torch.equal(in_place.w2, tiled.w2)
    for tokens in (1, 5, 40):
        hidden = torch.randn(tokens, d, generator=g).to(torch.bfloat16)
        weights, ids = route(torch.randn(tokens, e, generator=g), 2)
        groups = group_by_expert(ids, weights, e)
        got, want = moe_combine(hidden, groups, tiled), moe_combine(hidden, groups, experts)
        torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02 * float(want.abs().max()))


@needs_tiles
@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 150), held=st.sets(st.integers(0, 5), min_size=1), scale=st.sampled_from([0.1, 1.0, 40.0]),
       sizes=st.sampled_from([(32, 48), (64, 128)]), seed=st.integers(0, 2**16))
def test_the_fused_expert_kernel_gives_the_bits_of_the_per_expert_loop_and_each_token_ignores_the_others(
        tokens: int, held: set[int], scale: float, sizes: tuple[int, int], seed: int) -> None:
    """Tiled stacks run in one kernel call (grouping, gather, SwiGLU, weighted sum); group_by_expert and the
    per-expert torch loop over the same tiled weights are the reference, rounding for rounding. Large
    inputs push silu past exp's range. D and F in whole groups of 64 with fewer than 64 rows per expert
    take the kernel's one-region path (decode), the others its per-expert loop."""
    g = torch.Generator().manual_seed(seed)
    (d, f), e = sizes, 6
    experts = _bf16_experts(g, d, f, held).pack_for_cpu()
    assert isinstance(experts, LayerExperts) and experts.layout is Layout.TILES
    hidden = (torch.randn(tokens, d, generator=g) * scale).to(torch.bfloat16)
    weights, ids = route(torch.randn(tokens, e, generator=g), 2)
    ids = torch.where(torch.isin(ids, torch.tensor(sorted(held))), ids, -1)  # rows of other hosts' experts
    fused, counts = moe_forward(hidden, ids, weights, experts, e)
    groups = group_by_expert(ids, weights, e)
    assert torch.equal(fused, moe_combine(hidden, groups, dict(experts.items())))  # a plain mapping: the loop
    assert counts == groups.counts
    alone, _ = moe_forward(hidden[-1:], ids[-1:], weights[-1:], experts, e)
    assert torch.equal(alone, fused[-1:])


@needs_tiles
@pytest.mark.parametrize("tokens, d, f", [(100, 32, 48), (100, 64, 128), (20, 64, 128)])
def test_the_fused_expert_kernel_adds_a_token_twice_routed_to_one_expert_in_order(tokens: int, d: int, f: int
                                                                                  ) -> None:
    """Routing never names an expert twice for a token, but a host must not race on a request that does:
    200 rows for expert 1 (the element-wise steps' parallel size), and 40 (the one-region path)."""
    g = torch.Generator().manual_seed(7)
    experts = _bf16_experts(g, d, f, 2).pack_for_cpu()
    hidden = torch.randn(tokens, d, generator=g).to(torch.bfloat16)
    ids, weights = torch.ones(tokens, 2, dtype=torch.int64), torch.rand(tokens, 2, generator=g)
    fused, counts = moe_forward(hidden, ids, weights, experts, 2)
    assert counts == [0, 2 * tokens]
    assert torch.equal(fused, moe_combine(hidden, group_by_expert(ids, weights, 2), dict(experts.items())))


@needs_tiles
def test_tiled_experts_the_fused_kernel_cannot_take_run_the_loop() -> None:
    """F = 24: the stacks tile (2F and D are whole tiles) but the kernel's SwiGLU needs F in whole tiles."""
    g = torch.Generator().manual_seed(8)
    experts = _bf16_experts(g, 32, 24, 3).pack_for_cpu()
    assert isinstance(experts, LayerExperts) and experts.layout is Layout.TILES
    hidden = torch.randn(5, 32, generator=g).to(torch.bfloat16)
    weights, ids = route(torch.randn(5, 3, generator=g), 2)
    got, counts = moe_forward(hidden, ids, weights, experts, 3)
    groups = group_by_expert(ids, weights, 3)
    assert torch.equal(got, moe_combine(hidden, groups, experts)) and counts == groups.counts


@needs_tiles
def test_the_fused_expert_kernel_refuses_experts_it_does_not_hold_or_know() -> None:
    g = torch.Generator().manual_seed(5)
    experts = _bf16_experts(g, 32, 48, 2).pack_for_cpu()
    hidden, weights = torch.ones(1, 32, dtype=torch.bfloat16), torch.tensor([[0.5, 0.5]])
    with pytest.raises(KeyError, match=r"experts \[3\] have rows but are not held"):
        moe_forward(hidden, torch.tensor([[0, 3]]), weights, experts, 4)
    with pytest.raises(ValueError, match=r"expert ids \[4\] are outside \[-1, 4\)"):
        moe_forward(hidden, torch.tensor([[0, 4]]), weights, experts, 4)
    with pytest.raises(ValueError, match=r"must both be \[T, K\] for the T = 1 rows"):
        moe_forward(hidden, torch.tensor([[0, 1], [1, 0]]), weights, experts, 4)  # a row too many: never read


@needs_tiles
@settings(max_examples=40, deadline=None)
@given(tiles=st.integers(1, 9), k=st.integers(1, 80).map(lambda h: 2 * h), rows=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_tiled_linear_is_float32_sums_rounded_once_and_each_row_ignores_the_others(
        tiles: int, k: int, rows: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(16 * tiles, k, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    laid = cpu_kernels.to_tiles(weight)
    assert torch.equal(cpu_kernels.from_tiles(laid), weight)

    y = cpu_kernels.tiled_linear(x, laid)

    exact = x.double() @ weight.double().T
    # float32 sums in another order than the exact one, rounded once to bfloat16 (8 significant bits)
    bound = exact.abs() * 2.0**-8 + (x.double().abs() @ weight.double().abs().T) * 2.0**-20
    assert bool(((y.double() - exact).abs() <= bound).all())
    for start in sorted({0, rows // 2, rows - 1}):  # any row alone, or in any batch, gives the same bits
        assert torch.equal(cpu_kernels.tiled_linear(x[start:start + 1], laid), y[start:start + 1])


def test_projections_lay_out_their_bf16_weight_once() -> None:
    g = torch.Generator().manual_seed(5)
    for n, k in ((96, 64), (48, 72)):  # the attention projections and the LM head, in small
        weight = torch.randn(n, k, generator=g).to(torch.bfloat16)
        projection = Projection.of(weight)
        assert projection.layout is (Layout.TILES if cpu_kernels.available() else Layout.ONEDNN)
        onednn = lay_out(weight, Layout.ONEDNN)
        for rows in (1, 7, 33, 300):
            x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
            want = torch.nn.functional.linear(x, weight)
            assert torch.equal(linear(x, onednn, Layout.ONEDNN), want)  # oneDNN's own layout: torch's bits
            torch.testing.assert_close(projection(x), want, rtol=2**-7, atol=1e-2)
        batched = torch.randn(2, 3, k, generator=g).to(torch.bfloat16)
        assert torch.equal(projection(batched), projection(batched.reshape(6, k)).reshape(2, 3, n))
        assert projection(torch.empty(0, k, dtype=torch.bfloat16)).shape == (0, n)  # a step with no logit rows
    fp32 = torch.randn(8, 4, generator=g)
    assert Projection.of(fp32).layout is Layout.ONEDNN
    assert Projection.of(fp32)(torch.empty(0, 4)).shape == (0, 8)
    x = torch.randn(5, 4, generator=g)
    torch.testing.assert_close(Projection.of(fp32)(x), torch.nn.functional.linear(x, fp32), rtol=1e-5, atol=1e-6)


def test_a_bf16_weight_of_partial_tiles_is_padded_and_gives_only_its_own_features() -> None:
    """The gate ([8 experts, D]) is not whole 16-row tiles: zero rows pad it, and its 8 logits come out."""
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(8, 64, generator=g).to(torch.bfloat16)
    gate = Projection.of(weight)
    if cpu_kernels.available():
        assert gate.layout is Layout.TILES and gate.features == 8 and gate.weight.shape == (16, 64)
    x = torch.randn(33, 64, generator=g).to(torch.bfloat16)
    torch.testing.assert_close(gate(x), torch.nn.functional.linear(x, weight), rtol=2**-7, atol=1e-2)
    assert gate(torch.empty(0, 64, dtype=torch.bfloat16)).shape == (0, 8)
    assert torch.equal(gate(x[5:6]), gate(x)[5:6])  # a row's logits ignore the other rows


def test_layer_experts_are_views_of_one_stack() -> None:
    w13, w2 = torch.randn(3, 8, 4), torch.randn(3, 4, 4)
    experts = LayerExperts([1, 4, 6], w13, w2)
    assert list(experts) == [1, 4, 6] and len(experts) == 3
    assert experts[4].w13.data_ptr() == w13[1].data_ptr()
    assert experts.num_bytes == (w13.numel() + w2.numel()) * 4


def test_metadata_worked_example_prompt_beside_decode() -> None:
    meta = build_metadata([0, 1], [0, 5], [3, 1], capacity=16, window=None)
    assert meta.positions.tolist() == [0, 1, 2, 5]
    assert meta.padded_index is not None and meta.padded_index.tolist() == [0, 1, 2, 3]
    assert meta.slot_range == (0, 2)
    mask = meta.mask[:, 0]
    assert mask[0, :, :3].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert mask[1, 0, :6].tolist() == [True] * 6  # the decoding token sees its 5 cached + itself


@settings(max_examples=80, deadline=None)
@given(cached=st.lists(st.integers(0, 40), min_size=1, max_size=6), capacity=st.integers(1, 48),
       window=st.none() | st.integers(1, 50), shuffled=st.booleans())
def test_decode_metadata_is_the_general_metadata_of_one_token_per_sequence(
        cached: list[int], capacity: int, window: int | None, shuffled: bool) -> None:
    """The short path of a decode step (one token each, no ring wrapped) builds what the general path does."""
    slots = list(range(len(cached)))[::-1] if shuffled else list(range(2, 2 + len(cached)))
    num_new = [1] * len(cached)
    got = build_metadata(slots, cached, num_new, capacity, window)
    want = _ragged_metadata(slots, cached, num_new, capacity, window, "cpu")
    for field in want.__dataclass_fields__:
        a, b = getattr(got, field), getattr(want, field)
        assert (torch.equal(a, b) and a.dtype == b.dtype) if isinstance(b, torch.Tensor) else a == b, field


def test_metadata_of_a_chunk_longer_than_the_window_writes_only_its_last_window() -> None:
    meta = build_metadata([3], [0], [12], capacity=8, window=8)
    assert meta.attend_before_write and meta.slot_range == (3, 4)
    assert meta.write_rows.tolist() == list(range(4, 12))
    assert sorted(meta.write_ring.tolist()) == list(range(8))
    # query 11 sees positions 4..11 only
    assert meta.mask[0, 0, 11].nonzero().flatten().tolist() == list(range(4, 12))


def test_group_by_expert_drops_slots_served_elsewhere() -> None:
    groups = group_by_expert(torch.tensor([[2, -1], [-1, 1], [0, 2]]), torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]]), 3)
    assert groups.token_rows.tolist() == [2, 1, 0, 2]
    assert groups.counts == [1, 1, 2]
    torch.testing.assert_close(groups.weights, torch.tensor([0.5, 0.3, 0.6, 0.5]))


@needs_tiles
@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 6), kv_heads=st.integers(1, 3), group=st.integers(1, 4), head_size=st.sampled_from([32, 64]),
       capacity=st.integers(1, 40), data=st.data())
def test_decode_attention_reads_the_ring_in_place_and_matches_softmax_attention(
        batch: int, kv_heads: int, group: int, head_size: int, capacity: int, data: st.DataObject) -> None:
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    keys = data.draw(st.integers(1, capacity))
    slots = torch.randperm(batch + 2, generator=g)[:batch]
    k_cache, v_cache = (torch.randn(batch + 2, kv_heads, capacity, head_size, generator=g).bfloat16() for _ in "kv")
    q = torch.randn(batch, kv_heads * group, head_size, generator=g).bfloat16()
    mask = torch.rand(batch, keys, generator=g) < 0.7
    mask[torch.arange(batch), torch.randint(0, keys, (batch,), generator=g)] = True  # a key for every query

    out = cpu_kernels.decode_attention(q, k_cache, v_cache, slots, mask)

    k = k_cache[slots, :, :keys].double().repeat_interleave(group, dim=1)  # [B, H, K, Dh]
    v = v_cache[slots, :, :keys].double().repeat_interleave(group, dim=1)
    scores = (q.double()[:, :, None, :] @ k.transpose(-1, -2)).squeeze(2) * head_size**-0.5  # [B, H, K]
    probs = torch.softmax(scores.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)
    want = (probs[:, :, None, :] @ v).squeeze(2)  # [B, H, Dh]
    # three bfloat16 roundings (scores, probabilities, output) on values of size about 1
    torch.testing.assert_close(out.double(), want, rtol=0.03, atol=0.03)
    alone = cpu_kernels.decode_attention(q[-1:], k_cache, v_cache, slots[-1:], mask[-1:])
    assert torch.equal(alone, out[-1:])  # a sequence's answer does not depend on the others


@needs_tiles
@settings(max_examples=40, deadline=None)
@given(cached=st.lists(st.integers(0, 20), min_size=1, max_size=5), new=st.data(), kv_heads=st.integers(1, 3),
       group=st.integers(1, 3), head_size=st.sampled_from([32, 64, 128]), scale=st.sampled_from([1.0, 300.0]),
       seed=st.integers(0, 2**16))
def test_the_rope_store_kernel_gives_the_bits_of_rope_then_store_and_leaves_other_cache_entries_alone(
        cached: list[int], new: st.DataObject, kv_heads: int, group: int, head_size: int, scale: float,
        seed: int) -> None:
    """A step's rotary embedding and cache store in one kernel call (prefill chunks and decode tokens side by
    side): the same queries, keys and values, bit for bit, as apply_rope and the indexed store in torch."""
    g = torch.Generator().manual_seed(seed)
    num_new = [new.draw(st.integers(1, 6)) for _ in cached]
    batch, heads, capacity = len(cached), kv_heads * group, 32
    slots = torch.randperm(batch + 2, generator=g)[:batch].tolist()
    meta = build_metadata(slots, cached, num_new, capacity, None)
    tokens = sum(num_new)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_size, generator=g) * scale).bfloat16()
    cos, sin = rope_cos_sin(meta.positions, rope_inv_freq(head_size, 1e6), torch.bfloat16)
    k_cache, v_cache = (torch.randn(batch + 2, kv_heads, capacity, head_size, generator=g).bfloat16() for _ in "kv")
    k_want, v_want = k_cache.clone(), v_cache.clone()  # the caches as the torch path leaves them

    q = cpu_kernels.rope_store(qkv, cos, sin, heads, k_cache, v_cache, meta.write_rows, meta.write_slots,
                               meta.write_ring)

    q_part, k_part, v_part = torch.split(qkv, [heads * head_size, kv_heads * head_size, kv_heads * head_size], -1)
    k_rot = apply_rope(k_part.reshape(tokens, kv_heads, head_size), cos, sin)
    k_want[meta.write_slots, :, meta.write_ring] = k_rot.index_select(0, meta.write_rows)
    v_want[meta.write_slots, :, meta.write_ring] = v_part.reshape(tokens, kv_heads, head_size)[meta.write_rows]
    assert torch.equal(q, apply_rope(q_part.reshape(tokens, heads, head_size), cos, sin))
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


@needs_tiles
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 20), vocab=st.integers(1, 700), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_the_greedy_kernel_picks_torchs_argmax_and_its_log_softmax(rows: int, vocab: int, scale: float, ties: bool,
                                                                   seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale
    if ties:  # the largest value several times in a row: the first one is the greedy token, as argmax's
        logits = logits.round()
    found = cpu_kernels.greedy(logits)
    assert found is not None
    ids, top, log_norm = found
    assert torch.equal(ids, logits.argmax(-1))
    want = torch.log_softmax(logits.double(), -1).gather(1, ids[:, None]).squeeze(1)
    torch.testing.assert_close((logits.gather(1, ids[:, None]).squeeze(1) - top - log_norm).double(), want,
                               atol=2e-6, rtol=0)


@needs_tiles
def test_the_greedy_kernel_leaves_rows_with_a_nan_or_an_infinite_top_to_torch() -> None:
    with_nan, with_inf, all_minus_inf = torch.zeros(3, 40), torch.zeros(3, 40), torch.zeros(3, 40)
    with_nan[1, 17], with_inf[1, 17], all_minus_inf[1] = float("nan"), float("inf"), float("-inf")
    for logits in (with_nan, with_inf, all_minus_inf):
        assert cpu_kernels.greedy(logits) is None
    assert cpu_kernels.greedy(torch.zeros(2, 40, dtype=torch.float64)) is None


@needs_tiles
def test_attention_of_projected_rows_is_the_same_with_and_without_the_rope_store_kernel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """attend_projected on a prefill chunk beside a decode token: the kernel path and the torch path give the
    same output and leave the same caches."""
    g = torch.Generator().manual_seed(11)
    meta = build_metadata([1, 0], [0, 9], [5, 1], capacity=16, window=None)
    qkv = torch.randn(6, (4 + 2 * 2) * 32, generator=g).bfloat16()
    cos, sin = rope_cos_sin(meta.positions, rope_inv_freq(32, 1e4), torch.bfloat16)
    fused = [torch.randn(2, 2, 16, 32, generator=g).bfloat16() for _ in "kv"]
    plain = [c.clone() for c in fused]
    with_kernel = attend_projected(qkv, cos, sin, fused[0], fused[1], 4, meta)
    monkeypatch.setattr(cpu_kernels, "ropes", lambda *args: False)
    without = attend_projected(qkv, cos, sin, plain[0], plain[1], 4, meta)
    assert torch.equal(with_kernel, without)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain, strict=True))


@needs_tiles
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(0, 130), width=st.sampled_from([16, 64, 1024]), scale=st.sampled_from([1e-3, 1.0, 300.0]),
       seed=st.integers(0, 2**16))
def test_the_rms_norm_kernel_rounds_as_torch_does_within_two_bf16_steps_and_each_row_ignores_the_others(
        rows: int, width: int, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=g) * scale).to(torch.bfloat16)
    weight = (torch.rand(width, generator=g) + 0.5).to(torch.bfloat16)
    got = rms_norm(x, weight, 1e-5)
    x32 = x.float()
    want = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)  # torch's ops
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    # The sum's order can move x * r by one bf16 step; times the weight (up to 1.5) and rounded again, that is
    # at most two steps of the output.
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=0)
    if rows:
        assert torch.equal(rms_norm(x[-1:], weight, 1e-5), got[-1:])


@needs_tiles
def test_stacking_keeps_the_experts_layout() -> None:
    tiled = _bf16_experts(torch.Generator().manual_seed(6), 64, 96, 3).pack_for_cpu()
    assert isinstance(tiled, LayerExperts)
    restacked = LayerExperts.stack(dict(tiled.items()))
    assert restacked.layout is Layout.TILES and torch.equal(restacked.w13, tiled.w13)
    plain = ExpertWeights(torch.zeros(192, 64).bfloat16(), torch.zeros(64, 96).bfloat16())
    with pytest.raises(ValueError, match="several layouts"):
        LayerExperts.stack({0: tiled[0], 1: plain})
