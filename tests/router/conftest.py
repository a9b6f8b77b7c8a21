"""Fixtures of the moe.v1 API tests: a server per test module, and the same checkpoint in a bare engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster.deploy import LocalConfig, build_engine, load_local_model
from router.api import ServerConfig
from router.engine import Completion, EngineConfig
from router.kv_cache import CacheConfig
from router.sampler import SamplingParams
from router.scheduler import SchedulerConfig
from tests.router.served import (
    LIMITS,
    MAX_MESSAGE_BYTES,
    SLOTS,
)
from tests.serving import (
    ServerHandle,
    start_server,
)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ServerHandle]:
    """The shared server: 8 slots, prompts up to 64 tokens, max_new_tokens up to 64, 64 KiB messages."""
    cfg = ServerConfig(limits=LIMITS, max_message_bytes=MAX_MESSAGE_BYTES)
    with start_server(tiny_checkpoint, server=cfg, cache=CacheConfig(num_slots=SLOTS, max_seq_len=128),
                      scheduler=SchedulerConfig(max_queue=64)) as srv:
        yield srv


@pytest.fixture(scope="module")
def alone_engine(tiny_checkpoint: Path) -> Callable[[list[int], SamplingParams], Completion]:
    """The same checkpoint in a bare engine: alone(prompt, params) -> the completion served with nothing else."""
    model = load_local_model(LocalConfig(tiny_checkpoint, dtype="float32", device="cpu"))

    def alone(prompt: list[int], params: SamplingParams) -> Completion:
        engine = build_engine(model, CacheConfig(num_slots=1, max_seq_len=len(prompt) + params.max_new_tokens),
                              EngineConfig())
        return engine.generate([prompt], [params])[0]

    return alone
