"""mixtral.config: real config.json files load with the right shape; unsupported math is refused by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import MistralConfig, MixtralConfig

from mixtral.config import ConfigError, ModelConfig

# The small Mixtral of these tests, as keyword arguments of transformers' MixtralConfig.
SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)

# Config files as published on the Hugging Face Hub (top-level rope_theta, as transformers 4 wrote).
HUB_MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}
HUB_MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}
# Mistral NeMo: head_dim 128 although hidden_size / num_attention_heads is 160.
HUB_MISTRAL_NEMO = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 1024000,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 40,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0",
    "use_cache": True, "vocab_size": 131072,
}


def write_json(path: Path, raw: object) -> Path:
    path.write_text(json.dumps(raw, indent=2))
    return path


def saved_config(tmp_path: Path, hf_config: MixtralConfig | MistralConfig) -> Path:
    """config.json exactly as transformers' save_pretrained writes it."""
    hf_config.save_pretrained(tmp_path)
    return tmp_path / "config.json"


def test_checkpoint_config_written_by_transformers_loads(tiny_checkpoint: Path) -> None:
    config = ModelConfig.from_json(tiny_checkpoint / "config.json")

    assert config.model_type == "mixtral" and config.is_moe
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (32000, 64, 128)
    assert config.num_hidden_layers == 2
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 1)
    assert config.head_dim is None
    assert config.head_size == 16  # derived: hidden_size / num_attention_heads
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)
    assert config.rope_theta == 10000.0  # from rope_parameters.rope_theta
    assert config.sliding_window is None
    assert config.max_position_embeddings == 512
    assert config.tie_word_embeddings is False
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))


def test_mixtral_config_with_every_optional_field_loads(tmp_path: Path) -> None:
    path = saved_config(tmp_path, MixtralConfig(
        **SMALL, head_dim=32, rope_theta=5e5, sliding_window=256, tie_word_embeddings=True,
        bos_token_id=5, eos_token_id=[2, 7], rms_norm_eps=1e-6, max_position_embeddings=4096))
    assert "rope_parameters" in json.loads(path.read_text())  # transformers 5 layout

    config = ModelConfig.from_json(path)

    assert config.head_dim == 32 and config.head_size == 32  # given, not hidden_size / heads (16)
    assert (config.q_size, config.kv_size) == (4 * 32, 2 * 32)
    assert config.rope_theta == 5e5
    assert config.sliding_window == 256
    assert config.tie_word_embeddings is True
    assert config.bos_token_id == 5
    assert config.eos_token_ids == (2, 7)
    assert config.rms_norm_eps == 1e-6
    assert config.max_position_embeddings == 4096


def test_mistral_becomes_one_expert_top_one(tmp_path: Path) -> None:
    dense = {k: v for k, v in SMALL.items() if k not in ("num_local_experts", "num_experts_per_tok")}
    config = ModelConfig.from_json(saved_config(tmp_path, MistralConfig(**dense, sliding_window=128)))

    assert config.model_type == "mistral" and not config.is_moe
    assert (config.num_local_experts, config.num_experts_per_tok) == (1, 1)
    assert config.sliding_window == 128
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_size) == (4, 2, 16)


@pytest.mark.parametrize(("raw", "want"), [
    (HUB_MIXTRAL_8X7B, dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2,
                            rope_theta=1e6, sliding_window=None, head_size=128, num_key_value_heads=8)),
    (HUB_MISTRAL_7B, dict(model_type="mistral", num_local_experts=1, num_experts_per_tok=1,
                          rope_theta=1e4, sliding_window=4096, head_size=128, num_key_value_heads=8)),
    (HUB_MISTRAL_NEMO, dict(model_type="mistral", num_local_experts=1, num_experts_per_tok=1,
                            rope_theta=1e6, sliding_window=None, head_size=128, num_hidden_layers=40,
                            vocab_size=131072)),
], ids=["mixtral-8x7b", "mistral-7b", "mistral-nemo"])
def test_hub_config_with_top_level_rope_theta_loads(tmp_path: Path, raw: dict[str, Any],
                                                     want: dict[str, Any]) -> None:
    config = ModelConfig.from_json(write_json(tmp_path / "config.json", raw))

    assert {key: getattr(config, key) for key in want} == want


def test_rope_parameters_take_precedence_over_a_stale_top_level_rope_theta(tmp_path: Path) -> None:
    raw = {**HUB_MIXTRAL_8X7B, "rope_theta": 1e4,
           "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}

    assert ModelConfig.from_json(write_json(tmp_path / "config.json", raw)).rope_theta == 1e6


def yarn(key: str) -> dict[str, Any]:
    return {key: {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                  "original_max_position_embeddings": 4096}}


@pytest.mark.parametrize(("override", "field", "value"), [
    (yarn("rope_parameters"), "rope_parameters.rope_type", "yarn"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}},
     "rope_parameters.rope_type", "linear"),
    (yarn("rope_scaling"), "rope_scaling.rope_type", "yarn"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type", "linear"),
    ({"hidden_act": "gelu"}, "hidden_act", "gelu"),
    ({"attention_bias": True}, "attention_bias", True),
    ({"model_type": "llama"}, "model_type", "llama"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok", 5),  # only 4 experts
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads", 3),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_field_is_rejected_by_name_and_value(tmp_path: Path, override: dict[str, Any],
                                                          field: str, value: object) -> None:
    raw = json.loads(saved_config(tmp_path, MixtralConfig(**SMALL)).read_text())
    path = write_json(tmp_path / "config.json", {**raw, **override})

    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_json(path)

    message = str(caught.value)
    assert str(path) in message
    assert f"{field}={value!r}" in message


def test_heads_not_divisible_by_kv_heads_names_both(tmp_path: Path) -> None:
    raw = {**HUB_MIXTRAL_8X7B, "num_attention_heads": 32, "num_key_value_heads": 6}

    with pytest.raises(ConfigError, match=r"num_key_value_heads=6.*num_attention_heads=32"):
        ModelConfig.from_json(write_json(tmp_path / "config.json", raw))


def test_unsupported_values_are_rejected_from_a_dict_too() -> None:
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        ModelConfig.from_dict({**HUB_MIXTRAL_8X7B, "hidden_act": "gelu"})


def test_missing_config_json_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "no-model" / "config.json"

    with pytest.raises(ConfigError, match="no such file") as caught:
        ModelConfig.from_json(path)

    assert str(path) in str(caught.value)


@pytest.mark.parametrize("write", [
    lambda p: p.write_text('{"hidden_size": 64,'),  # truncated JSON
    lambda p: p.write_text("hidden_size: 64\n"),  # YAML, not JSON
    lambda p: p.write_text('["mixtral"]'),  # JSON, but not an object
], ids=["truncated", "yaml", "array"])
def test_non_json_config_names_the_path(tmp_path: Path, write: Callable[[Path], object]) -> None:
    path = tmp_path / "config.json"
    write(path)

    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_json(path)

    assert str(path) in str(caught.value)


def test_binary_config_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe\x00\x01 not json")

    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_json(path)

    assert str(path) in str(caught.value)
