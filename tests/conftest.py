"""Shared fixtures: small random checkpoints in the real Hugging Face layout, written once per session.

Checkpoints are made with transformers (`save_pretrained`), the oracle, so the files are exactly
what real Mixtral/Mistral repositories contain; the vocabulary is Mixtral's real 32000 tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(max(1, int(os.environ.get("MOE_TEST_THREADS", os.cpu_count() or 1))))

# The tiny config of the style guide: hidden 64, 2 layers, 4 experts, top-2.
TINY: dict[str, Any] = dict(
    model_type="mixtral", vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
    max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
    # Wider than transformers' 0.02 so that greedy choices and expert choices are not near-ties.
    initializer_range=0.2,
)


def save_hf_checkpoint(out: Path, seed: int = 0, max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Write a random transformers MixtralForCausalLM/MistralForCausalLM checkpoint to `out`."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    params = {**TINY, **overrides}
    model_type = params.pop("model_type")
    torch.manual_seed(seed)
    if model_type == "mistral":
        params.pop("num_local_experts")
        params.pop("num_experts_per_tok")
        model: Any = MistralForCausalLM(MistralConfig(**params))
    else:
        model = MixtralForCausalLM(MixtralConfig(**params))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """hf_checkpoint(**overrides) -> directory of a cached random checkpoint with those overrides."""
    made: dict[str, Path] = {}

    def make(seed: int = 0, max_shard_size: str | None = None, **overrides: Any) -> Path:
        key = repr((seed, max_shard_size, sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt")
            made[key] = save_hf_checkpoint(out, seed, max_shard_size, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(hf_checkpoint: Callable[..., Path]) -> Path:
    """The shared tiny Mixtral checkpoint, sharded with an index (as real ones are)."""
    return hf_checkpoint(max_shard_size="1MB")
