"""ExpertService over real gRPC on loopback: results match the local math, bad requests get actionable statuses.

The host serves layer 0 experts 0 and 2 and layer 1 expert 1 of the tiny checkpoint (hidden 64, 4 experts,
top-2) in float32 on the CPU.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from experts.service import ExpertServerConfig, ExpertServiceServicer, ServingThread
from experts.weights import ExpertShard, load_shard
from mixtral.checkpoint import Checkpoint
from mixtral.config import ModelConfig
from mixtral.expert import ExpertWeights, LayerExperts, group_by_expert, moe_combine
from mixtral.linear import Layout
from protos import expert_pb2, expert_pb2_grpc
from protos.tensors import from_message, to_message

HOSTED = [(0, 0), (0, 2), (1, 1)]
HOST_ID = "host-a"
DEADLINE_S = 10.0
D, E = 64, 4
# Clients need their own receive limit raised for answers over gRPC's default 4 MiB.
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]


@dataclass(frozen=True)
class Host:
    shard: ExpertShard
    model: ModelConfig
    stub: expert_pb2_grpc.ExpertServiceStub
    channel: grpc.Channel


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> ModelConfig:
    return ModelConfig.from_json(tiny_checkpoint / "config.json")


@pytest.fixture(scope="module")
def shard(tiny_checkpoint: Path, model: ModelConfig) -> ExpertShard:
    return load_shard(Checkpoint(tiny_checkpoint, model), HOSTED, torch.float32)


@pytest.fixture(scope="module")
def serve(shard: ExpertShard, model: ModelConfig) -> Iterator[Callable[[ExpertServerConfig], Host]]:
    """serve(cfg) -> a Host on a fresh server; every server and channel is closed at the end of the module."""
    started: list[tuple[ServingThread, grpc.Channel]] = []

    def start(cfg: ExpertServerConfig) -> Host:
        servicer = ExpertServiceServicer(shard, model, HOST_ID, torch.float32, torch.device("cpu"))
        serving = ServingThread.start(servicer, cfg)
        channel = grpc.insecure_channel(f"127.0.0.1:{serving.port}", options=CLIENT_OPTIONS)
        started.append((serving, channel))
        return Host(shard, model, expert_pb2_grpc.ExpertServiceStub(channel), channel)

    yield start
    for serving, channel in started:
        channel.close()
        serving.stop(grace_s=0)


@pytest.fixture(scope="module")
def host(serve: Callable[[ExpertServerConfig], Host]) -> Host:
    return serve(ExpertServerConfig())


def routing(rows: int, choices: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random hidden [T, D] float32, expert ids [T, 2] int32 drawn from `choices` (-1 allowed), weights [T, 2]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, D, generator=gen)
    pick = torch.randint(0, len(choices), (rows, 2), generator=gen)
    expert_ids = torch.tensor(choices, dtype=torch.int32)[pick]
    weights = torch.softmax(torch.randn(rows, 2, generator=gen), dim=-1)
    return hidden, expert_ids, weights


def request(layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
            ) -> expert_pb2.DispatchRequest:
    return expert_pb2.DispatchRequest(layer=layer, hidden=to_message(hidden), expert_ids=to_message(expert_ids),
                                      weights=to_message(weights))


def local_answer(host: Host, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
                 ) -> torch.Tensor:
    return moe_combine(hidden, group_by_expert(expert_ids, weights, E), host.shard.layer(layer))


def dispatch(host: Host, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
             ) -> torch.Tensor:
    answer = host.stub.Dispatch(request(layer, hidden, expert_ids, weights), timeout=DEADLINE_S)
    return from_message(answer.output)


def assert_dispatch_matches_local(host: Host, layer: int, rows: int, choices: list[int]) -> None:
    hidden, expert_ids, weights = routing(rows, choices)

    output = dispatch(host, layer, hidden, expert_ids, weights)

    torch.testing.assert_close(output, local_answer(host, layer, hidden, expert_ids, weights), rtol=0, atol=1e-6)


def test_dispatch_equals_the_local_combine_including_slots_served_elsewhere(host: Host) -> None:
    hidden, _, weights = routing(5, [0])
    expert_ids = torch.tensor([[0, 2], [2, -1], [-1, 0], [-1, -1], [2, 0]], dtype=torch.int32)

    output = dispatch(host, 0, hidden, expert_ids, weights)

    torch.testing.assert_close(output, local_answer(host, 0, hidden, expert_ids, weights), rtol=0, atol=1e-6)
    assert torch.equal(output[3], torch.zeros(D))  # no slot of row 3 is served here
    assert_dispatch_matches_local(host, 1, 7, [1, -1])


def test_an_empty_batch_gets_an_empty_answer(host: Host) -> None:
    output = dispatch(host, 0, torch.empty(0, D), torch.empty(0, 2, dtype=torch.int32), torch.empty(0, 2))

    assert output.shape == (0, D) and output.dtype == torch.float32


def describe(host: Host) -> expert_pb2.HostInfo:
    return host.stub.Describe(expert_pb2.DescribeRequest(), timeout=DEADLINE_S)


def rows_served(info: expert_pb2.HostInfo) -> dict[tuple[int, int], int]:
    return {(e.layer, e.expert): e.rows_served for e in info.experts}


def test_describe_reports_the_shard_and_counts_the_rows_each_expert_served(host: Host) -> None:
    before = rows_served(describe(host))
    expert_ids = torch.tensor([[0, 2], [2, -1], [2, 0]], dtype=torch.int32)
    dispatch(host, 0, torch.randn(3, D), expert_ids, torch.full((3, 2), 0.5))
    dispatch(host, 1, torch.randn(2, D), torch.tensor([[1, -1], [-1, 1]], dtype=torch.int32), torch.ones(2, 2))

    info = describe(host)

    assert (info.host_id, info.dtype, info.device, info.hidden_size) == (HOST_ID, "float32", "cpu", D)
    assert info.expert_bytes == host.shard.num_bytes
    after = rows_served(info)
    assert sorted(after) == HOSTED
    assert {key: after[key] - before[key] for key in HOSTED} == {(0, 0): 2, (0, 2): 3, (1, 1): 2}


def test_the_health_service_reports_serving(host: Host) -> None:
    health = health_pb2_grpc.HealthStub(host.channel)

    for service in ("", "moe.expert.v1.ExpertService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def valid() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(3, D), torch.tensor([[0, 2], [2, -1], [0, -1]], dtype=torch.int32), torch.full((3, 2), 0.5)


def unknown_layer() -> expert_pb2.DispatchRequest:
    return request(2, *valid())


def expert_not_hosted() -> expert_pb2.DispatchRequest:
    hidden, _, weights = valid()
    return request(1, hidden, torch.tensor([[1, 3], [0, -1], [1, -1]], dtype=torch.int32), weights)


def bfloat16_hidden() -> expert_pb2.DispatchRequest:
    hidden, expert_ids, weights = valid()
    return request(0, hidden.bfloat16(), expert_ids, weights)


def truncated_hidden() -> expert_pb2.DispatchRequest:
    message = request(0, *valid())
    message.hidden.data = message.hidden.data[:-4]
    return message


def narrow_hidden() -> expert_pb2.DispatchRequest:
    _, expert_ids, weights = valid()
    return request(0, torch.randn(3, 32), expert_ids, weights)


def expert_out_of_range() -> expert_pb2.DispatchRequest:
    hidden, _, weights = valid()
    return request(0, hidden, torch.tensor([[0, 4], [-2, -1], [0, -1]], dtype=torch.int32), weights)


def rows_mismatch() -> expert_pb2.DispatchRequest:
    _, expert_ids, weights = valid()
    return request(0, torch.randn(4, D), expert_ids, weights)


def too_many_slots() -> expert_pb2.DispatchRequest:
    hidden, _, _ = valid()
    return request(0, hidden, torch.zeros(3, 3, dtype=torch.int32), torch.ones(3, 3))


def float16_weights() -> expert_pb2.DispatchRequest:
    hidden, expert_ids, weights = valid()
    return request(0, hidden, expert_ids, weights.half())


def no_hidden() -> expert_pb2.DispatchRequest:
    message = request(0, *valid())
    message.ClearField("hidden")
    return message


INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("make", "code", "words"), [
    (unknown_layer, INVALID, ["layer 2", "0..1"]),
    (expert_not_hosted, grpc.StatusCode.FAILED_PRECONDITION, ["'host-a'", "layer 1", "[0, 3]", "serves experts [1]"]),
    (bfloat16_hidden, INVALID, ["bfloat16", "serves float32"]),
    (truncated_hidden, INVALID, ["hidden", "'float32'", "[3, 64]", "764 data bytes", "768 bytes"]),
    (narrow_hidden, INVALID, ["hidden", "[3, 32]", "[T, 64]"]),
    (expert_out_of_range, INVALID, ["[-2, 4]", "[-1, 4)"]),
    (rows_mismatch, INVALID, ["expert_ids", "[3, 2]", "[4, K]", "T = 4"]),
    (too_many_slots, INVALID, ["expert_ids", "[3, 3]", "K <= 2"]),
    (float16_weights, INVALID, ["weights", "float16", "float32"]),
    (no_hidden, INVALID, ["hidden", "dtype ''", "unknown dtype"]),
], ids=lambda v: getattr(v, "__name__", None))
def test_a_bad_request_gets_its_status_and_the_server_keeps_serving(
        host: Host, make: Callable[[], expert_pb2.DispatchRequest], code: grpc.StatusCode, words: list[str]) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        host.stub.Dispatch(make(), timeout=DEADLINE_S)

    assert caught.value.code() == code, caught.value.details()
    for word in words:
        assert word in caught.value.details()
    assert_dispatch_matches_local(host, 0, 4, [0, 2, -1])


def test_a_dispatch_stream_answers_each_request_in_order_as_dispatch_would(host: Host) -> None:
    batches = [(0, *routing(5, [0, 2, -1], seed=1)), (1, *routing(3, [1, -1], seed=2)), (0, *routing(0, [0])),
               (0, *routing(9, [2, 0], seed=3))]

    answers = list(host.stub.DispatchStream(iter([request(*batch) for batch in batches]), timeout=DEADLINE_S))

    assert len(answers) == len(batches)
    for answer, batch in zip(answers, batches, strict=True):
        assert torch.equal(from_message(answer.output), dispatch(host, *batch))


def test_a_refused_request_ends_the_stream_with_its_status_after_the_answers_before_it(host: Host) -> None:
    good = (0, *routing(4, [0, 2], seed=4))
    answers = []

    with pytest.raises(grpc.RpcError) as caught:
        for answer in host.stub.DispatchStream(iter([request(*good), expert_not_hosted(), request(*good)]),
                                               timeout=DEADLINE_S):
            answers.append(answer)

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    assert "does not serve layer 1" in caught.value.details()
    assert len(answers) == 1 and torch.equal(from_message(answers[0].output), dispatch(host, *good))
    assert_dispatch_matches_local(host, 0, 4, [0, 2, -1])


def test_a_batch_over_grpcs_default_4_mib_passes_under_the_configured_limit(host: Host) -> None:
    rows = 20_000  # 20000 x 64 float32 = 5.1 MB each way

    assert_dispatch_matches_local(host, 0, rows, [0, 2, -1])


def test_a_request_over_the_configured_limit_is_refused(serve: Callable[[ExpertServerConfig], Host]) -> None:
    small = serve(ExpertServerConfig(max_message_bytes=2**20))
    hidden, expert_ids, weights = routing(5_000, [0, 2])  # 1.3 MB

    with pytest.raises(grpc.RpcError) as caught:
        dispatch(small, 0, hidden, expert_ids, weights)

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_dispatch_matches_local(small, 0, 1_000, [0, 2])  # 256 kB still fits


def test_a_stopped_server_refuses_calls(shard: ExpertShard, model: ModelConfig) -> None:
    servicer = ExpertServiceServicer(shard, model, HOST_ID, torch.float32, torch.device("cpu"))
    serving = ServingThread.start(servicer, ExpertServerConfig(grace_s=0.5))
    with grpc.insecure_channel(f"127.0.0.1:{serving.port}") as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        assert stub.Describe(expert_pb2.DescribeRequest(), timeout=DEADLINE_S).host_id == HOST_ID

        serving.stop()
        serving.stop()  # a second stop is a no-op

        with pytest.raises(grpc.RpcError) as caught:
            stub.Describe(expert_pb2.DescribeRequest(), timeout=DEADLINE_S)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_stopping_server_ends_an_open_stream_at_its_next_request(shard: ExpertShard, model: ModelConfig) -> None:
    """Within the grace period calls in flight finish, but the next request on a stream opened before
    the stop is refused with UNAVAILABLE at once, so the router moves those rows to another replica."""
    servicer = ExpertServiceServicer(shard, model, HOST_ID, torch.float32, torch.device("cpu"))
    serving = ServingThread.start(servicer, ExpertServerConfig(grace_s=30))
    requests: queue.SimpleQueue[expert_pb2.DispatchRequest | None] = queue.SimpleQueue()
    batch = (0, *routing(3, [0, 2]))
    with grpc.insecure_channel(f"127.0.0.1:{serving.port}") as channel:
        answers = expert_pb2_grpc.ExpertServiceStub(channel).DispatchStream(iter(requests.get, None))
        requests.put(request(*batch))
        first = next(answers)
        stopping = threading.Thread(target=serving.stop)
        stopping.start()
        while not servicer.stopping:  # stop() marks the servicer before it waits out the grace period
            time.sleep(0.01)
        requests.put(request(*batch))

        with pytest.raises(grpc.RpcError) as caught:
            next(answers)
        requests.put(None)
    stopping.join()

    layer, hidden, expert_ids, weights = batch
    expected = moe_combine(hidden, group_by_expert(expert_ids, weights, E), shard.layer(layer))
    torch.testing.assert_close(from_message(first.output), expected, rtol=0, atol=1e-6)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "'host-a' is stopping" in caught.value.details()


@pytest.mark.parametrize(("field", "value"), [("max_message_bytes", 0), ("max_message_bytes", 2**31),
                                              ("grace_s", -1.0), ("grace_s", float("nan"))])
def test_a_bad_server_config_names_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{field}={value}"):
        ExpertServerConfig(**{field: value})


def test_a_bf16_host_serves_its_experts_laid_out_for_the_cpu(tiny_checkpoint: Path, model: ModelConfig) -> None:
    checkpoint = Checkpoint(tiny_checkpoint, model)
    laid_out = load_shard(checkpoint, HOSTED, torch.bfloat16)
    fp32 = load_shard(checkpoint, HOSTED, torch.float32)
    plain = LayerExperts.stack({e: ExpertWeights(w.plain().w13.bfloat16(), w.plain().w2.bfloat16())
                                for e, w in fp32.layer(0).items()})
    layout = Layout.for_weight(plain.w13[0])
    assert layout is not Layout.PLAIN and {w.layout for w in laid_out.experts.values()} == {layout}
    assert laid_out.num_bytes * 2 == fp32.num_bytes
    hidden, expert_ids, weights = routing(9, [0, 2, -1])
    hidden = hidden.bfloat16()
    serving = ServingThread.start(ExpertServiceServicer(laid_out, model, HOST_ID, torch.bfloat16,
                                                        torch.device("cpu")), ExpertServerConfig())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{serving.port}", options=CLIENT_OPTIONS) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            answer = stub.Dispatch(request(0, hidden, expert_ids, weights), timeout=DEADLINE_S)
            described = stub.Describe(expert_pb2.DescribeRequest())
    finally:
        serving.stop(grace_s=0)

    groups = group_by_expert(expert_ids, weights, E)
    output = from_message(answer.output)
    assert torch.equal(output, moe_combine(hidden, groups, laid_out.layer(0)))
    want = moe_combine(hidden, groups, plain)  # torch's F.linear on the plain weights
    torch.testing.assert_close(output.float(), want.float(), rtol=0.02, atol=0.02 * float(want.abs().max()))
    assert sorted((e.layer, e.expert) for e in described.experts) == HOSTED
    assert described.expert_bytes == laid_out.num_bytes


def test_a_shard_in_another_dtype_is_refused(tiny_checkpoint: Path, model: ModelConfig) -> None:
    bf16 = load_shard(Checkpoint(tiny_checkpoint, model), [(0, 1)], torch.bfloat16)

    with pytest.raises(ValueError, match=r"layer 0, expert 1.*torch\.bfloat16"):
        ExpertServiceServicer(bf16, model, HOST_ID, torch.float32, torch.device("cpu"))
