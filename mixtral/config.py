"""The model's shape, read from a Hugging Face `config.json` (Mixtral or Mistral).

Field names match the checkpoint's `config.json` keys, so loading is a filter, not a translation.
Anything in the file that would change the math and is not implemented here is rejected with an
error naming the field and its value: a model that loads computes what its checkpoint means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("mixtral", "mistral")
# Dtypes the model is served in, by the names of --dtype, config files and the wire.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """config.json is missing, unreadable, or asks for something this implementation does not do."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of a Mixtral (sparse MoE) or Mistral (dense, treated as one expert per layer) model."""

    model_type: str = "mixtral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # some configs set it, and it need not be hidden / heads
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None  # None: attend to the whole context
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = field(default=(2,))

    def __post_init__(self) -> None:
        _require(self.model_type in SUPPORTED_MODEL_TYPES, "model_type", self.model_type,
                 f"one of {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "num_local_experts",
                     "num_experts_per_tok", "max_position_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, value, "a positive integer")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 self.num_key_value_heads, f"a divisor of num_attention_heads={self.num_attention_heads}")
        _require(self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
                 self.num_experts_per_tok, f"at most num_local_experts={self.num_local_experts}")
        _require(self.head_size % 2 == 0, "head_dim", self.head_size, "an even number (rotary pairs)")
        _require(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
                 self.sliding_window, "null or a positive integer")
        _require(self.rope_theta > 0, "rope_theta", self.rope_theta, "a positive number")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "a positive number")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.model_type == "mixtral"

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_size

    @property
    def expert_num_params(self) -> int:
        """Parameters of one expert (w1, w2, w3)."""
        return 3 * self.hidden_size * self.intermediate_size

    @classmethod
    def from_json(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file (a model directory needs config.json)") from None
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
            raise ConfigError(f"{path}: cannot read config: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Hugging Face config dict -> ModelConfig; unsupported math raises ConfigError."""
        _reject_unsupported(raw)
        model_type = raw.get("model_type", "mixtral")
        nullable = {"head_dim", "sliding_window", "bos_token_id"}
        values = {f.name: raw[f.name] for f in fields(cls)
                  if f.name in raw and (raw[f.name] is not None or f.name in nullable)}
        values["model_type"] = model_type
        theta = _rope_theta(raw)
        if theta is not None:
            values["rope_theta"] = float(theta)
        eos = raw.get("eos_token_id", 2)
        values["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if model_type == "mistral":  # dense: one FFN per layer, served as expert 0 with weight 1
            values["num_local_experts"] = 1
            values["num_experts_per_tok"] = 1
        try:
            return cls(**values)
        except TypeError as err:
            raise ConfigError(f"malformed config: {err}") from None


def check_dtype(name: str | None) -> None:
    """Raise ValueError naming `name` unless it is a serving dtype (None: the device's default)."""
    if name is not None and name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported: choose one of {sorted(DTYPES)}")


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config field {name}={value!r} is not supported: expected {allowed}")


def _rope_theta(raw: dict[str, Any]) -> float | None:
    params = raw.get("rope_parameters")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    theta = raw.get("rope_theta") if theta is None else theta
    if theta is None:
        return None
    _require(isinstance(theta, (int, float)) and not isinstance(theta, bool), "rope_theta", theta, "a number")
    return float(theta)


def _reject_unsupported(raw: dict[str, Any]) -> None:
    """Fields whose values change the math and are not implemented raise ConfigError."""
    model_type = raw.get("model_type", "mixtral")
    _require(model_type in SUPPORTED_MODEL_TYPES, "model_type", model_type,
             f"one of {SUPPORTED_MODEL_TYPES}")
    act = raw.get("hidden_act", "silu")
    _require(act == "silu", "hidden_act", act, "'silu'")
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key)
        if isinstance(rope, dict):
            kind = rope.get("rope_type", rope.get("type", "default"))
            _require(kind == "default", f"{key}.rope_type", kind, "'default' (no RoPE scaling)")
        elif rope is not None:
            _require(False, key, rope, "null or an object")
    for key in ("attention_bias", "mlp_bias"):
        _require(not raw.get(key, False), key, raw.get(key), "false")
    jitter = raw.get("router_jitter_noise", 0.0)
    _require(not jitter, "router_jitter_noise", jitter, "0 (training-only noise)")
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        mixed = {t for t in layer_types} - {"full_attention", "sliding_attention"}
        _require(not mixed and len(set(layer_types)) <= 1, "layer_types", layer_types,
                 "one attention type for every layer")
