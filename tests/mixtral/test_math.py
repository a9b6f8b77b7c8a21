"""The pure math: the gate, grouped expert compute, attention metadata."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtral.attention import build_metadata
from mixtral.expert import ExpertWeights, LayerExperts, expert_ffn, group_by_expert, moe_combine
from mixtral.gate import route
from mixtral.linear import Projection


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


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 96), held=st.sets(st.integers(0, 5), min_size=1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_a_hosts_experts_give_each_tokens_weighted_sum_over_the_experts_it_holds(
        tokens: int, held: set[int], dtype: torch.dtype, seed: int) -> None:
    """A host holding some of a layer's experts (stacked) sees -1 for the others' slots."""
    g = torch.Generator().manual_seed(seed)
    d, f, e = 16, 24, 6
    experts = LayerExperts.stack({i: ExpertWeights.from_checkpoint(
        torch.randn(f, d, generator=g).to(dtype), torch.randn(d, f, generator=g).to(dtype),
        torch.randn(f, d, generator=g).to(dtype)) for i in sorted(held)})
    hidden = torch.randn(tokens, d, generator=g).to(dtype)
    weights, ids = route(torch.randn(tokens, e, generator=g), 2)
    ids = torch.where(torch.isin(ids, torch.tensor(sorted(held))), ids, -1)  # rows of other hosts' experts
    got = moe_combine(hidden, group_by_expert(ids, weights, e), experts)
    want = torch.zeros(tokens, d)
    for t, k in torch.nonzero(ids >= 0).tolist():
        want[t] += weights[t, k] * expert_ffn(hidden[t:t + 1].float(), _fp32(experts[int(ids[t, k])]))[0]
    tolerance = 1e-4 if dtype == torch.float32 else 0.05 * float(want.abs().max())
    torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=1e-3 if dtype == torch.float32 else 0.02)


def _fp32(expert: ExpertWeights) -> ExpertWeights:
    return ExpertWeights(expert.w13.float(), expert.w2.float())


def test_experts_packed_for_onednn_give_the_same_bf16_bits() -> None:
    g = torch.Generator().manual_seed(3)
    d, f, e = 64, 96, 4
    experts = LayerExperts.stack({i: ExpertWeights.from_checkpoint(
        *(torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in ((f, d), (d, f), (f, d))))
        for i in range(e)})
    packed = experts.pack_for_cpu()
    assert all(packed[i].packed for i in range(e)) and not experts[2].packed
    for tokens in (1, 5, 40):
        hidden = torch.randn(tokens, d, generator=g).to(torch.bfloat16)
        weights, ids = route(torch.randn(tokens, e, generator=g), 2)
        groups = group_by_expert(ids, weights, e)
        assert torch.equal(moe_combine(hidden, groups, packed), moe_combine(hidden, groups, experts))
    fp32 = LayerExperts.stack({0: _fp32(experts[0])})
    assert fp32.pack_for_cpu() is fp32  # float32 stays as it is (packing changes its bits)


def test_projections_packed_for_onednn_give_the_same_bf16_bits() -> None:
    g = torch.Generator().manual_seed(5)
    for n, k in ((96, 64), (40, 72)):  # the attention projections and the LM head, in small
        weight = torch.randn(n, k, generator=g).to(torch.bfloat16)
        projection = Projection.of(weight)
        assert projection.packed
        for rows in (1, 7, 33, 300):
            x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
            assert torch.equal(projection(x), torch.nn.functional.linear(x, weight))
        batched = torch.randn(2, 3, k, generator=g).to(torch.bfloat16)
        assert torch.equal(projection(batched), torch.nn.functional.linear(batched, weight))
    fp32 = Projection.of(torch.randn(8, 4))
    assert not fp32.packed  # float32 keeps F.linear (packing changes its bits)


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
