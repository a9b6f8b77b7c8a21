"""The cluster backend (expert hosts as Ray actors, dispatch over gRPC) reproduces the in-process run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cluster.deploy import ClusterConfig, LocalConfig, build_engine, load_cluster_model, load_local_model
from cluster.placement import HostResources
from mixtral.model import Mixtral
from router.engine import Completion, EngineConfig
from router.kv_cache import CacheConfig
from router.sampler import SamplingParams
from tests.raynodes import RayNodes

PROMPTS = [[1, 415, 5565, 302, 4843, 349, 5465, 28725, 304, 272, 5565], [1, 22557, 28808], [1, 330, 2033, 349, 264]]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
EIGHT_EXPERTS = dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_hidden_layers=3,
                     tie_word_embeddings=True)


def generate(model: Mixtral, prompts: list[list[int]] = PROMPTS, overlap: bool = False) -> list[Completion]:
    engine = build_engine(model, CacheConfig(num_slots=len(prompts), max_seq_len=64),
                          EngineConfig(overlap_microbatches=overlap))
    return engine.generate(prompts, [GREEDY] * len(prompts))


def cluster_config(model_dir: Path, hosts: int, replicas: int, **kw: object) -> ClusterConfig:
    return ClusterConfig(model_dir, num_hosts=hosts, replicas=replicas, dtype="float32", device="cpu",
                         hosts=HostResources(num_cpus=1), name=f"ctl-{hosts}-{replicas}-{id(kw)}",
                         **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("hosts", "replicas", "model", "overlap"), [
    (1, 1, "tiny", False), (2, 1, "tiny", False), (4, 1, "eight-experts", False), (2, 2, "tiny", False),
    (2, 1, "tiny", True)])
def test_cluster_backend_reproduces_the_in_process_run(ray_cluster: RayNodes, hf_checkpoint: Callable[..., Path],
                                                       tiny_checkpoint: Path, hosts: int, replicas: int,
                                                       model: str, overlap: bool) -> None:
    model_dir = tiny_checkpoint if model == "tiny" else hf_checkpoint(**EIGHT_EXPERTS)
    expected = generate(load_local_model(LocalConfig(model_dir, dtype="float32", device="cpu")))
    remote_model, cluster = load_cluster_model(cluster_config(model_dir, hosts, replicas))
    with cluster:
        got = generate(remote_model, overlap=overlap)
        info = cluster.hosts_info()
    assert len(info) == hosts
    for want, have in zip(expected, got):
        assert have.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(have.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)
