"""The GPU path: on CUDA the model computes what transformers computes, a batch gives each prompt its tokens
alone, and expert hosts and a served stream answer what the CPU answers.

Skipped where torch sees no GPU: CI and the development machines have none. On a CUDA machine:
`python -m pytest tests/test_cuda.py`; bench/README.md says where it last ran and what it found.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from cluster.deploy import LocalConfig, build_engine, load_local_model
from experts.service import ExpertServerConfig, ExpertServiceServicer, ServingThread
from experts.weights import load_shard
from mixtral.checkpoint import Checkpoint
from mixtral.config import DTYPES, ModelConfig
from mixtral.model import Mixtral
from router.dispatch import DispatchConfig, RemoteExperts, RoutingTable
from router.engine import Completion, EngineConfig
from router.kv_cache import CacheConfig
from router.sampler import SamplingParams
from tests.mixtral.test_reference import (
    BF16_LOGPROB_ATOL,
    BF16_TOKENS,
    CASES,
    PROMPTS,
    decisive_prompts,
    hf_model,
    reference,
    run_engine,
)
from tests.serving import load_counted_model, merge, request, start_server

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)


def generate(model: Mixtral, prompts: list[list[int]]) -> list[Completion]:
    engine = build_engine(model, CacheConfig(num_slots=max(4, len(prompts)), max_seq_len=128), EngineConfig())
    return engine.generate(prompts, [GREEDY] * len(prompts))


def assert_same(got: list[Completion], want: list[Completion], atol: float) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=atol, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_float32_on_cuda_matches_transformers(case: str, hf_checkpoint: Callable[..., Path]) -> None:
    model_dir = hf_checkpoint(max_shard_size="2MB", **CASES[case])
    ours = run_engine(model_dir, PROMPTS, device="cuda")
    model = hf_model(model_dir, torch.float32)  # the reference on the CPU
    for prompt, completion in zip(PROMPTS, ours, strict=True):
        tokens, logprobs, _ = reference(model, prompt)
        assert completion.token_ids == tokens
        torch.testing.assert_close(torch.tensor(completion.logprobs), logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["gqa4to1-4experts-top2-2layers", "mistral-dense-sliding-window-8"])
def test_bfloat16_on_cuda_agrees_with_transformers_bfloat16_on_cuda(case: str,
                                                                    hf_checkpoint: Callable[..., Path]) -> None:
    # As on the CPU (tests/mixtral/test_reference.py): prompts on which transformers' choices are decisive.
    model_dir = hf_checkpoint(max_shard_size="2MB", **CASES[case])
    chosen = decisive_prompts(hf_model(model_dir, torch.bfloat16).to("cuda"), count=3)
    ours = run_engine(model_dir, [p for p, _, _ in chosen], dtype="bfloat16", new_tokens=BF16_TOKENS, device="cuda")
    for (_, tokens, logprobs), completion in zip(chosen, ours, strict=True):
        assert completion.token_ids == tokens
        torch.testing.assert_close(torch.tensor(completion.logprobs), logprobs, atol=BF16_LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_batch_on_cuda_gives_each_prompt_the_tokens_it_gets_alone(dtype: str, tiny_checkpoint: Path) -> None:
    model = load_local_model(LocalConfig(tiny_checkpoint, dtype=dtype, device="cuda"))
    together = generate(model, PROMPTS)
    alone = [generate(model, [prompt])[0] for prompt in PROMPTS]
    # cuBLAS may pick another kernel for another batch size: the bits may differ, the tokens may not.
    assert_same(together, alone, atol=1e-5 if dtype == "float32" else BF16_LOGPROB_ATOL)


@pytest.fixture(scope="module")
def gpu_hosts(tiny_checkpoint: Path) -> Iterator[RoutingTable]:
    """Two float32 expert hosts on the GPU, each serving half of every layer's experts: their routing table."""
    config = ModelConfig.from_json(tiny_checkpoint / "config.json")
    halves = [[(layer, e) for layer in range(config.num_hidden_layers) for e in range(config.num_local_experts)
               if e % 2 == half] for half in range(2)]
    servers = []
    for half, entries in enumerate(halves):
        shard = load_shard(Checkpoint(tiny_checkpoint, config), entries, torch.float32, "cuda")
        servicer = ExpertServiceServicer(shard, config, f"gpu-{half}", torch.float32, torch.device("cuda"))
        servers.append(ServingThread.start(servicer, ExpertServerConfig()))
    routes = {entry: (f"127.0.0.1:{server.port}",) for server, entries in zip(servers, halves, strict=True)
              for entry in entries}
    yield RoutingTable(1, routes)
    for server in servers:
        server.stop(grace_s=0)


@pytest.mark.parametrize("router_device", ["cpu", "cuda"])
def test_expert_hosts_on_cuda_generate_the_tokens_of_the_local_model(router_device: str, gpu_hosts: RoutingTable,
                                                                     tiny_checkpoint: Path) -> None:
    # The cluster backend's data path with GPU hosts (Ray only places them): rows leave the router's device,
    # cross gRPC as bytes, are computed on the GPU and come back.
    config = ModelConfig.from_json(tiny_checkpoint / "config.json")
    backend = RemoteExperts(lambda refresh: gpu_hosts, config.num_local_experts, DispatchConfig())
    try:
        remote = Mixtral.load(Checkpoint(tiny_checkpoint, config), DTYPES["float32"], router_device, backend)
        local = load_local_model(LocalConfig(tiny_checkpoint, dtype="float32", device="cpu"))
        assert_same(generate(remote, PROMPTS), generate(local, PROMPTS), atol=1e-4)
    finally:
        backend.close()


def test_a_stream_served_from_cuda_equals_the_engine_alone(tiny_checkpoint: Path) -> None:
    model, counting = load_counted_model(tiny_checkpoint, device="cuda")
    alone = generate(model, PROMPTS)
    with start_server(tiny_checkpoint, model=(model, counting)) as server:
        stub = server.stub()
        for prompt, want in zip(PROMPTS, alone, strict=True):
            got = merge(stub.GenerateStream(request(prompt, max_new_tokens=GREEDY.max_new_tokens), timeout=60))
            assert list(got.token_ids) == want.token_ids
            torch.testing.assert_close(torch.tensor(list(got.logprobs)), torch.tensor(want.logprobs), atol=1e-5,
                                       rtol=0)
        server.wait_idle()
