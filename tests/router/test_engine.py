"""Engine invariants: the KV cache, batching and chunking never change what a sequence computes."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cluster.deploy import LocalConfig, build_engine, load_local_model
from mixtral import cpu_kernels
from mixtral.attention import build_metadata
from mixtral.model import Mixtral
from router.engine import Completion, Engine, EngineConfig, RequestError
from router.kv_cache import CacheConfig, CacheFullError, KVCache
from router.sampler import SamplingParams

GREEDY = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 415, 5565, 302, 4843, 349, 5465, 28725, 304, 272, 5565], [1, 22557, 28808], [1, 330, 2033, 349, 264]]
SLIDING = dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=8)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Mixtral:
    return load_local_model(LocalConfig(tiny_checkpoint, dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def sliding_model(hf_checkpoint: Callable[..., Path]) -> Mixtral:
    return load_local_model(LocalConfig(hf_checkpoint(**SLIDING), dtype="float32", device="cpu"))


def engine_for(model: Mixtral, slots: int = 4, max_seq_len: int = 256, max_batch_tokens: int = 2048) -> Engine:
    return build_engine(model, CacheConfig(num_slots=slots, max_seq_len=max_seq_len),
                        EngineConfig(max_batch_tokens=max_batch_tokens))


def generate(model: Mixtral, prompts: list[list[int]], params: SamplingParams = GREEDY, **kw: int
             ) -> list[Completion]:
    return engine_for(model, slots=max(4, len(prompts)), **kw).generate(prompts, [params] * len(prompts))


def prefill_logprobs(model: Mixtral, tokens: list[int]) -> torch.Tensor:
    """Log-softmax at every position of `tokens`, from one prefill into a fresh cache: [N, V]."""
    cache = KVCache(model.config, CacheConfig(num_slots=1, max_seq_len=len(tokens)), model.dtype)
    meta = build_metadata([0], [0], [len(tokens)], cache.capacity, model.config.sliding_window)
    with torch.inference_mode():
        logits = model.forward(torch.tensor(tokens), meta, cache.layers, torch.arange(len(tokens)))
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("which", ["moe", "sliding"])
def test_decoding_with_the_cache_equals_a_fresh_prefill_of_the_whole_sequence(
        which: str, model: Mixtral, sliding_model: Mixtral) -> None:
    m = model if which == "moe" else sliding_model
    for completion in generate(m, PROMPTS):
        full = completion.prompt_token_ids + completion.token_ids
        logprobs = prefill_logprobs(m, full)[len(completion.prompt_token_ids) - 1:-1]  # predicts each new token
        assert logprobs.argmax(-1).tolist() == completion.token_ids
        chosen = logprobs.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(completion.logprobs), chosen, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["moe", "sliding"])
def test_a_batch_gives_each_prompt_the_tokens_it_gets_alone(which: str, model: Mixtral,
                                                              sliding_model: Mixtral) -> None:
    m = model if which == "moe" else sliding_model
    together = generate(m, PROMPTS)
    for prompt, batched in zip(PROMPTS, together):
        alone = generate(m, [prompt])[0]
        assert batched.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(batched.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["moe", "sliding"])
def test_chunked_prefill_matches_unchunked(which: str, model: Mixtral, sliding_model: Mixtral) -> None:
    # With a 5-token budget the 11-token prompt arrives in chunks beside other sequences' decodes;
    # for the sliding model (window 8) a chunk wraps the ring buffer.
    m = model if which == "moe" else sliding_model
    whole = generate(m, PROMPTS)
    chunked = generate(m, PROMPTS, max_batch_tokens=5)
    for a, b in zip(whole, chunked):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_sliding_window_cache_never_holds_more_than_the_window(sliding_model: Mixtral) -> None:
    window = SLIDING["sliding_window"]
    engine = engine_for(sliding_model, slots=2, max_seq_len=4096)
    seq = engine.add("long", PROMPTS[0], SamplingParams(max_new_tokens=150, temperature=0.0, ignore_eos=True))
    while engine.running:
        engine.step()
        for k, v in engine.cache.layers:
            assert k.shape[2] == window and v.shape[2] == window  # positions allocated per sequence
    assert seq.num_generated == 150
    full = seq.tokens
    # The rolling buffer still computes exactly what attending to the window of the full sequence does.
    expected = prefill_logprobs(sliding_model, full)[len(PROMPTS[0]) - 1:-1].argmax(-1).tolist()
    assert full[len(PROMPTS[0]):] == expected


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model: Mixtral) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = generate(model, [PROMPTS[1]], params)[0].token_ids
    again = generate(model, [PROMPTS[1]], params)[0].token_ids
    engine = engine_for(model)
    engine.add("other", PROMPTS[0], SamplingParams(max_new_tokens=12, seed=99, ignore_eos=True))
    seq = engine.add("mine", PROMPTS[1], params)
    while engine.running:
        engine.step()
    assert alone == again == seq.tokens[len(PROMPTS[1]):]
    other_seed = generate(model, [PROMPTS[1]], SamplingParams(max_new_tokens=12, seed=8, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_top_k_one_is_greedy(model: Mixtral) -> None:
    greedy = generate(model, PROMPTS[:1])[0]
    top1 = generate(model, PROMPTS[:1], SamplingParams(max_new_tokens=20, temperature=0.8, top_k=1,
                                                      ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_stop_token_ends_the_sequence_with_reason_stop(model: Mixtral) -> None:
    greedy = generate(model, PROMPTS[:1])[0].token_ids
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    stopped = generate(model, PROMPTS[:1], SamplingParams(max_new_tokens=20, temperature=0.0,
                                                          stop_token_ids=(stop_at,), ignore_eos=True))[0]
    assert stopped.token_ids == greedy[:first + 1]
    assert stopped.finish_reason == "stop"


def test_eos_stops_unless_ignored(model: Mixtral) -> None:
    greedy = generate(model, PROMPTS[:1])[0].token_ids
    eos_model = copy.copy(model)
    eos_model.config = dataclasses.replace(model.config, eos_token_ids=(greedy[2],))
    stopped = generate(eos_model, PROMPTS[:1], SamplingParams(max_new_tokens=20, temperature=0.0))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == greedy[2]
    assert generate(eos_model, PROMPTS[:1])[0].finish_reason == "length"


def test_max_new_tokens_ends_with_reason_length(model: Mixtral) -> None:
    out = generate(model, PROMPTS[:1], SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == len(out.logprobs) == 5 and out.finish_reason == "length"


def test_bad_requests_are_refused_with_a_reason(model: Mixtral) -> None:
    engine = engine_for(model, slots=1, max_seq_len=32)
    with pytest.raises(RequestError, match="empty"):
        engine.add("a", [], GREEDY)
    with pytest.raises(RequestError, match="32000"):
        engine.add("b", [1, 32000], GREEDY)
    with pytest.raises(RequestError, match="exceeds the maximum sequence length 32"):
        engine.add("c", [1] * 20, SamplingParams(max_new_tokens=13))
    engine.add("d", [1, 2], GREEDY)
    with pytest.raises(CacheFullError):
        engine.add("e", [1, 2], GREEDY)


@pytest.mark.parametrize("which", ["moe", "sliding"])
def test_overlapped_microbatches_compute_what_one_batch_does(which: str, model: Mixtral,
                                                             sliding_model: Mixtral) -> None:
    m = model if which == "moe" else sliding_model
    whole = generate(m, PROMPTS)
    engine = build_engine(m, CacheConfig(num_slots=4, max_seq_len=256),
                          EngineConfig(max_batch_tokens=7, overlap_microbatches=True))  # chunks beside decodes
    overlapped = engine.generate(PROMPTS, [GREEDY] * len(PROMPTS))
    for a, b in zip(whole, overlapped):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_a_warm_up_fills_one_step_then_leaves_the_engine_empty_and_its_results_unchanged(model: Mixtral) -> None:
    engine = engine_for(model, slots=4, max_seq_len=64, max_batch_tokens=40)
    assert engine.warm_up() == (4, 10)  # every slot, the step's whole budget of prompt
    assert engine.running == [] and engine.cache.num_free == 4
    for after, fresh in zip(engine.generate(PROMPTS, [GREEDY] * len(PROMPTS)), generate(model, PROMPTS), strict=True):
        assert after.token_ids == fresh.token_ids
        torch.testing.assert_close(torch.tensor(after.logprobs), torch.tensor(fresh.logprobs), atol=1e-5, rtol=0)
    short = engine_for(model, slots=2, max_seq_len=3, max_batch_tokens=8)
    assert short.warm_up() == (2, 1)  # a prompt and a decode step still fit


def test_a_kv_cache_budget_holds_whole_sequences_only(model: Mixtral) -> None:
    from router.kv_cache import slots_within

    c = model.config
    per_slot = 2 * c.num_hidden_layers * c.kv_size * 100 * 4  # float32, 100 positions
    assert slots_within(c, 100, torch.float32, 3 * per_slot + per_slot // 2) == 3
    with pytest.raises(ValueError, match="holds no sequence of 100 positions"):
        slots_within(c, 100, torch.float32, per_slot - 1)


@pytest.mark.skipif(not cpu_kernels.available(), reason="moe-cluster's CPU kernels are not built here")
@pytest.mark.parametrize("window", [None, 8])  # 8: the ring wraps during the generation
def test_bf16_decode_steps_through_the_fused_layer_kernel_give_the_bits_of_the_separate_kernels(
        window: int | None, hf_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step runs each layer's attention half in one kernel call (cpu_kernels.decode_block); tokens,
    log-probabilities and the KV cache are bit for bit those of the separate kernel calls."""
    checkpoint = hf_checkpoint(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=window)
    bf16 = load_local_model(LocalConfig(checkpoint, dtype="bfloat16", device="cpu"))
    assert bf16.config.sliding_window == window
    params = [dataclasses.replace(GREEDY, max_new_tokens=n) for n in (12, 5, 9)]
    calls = []
    fused_block = cpu_kernels.decode_block
    monkeypatch.setattr(cpu_kernels, "decode_block", lambda *a: calls.append(1) or fused_block(*a))
    fused_engine = engine_for(bf16)
    fused = fused_engine.generate(PROMPTS, params)
    assert len(calls) == 11 * bf16.config.num_hidden_layers  # every decode step, every layer
    monkeypatch.setattr(cpu_kernels, "blocks", lambda *a: False)
    separate_engine = engine_for(bf16)
    separate = separate_engine.generate(PROMPTS, params)
    for a, b in zip(fused, separate, strict=True):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    for (k1, v1), (k2, v2) in zip(fused_engine.cache.layers, separate_engine.cache.layers, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
