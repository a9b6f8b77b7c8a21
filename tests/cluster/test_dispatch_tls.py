"""Mutual TLS on the internal expert-dispatch channel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from cluster.deploy import LocalConfig, load_cluster_model, load_local_model
from experts.service import ExpertServerConfig, ExpertServiceServicer, ServingThread
from experts.weights import load_shard
from mixtral.checkpoint import Checkpoint
from mixtral.config import ModelConfig
from protos import expert_pb2, expert_pb2_grpc
from protos.security import DispatchTls
from router.expert_client import ExpertClient
from tests.certs import make_ca, make_leaf
from tests.cluster.test_cluster_backend import cluster_config, generate
from tests.raynodes import RayNodes

SERVER_NAME = "moe-expert-host"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tls")
    ca, ca_cert, ca_key = make_ca()
    (root / "ca.crt").write_bytes(ca.cert)
    cert, key = make_leaf(ca_cert, ca_key, "expert", dns=(SERVER_NAME,), ips=()).write(root, "expert")
    return cert, key, root / "ca.crt"


@pytest.fixture(scope="module")
def tls_host(tiny_checkpoint: Path, tls_files: tuple[Path, Path, Path]) -> Iterator[ServingThread]:
    config = ModelConfig.from_json(tiny_checkpoint / "config.json")
    shard = load_shard(Checkpoint(tiny_checkpoint, config), [(0, 0)], torch.float32)
    servicer = ExpertServiceServicer(shard, config, "tls-host", torch.float32, torch.device("cpu"))
    server = ServingThread.start(servicer, ExpertServerConfig(tls=DispatchTls.from_files(*tls_files)))
    yield server
    server.stop(0)


def describe(channel: grpc.Channel) -> expert_pb2.HostInfo:
    return expert_pb2_grpc.ExpertServiceStub(channel).Describe(expert_pb2.DescribeRequest(), timeout=5)


def test_a_host_with_tls_answers_a_router_with_a_certificate_of_its_ca(tls_host: ServingThread,
                                                                      tls_files: tuple[Path, Path, Path]) -> None:
    client = ExpertClient(f"127.0.0.1:{tls_host.port}", 2**20, DispatchTls.from_files(*tls_files))
    hidden, ids = torch.randn(3, 64), torch.zeros(3, 1, dtype=torch.int32)
    answer = ExpertClient.output(client.dispatch(0, hidden, ids, torch.ones(3, 1), 5).result())
    assert answer.shape == (3, 64)
    client.close()


def test_a_host_with_tls_refuses_plaintext_and_foreign_certificates(tls_host: ServingThread,
                                                                    tmp_path: Path) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{tls_host.port}") as channel, pytest.raises(grpc.RpcError) as plain:
        describe(channel)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    other_ca, other_cert, other_key = make_ca("another-ca")
    stranger = make_leaf(other_cert, other_key, "stranger", dns=(SERVER_NAME,), ips=())
    credentials = grpc.ssl_channel_credentials(other_ca.cert, stranger.key, stranger.cert)
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    with grpc.secure_channel(f"127.0.0.1:{tls_host.port}", credentials, options) as channel, \
            pytest.raises(grpc.RpcError) as foreign:
        describe(channel)
    assert foreign.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_cluster_backend_over_mutual_tls_reproduces_the_local_run(
        ray_cluster: RayNodes, tiny_checkpoint: Path, tls_files: tuple[Path, Path, Path]) -> None:
    expected = generate(load_local_model(LocalConfig(tiny_checkpoint, dtype="float32", device="cpu")))
    cfg = cluster_config(tiny_checkpoint, 2, 1, dispatch_tls=tls_files)
    model, cluster = load_cluster_model(cfg)
    with cluster:
        got = generate(model)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
