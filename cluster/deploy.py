"""Wiring: a model directory -> an engine with its experts (in-process for now) and KV cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experts.backend import InProcessExperts
from experts.weights import all_experts, load_shard
from mixtral.checkpoint import Checkpoint
from mixtral.config import ModelConfig
from mixtral.model import Mixtral
from router.engine import Engine, EngineConfig
from router.kv_cache import CacheConfig, KVCache

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class LocalConfig:
    """One process holding the whole model."""

    model_dir: Path
    dtype: str | None = None  # None: bfloat16 on a GPU, float32 on the CPU
    device: str | None = None  # None: cuda when torch sees a GPU, else cpu
    cache: CacheConfig = field(default_factory=CacheConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported: choose one of {sorted(DTYPES)}")
        if self.device is not None:
            check_device(self.device)

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def resolved_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return torch.bfloat16 if self.resolved_device.startswith("cuda") else torch.float32


def check_device(device: str) -> None:
    """Raise ValueError naming `device` unless torch can place tensors there."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise ValueError(f"device={device!r} is not available: torch sees {count} CUDA device(s)")
    elif parsed.type != "cpu":
        raise ValueError(f"device={device!r} is not supported: use cpu, cuda or cuda:N")


def load_local_model(cfg: LocalConfig) -> Mixtral:
    """Load config, router weights and every expert of `cfg.model_dir` into this process."""
    model_config = ModelConfig.from_json(cfg.model_dir / "config.json")
    checkpoint = Checkpoint(cfg.model_dir, model_config)
    dtype, device = cfg.resolved_dtype, cfg.resolved_device
    shard = load_shard(checkpoint, all_experts(checkpoint), dtype, device)
    experts = InProcessExperts(shard, model_config.num_local_experts)
    return Mixtral.load(checkpoint, dtype, device, experts)


def build_engine(model: Mixtral, cache: CacheConfig, engine: EngineConfig) -> Engine:
    """An engine over `model` with a fresh KV cache in the model's dtype and device."""
    return Engine(model, KVCache(model.config, cache, model.dtype, model.device), engine)


def build_local_engine(cfg: LocalConfig) -> Engine:
    """The whole model in this process, with the cache and step limits of `cfg`."""
    return build_engine(load_local_model(cfg), cfg.cache, cfg.engine)
