"""Random-weight Mixtral checkpoints in the exact Hugging Face layout, for demos, tests and benchmarks.

No weights can be downloaded where moe-cluster is built, so the demo model is a real-format
checkpoint (config.json, safetensors, an index when sharded) with random weights and the real
32000-token vocabulary of Mixtral 8x7B; its text is gibberish, its shapes and files are not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from mixtral.checkpoint import expected_shapes, write_checkpoint
from mixtral.config import ModelConfig

log = logging.getLogger(__name__)

INIT_STD = 0.02  # transformers' initializer_range for Mixtral

SIZES: dict[str, dict[str, int]] = {
    # loads in well under a second: for the demo and the tests
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
    # the benchmark model: 791M parameters, 3.16 GB in float32
    "mini": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2),
}


def demo_config(size: str) -> dict[str, object]:
    """The config.json of a demo model, as transformers writes one for MixtralForCausalLM."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a demo size: choose one of {sorted(SIZES)}")
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
        **SIZES[size],
        "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        "router_jitter_noise": 0.0, "attention_dropout": 0.0, "initializer_range": INIT_STD,
    }


def write_demo_model(out: Path, size: str = "tiny", seed: int = 0, shard_bytes: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> ModelConfig:
    """Write a random Mixtral checkpoint to `out`; `progress(done, total)` is called per tensor."""
    raw = demo_config(size)
    config = ModelConfig.from_dict(raw)
    shapes = expected_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, shape) in enumerate(shapes.items()):
        tensors[name] = _random_tensor(name, shape, generator)
        if progress is not None:
            progress(i + 1, len(shapes))
    out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(out, tensors, shard_bytes)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    log.info("wrote %s demo model to %s", size, out)
    return config


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm scales start at one
        return torch.ones(shape)
    return torch.empty(shape).normal_(0.0, INIT_STD, generator=generator)
