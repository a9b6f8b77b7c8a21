"""The model in one process computes what transformers computes on the same checkpoint files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.deploy import LocalConfig, build_local_engine
from router.engine import Completion, EngineConfig
from router.kv_cache import CacheConfig
from router.sampler import SamplingParams

NEW_TOKENS = 32
PROMPTS = [[1, 330, 2033, 349, 264, 1369, 302], [1, 22557], [1, 415, 5565, 302, 4843, 349, 5465, 28725, 304, 272, 5565, 302]]

CASES: dict[str, dict[str, Any]] = {
    "gqa4to1-4experts-top2-2layers": dict(num_attention_heads=4, num_key_value_heads=1, num_local_experts=4,
                                          num_experts_per_tok=2, num_hidden_layers=2),
    "gqa2to1-8experts-top2-3layers-tied": dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                               num_experts_per_tok=2, num_hidden_layers=3, tie_word_embeddings=True),
    "gqa2to1-4experts-top1-4layers": dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                          num_experts_per_tok=1, num_hidden_layers=4),
    "head-dim-differs-from-hidden-over-heads": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                    num_hidden_layers=2),
    "mistral-dense-sliding-window-8": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2,
                                           num_hidden_layers=2, sliding_window=8),
}


def run_engine(model_dir: Path, prompts: list[list[int]], dtype: str = "float32", new_tokens: int = NEW_TOKENS,
               max_batch_tokens: int = 2048, device: str = "cpu") -> list[Completion]:
    cfg = LocalConfig(model_dir, dtype=dtype, device=device,
                      cache=CacheConfig(num_slots=len(prompts), max_seq_len=64),
                      engine=EngineConfig(max_batch_tokens=max_batch_tokens))
    engine = build_local_engine(cfg)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return engine.generate(prompts, [params] * len(prompts))


def hf_model(model_dir: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # generate all tokens, as ignore_eos does
    return model


def reference(model: Any, prompt: list[int], new_tokens: int = NEW_TOKENS
              ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """transformers' greedy tokens for one prompt, the log-softmax of each chosen token, and the
    margin of each choice (best minus second-best logit), on the model's device."""
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logits = torch.stack([step[0].float().cpu() for step in out.logits])  # [N, V]
    logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    top2 = logits.topk(2, dim=-1).values
    return tokens, logprobs, top2[:, 0] - top2[:, 1]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_and_logprobs_match_transformers_fp32(case: str, hf_checkpoint: Callable[..., Path]) -> None:
    model_dir = hf_checkpoint(max_shard_size="2MB", **CASES[case])
    ours = run_engine(model_dir, PROMPTS)
    model = hf_model(model_dir, torch.float32)
    for prompt, completion in zip(PROMPTS, ours):
        tokens, logprobs, _ = reference(model, prompt)
        assert completion.token_ids == tokens
        torch.testing.assert_close(torch.tensor(completion.logprobs), logprobs, atol=1e-4, rtol=0)


def test_sliding_window_case_is_longer_than_its_window() -> None:
    # The Mistral case only tests the rolling buffer if prompt + generation exceed the window,
    # and a prompt longer than the window exercises chunks that wrap the ring.
    window = CASES["mistral-dense-sliding-window-8"]["sliding_window"]
    assert max(len(p) for p in PROMPTS) > window
    assert min(len(p) for p in PROMPTS) + NEW_TOKENS > window


# Two correct bf16 engines differ by a few bf16 spacings: different matmul blockings round
# differently, and a logit near 8 has a spacing of 0.0625. Random-weight models have flat
# next-token distributions, so two logits often fall within that distance and greedy decoding
# may then take either. The bf16 comparison therefore uses prompts on which transformers' own
# choice is decisive (best logit ahead of the second by BF16_DECISIVE_MARGIN at each of the first
# BF16_TOKENS steps); on those, our tokens must be identical.
BF16_LOGPROB_ATOL = 0.25
BF16_DECISIVE_MARGIN = 0.1  # about 3 bf16 spacings at the top logits (about 4-6)
BF16_TOKENS = 8


def decisive_prompts(model: Any, count: int) -> list[tuple[list[int], list[int], torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    found = []
    for _ in range(200):
        length = int(torch.randint(2, 13, (1,), generator=generator))
        prompt = [1, *torch.randint(3, 32000, (length - 1,), generator=generator).tolist()]
        tokens, logprobs, margins = reference(model, prompt, new_tokens=BF16_TOKENS)
        if bool((margins > BF16_DECISIVE_MARGIN).all()):
            found.append((prompt, tokens, logprobs))
        if len(found) == count:
            return found
    raise AssertionError(f"fewer than {count} of 200 prompts are decisive in bf16; lower the margin")


@pytest.mark.parametrize("case", ["gqa4to1-4experts-top2-2layers", "mistral-dense-sliding-window-8"])
def test_bfloat16_on_cpu_agrees_with_transformers_bfloat16(case: str, hf_checkpoint: Callable[..., Path]) -> None:
    model_dir = hf_checkpoint(max_shard_size="2MB", **CASES[case])
    chosen = decisive_prompts(hf_model(model_dir, torch.bfloat16), count=3)
    ours = run_engine(model_dir, [p for p, _, _ in chosen], dtype="bfloat16", new_tokens=BF16_TOKENS)
    for (_, tokens, logprobs), completion in zip(chosen, ours):
        assert completion.token_ids == tokens
        torch.testing.assert_close(torch.tensor(completion.logprobs), logprobs, atol=BF16_LOGPROB_ATOL, rtol=0)
