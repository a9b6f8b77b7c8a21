"""The public API (moe.v1) under operations: overload, cancel and deadline, SIGTERM, health, reflection,
metrics and request logs, request ids. Each test that needs other limits, slow steps or a process of
its own starts its own server; the others share the module server of conftest.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster.deploy import LocalConfig, build_engine, load_local_model
from mixtral.block import Experts
from protos import router_pb2, router_pb2_grpc
from router.api import ApiLimits, ServerConfig
from router.engine import Completion, EngineConfig
from router.kv_cache import CacheConfig
from router.sampler import SamplingParams
from router.scheduler import SchedulerConfig
from tests.router.served import (
    CODE,
    FINISH,
    LIMITS,
    SLOTS,
    assert_logprobs_close,
    assert_same_completion,
)
from tests.serving import (
    ServeProcess,
    ServerHandle,
    SlowExperts,
    merge,
    request,
    rpc_error,
    start_server,
    stream_parts,
    wait_for,
)

# --- overload -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    answer: router_pb2.GenerateResponse | None
    details: str
    trailers: dict[str, str]
    elapsed_s: float


async def _burst(address: str, reqs: list[router_pb2.GenerateRequest], deadline_s: float) -> list[Outcome]:
    channels = [grpc.aio.insecure_channel(address) for _ in range(8)]
    try:
        stubs = [router_pb2_grpc.GenerationStub(c) for c in channels]

        async def one(i: int, req: router_pb2.GenerateRequest) -> Outcome:
            stub = stubs[i % len(stubs)]
            started = time.monotonic()
            try:
                if i % 2:
                    answer = merge([part async for part in stub.GenerateStream(req, timeout=deadline_s)])
                else:
                    answer = await stub.Generate(req, timeout=deadline_s)
                return Outcome(CODE.OK, answer, "", {}, time.monotonic() - started)
            except grpc.aio.AioRpcError as err:
                trailers = {k: v for k, v in (err.trailing_metadata() or ())}
                return Outcome(err.code(), None, err.details() or "", trailers, time.monotonic() - started)

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs))))
    finally:
        for channel in channels:
            await channel.close()


@pytest.mark.slow
def test_overload_answers_in_full_or_resource_exhausted_and_leaves_the_server_idle(tiny_checkpoint: Path) -> None:
    deadline_s = 30.0
    prompts = [[1, 330, 2033, 349], [1, 22557, 28808], [1, 415, 5565, 302, 4843, 349, 5465], [1, 5, 6, 7, 8]]
    reqs = [request(prompts[i % 4], max_new_tokens=16) for i in range(200)]
    with start_server(tiny_checkpoint, server=ServerConfig(limits=LIMITS), scheduler=SchedulerConfig(max_queue=16),
                      cache=CacheConfig(num_slots=4, max_seq_len=128)) as srv:
        stub = srv.stub()
        alone = [stub.Generate(request(p, max_new_tokens=16), timeout=30) for p in prompts]
        started = time.monotonic()
        outcomes = asyncio.run(_burst(srv.address, reqs, deadline_s))
        burst_s = time.monotonic() - started
        srv.wait_idle(timeout=2.0)  # no leaked sequence, queue entry or cache slot
        assert srv.scheduler.num_running == 0 and srv.scheduler.num_waiting == 0
        assert srv.cache.num_free == 4 and not srv.scheduler.engine.running
        text = generate_latest(srv.served.metrics.registry).decode()

    codes = [o.code for o in outcomes]
    assert set(codes) <= {CODE.OK, CODE.RESOURCE_EXHAUSTED}, {c for c in codes if c not in (CODE.OK,
                                                                                          CODE.RESOURCE_EXHAUSTED)}
    ok = [o for o in outcomes if o.code == CODE.OK]
    refused = [o for o in outcomes if o.code == CODE.RESOURCE_EXHAUSTED]
    # A refusal needs 4 running + 16 waiting first, and every one of those is answered.
    assert len(ok) >= 20 and refused, (len(ok), len(refused))
    for i, outcome in enumerate(outcomes):
        assert outcome.elapsed_s < deadline_s, f"request {i} took {outcome.elapsed_s:.1f} s"
        if outcome.code == CODE.OK:
            assert outcome.answer is not None
            assert_same_completion(outcome.answer, alone[i % 4], f"request {i}")
        else:
            assert re.fullmatch(r"the server's queue is full \(\d+ requests waiting\); retry in \d+\.\d s",
                                outcome.details), outcome.details
            assert float(outcome.trailers["retry-after-s"]) >= 0.1
    assert burst_s < deadline_s
    assert metric(text, "moe_requests_total", status="RESOURCE_EXHAUSTED") == len(refused)
    assert metric(text, "moe_requests_total", status="OK") == len(ok) + len(alone)


# --- cancel and deadline ---------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@pytest.mark.slow
def test_cancel_and_deadline_free_the_slot_within_a_step_and_leave_other_streams_unchanged(
        tiny_checkpoint: Path, alone_engine: Callable[[list[int], SamplingParams], Completion]) -> None:
    slow: list[SlowExperts] = []

    def wrap(experts: Experts) -> Experts:
        slow.append(SlowExperts(experts, delay_s=0.01))  # >= 20 ms a step: 200 tokens last >= 4 s
        return slow[0]

    others = [([1, 330, 2033, 349], dict(max_new_tokens=200, temperature=0.0)),
              ([1, 22557, 28808], dict(max_new_tokens=200, temperature=0.0)),
              ([1, 415, 5565, 302, 4843], dict(max_new_tokens=200, temperature=0.0))]
    expected = [alone_engine(p, SamplingParams(ignore_eos=True, **kw)) for p, kw in others]  # type: ignore[arg-type]
    limits = ApiLimits(max_prompt_tokens=64, max_new_tokens_cap=256)
    with start_server(tiny_checkpoint, server=ServerConfig(limits=limits), wrap=wrap,
                      cache=CacheConfig(num_slots=SLOTS, max_seq_len=320)) as srv:
        steps = slow[0]
        registry = srv.served.metrics.registry
        results: list[Any] = [None] * len(others)

        def run_other(i: int) -> None:
            prompt, kw = others[i]
            results[i] = stream_parts(srv.stub(), request(prompt, **kw), timeout=60)  # type: ignore[arg-type]

        threads = [threading.Thread(target=run_other, args=(i,)) for i in range(len(others))]
        for t in threads:
            t.start()
        wait_for(lambda: srv.scheduler.num_running == 3, 10, "the other streams start")

        # Cancel: the client goes away after 3 tokens; its slot is free a step or two later.
        before = set(srv.scheduler.running)
        call = srv.stub().GenerateStream(request([1, 5, 6, 7], max_new_tokens=250), timeout=60)
        received = [next(call) for _ in range(3)]
        assert all(len(p.token_ids) == 1 for p in received)
        (victim,) = set(srv.scheduler.running) - before  # the scheduler's key of the request
        at_cancel = steps.steps
        call.cancel()
        wait_for(lambda: victim not in srv.scheduler.running, 5, "the cancelled request leaves the batch")
        # The step in flight when the client cancels, one or two while the cancel travels (>= 20 ms each),
        # then the slot is freed before the next step.
        assert steps.steps - at_cancel <= 4, f"freed {steps.steps - at_cancel} steps after the cancel"
        assert srv.scheduler.num_running == 3 and srv.cache.num_free == SLOTS - 3

        # Deadline: a request whose 0.5 s deadline passes mid-stream gets DEADLINE_EXCEEDED; its slot is freed.
        late = srv.stub().GenerateStream(request([1, 8, 9], max_new_tokens=250), timeout=0.5)
        late_parts = [next(late)]
        (expiring,) = set(srv.scheduler.running) - before
        with pytest.raises(grpc.RpcError) as expired:
            for part in late:
                late_parts.append(part)
        at_deadline = steps.steps
        assert expired.value.code() == CODE.DEADLINE_EXCEEDED
        assert len(late_parts) < 250  # it was streaming when the deadline passed
        wait_for(lambda: expiring not in srv.scheduler.running, 5, "the expired request leaves the batch")
        assert steps.steps - at_deadline <= 4, f"freed {steps.steps - at_deadline} steps after the deadline"
        assert srv.scheduler.num_running == 3 and srv.cache.num_free == SLOTS - 3

        # The gauges (refreshed each second) show the freed slots while the other streams still run.
        wait_for(lambda: metric(generate_latest(registry).decode(), "moe_running_sequences") == 3
                 and metric(generate_latest(registry).decode(), "moe_kv_cache_free_slots") == SLOTS - 3,
                 3, "the gauges show 3 running sequences")
        assert srv.scheduler.num_running == 3, "the other streams ended too soon to see the gauges"

        for t in threads:
            t.join(60)
        srv.wait_idle()
        wait_for(lambda: metric(generate_latest(registry).decode(), "moe_running_sequences") == 0
                 and metric(generate_latest(registry).decode(), "moe_kv_cache_free_slots") == SLOTS,
                 3, "the gauges show an idle server")

    for parts, want in zip(results, expected):
        whole = merge(parts)
        assert list(whole.token_ids) == want.token_ids
        assert_logprobs_close(list(whole.logprobs), want.logprobs, long=True)
        assert whole.finish_reason == FINISH.FINISH_REASON_LENGTH


# --- SIGTERM -------------------------------------------------------------------------------------------


def health_status(channel: grpc.Channel, service: str = "") -> int:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(answer.status)


@pytest.mark.slow
def test_sigterm_finishes_running_requests_refuses_new_ones_and_exits_0(tiny_checkpoint: Path) -> None:
    prompts = [[1, 330, 2033, 349], [1, 22557, 28808], [1, 415, 5565, 302, 4843], [1, 5, 6, 7, 8, 9]]
    new_tokens = 400
    model = load_local_model(LocalConfig(tiny_checkpoint, dtype="float32", device="cpu"))
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    expected = build_engine(model, CacheConfig(num_slots=4, max_seq_len=512), EngineConfig()).generate(
        prompts, [greedy] * len(prompts))
    args = ["--model", tiny_checkpoint, "--port", 0, "--metrics-port", 0, "--dtype", "float32", "--device", "cpu",
            "--max-prompt-tokens", 64, "--max-new-tokens-cap", 512, "--max-running", 8, "--grace-period", 30]
    with ServeProcess(args) as proc:
        assert proc.host == "127.0.0.1" and proc.name == tiny_checkpoint.name
        channel = grpc.insecure_channel(proc.address)
        stub = router_pb2_grpc.GenerationStub(channel)
        streams = [stub.GenerateStream(request(p, max_new_tokens=new_tokens), timeout=60) for p in prompts]
        firsts = [next(s) for s in streams]  # every request is generating
        assert all(len(f.token_ids) == 1 for f in firsts)
        ends: list[float] = [0.0] * len(streams)
        rests: list[Any] = [None] * len(streams)

        def finish(i: int) -> None:
            try:
                rests[i] = list(streams[i])
            except grpc.RpcError as err:
                rests[i] = err
            ends[i] = time.monotonic()

        readers = [threading.Thread(target=finish, args=(i,)) for i in range(len(streams))]
        for r in readers:
            r.start()
        proc.terminate()
        wait_for(lambda: health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 10,
                 "health turns NOT_SERVING on SIGTERM")
        time.sleep(0.1)  # the drain starts right after health turns
        refused = rpc_error(lambda: stub.Generate(request([1, 5, 6], max_new_tokens=2), timeout=10))
        refused_at = time.monotonic()
        for r in readers:
            r.join(60)
        code = proc.wait(60)
        after_exit = rpc_error(lambda: stub.Generate(request([1, 5, 6], max_new_tokens=2), timeout=5))
        channel.close()

    # While running requests were still streaming, a new one was refused with UNAVAILABLE.
    assert refused.code() == CODE.UNAVAILABLE
    assert refused.details() == "the server is shutting down; retry on another replica"
    assert refused_at < min(ends), "the running requests had already finished when the new one was refused"
    # Every running request finished in full.
    for first, rest, want in zip(firsts, rests, expected):
        assert not isinstance(rest, BaseException), rest
        whole = merge([first, *rest])
        assert whole.finish_reason == FINISH.FINISH_REASON_LENGTH
        assert list(whole.token_ids) == want.token_ids
    assert code == 0, "".join(proc.stderr)
    # Once the process is gone, the port is closed: UNAVAILABLE from the client's failed connection.
    assert after_exit.code() == CODE.UNAVAILABLE
    assert re.search(r"failed to connect|Connection refused", after_exit.details()), after_exit.details()


# --- health, reflection ----------------------------------------------------------------------------------


def test_health_reports_serving_and_follows_the_expert_check(tiny_checkpoint: Path, server: ServerHandle) -> None:
    channel = server.channel()
    for service in ("", "moe.v1.Generation"):
        wait_for(lambda s=service: health_status(channel, s) == health_pb2.HealthCheckResponse.SERVING, 5,  # type: ignore[misc]
                 f"health of {service!r} is SERVING")
    # SERVING only while every expert has a live host: the watcher follows is_healthy within its interval.
    healthy = [True]
    with start_server(tiny_checkpoint, is_healthy=lambda: healthy[0]) as srv:
        watched = srv.channel()
        wait_for(lambda: health_status(watched) == health_pb2.HealthCheckResponse.SERVING, 5, "SERVING at start")
        healthy[0] = False
        wait_for(lambda: health_status(watched) == health_pb2.HealthCheckResponse.NOT_SERVING, 5,
                 "NOT_SERVING when an expert has no live host")
        assert health_status(watched, "moe.v1.Generation") == health_pb2.HealthCheckResponse.NOT_SERVING
        healthy[0] = True
        wait_for(lambda: health_status(watched) == health_pb2.HealthCheckResponse.SERVING, 5, "SERVING again")


def test_reflection_lists_the_services_and_describes_generation(server: ServerHandle) -> None:
    database = ProtoReflectionDescriptorDatabase(server.channel())
    services = set(database.get_services())
    assert {"moe.v1.Generation", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    file = database.FindFileContainingSymbol("moe.v1.Generation")
    service = next(s for s in file.service if s.name == "Generation")
    assert {m.name for m in service.method} == {"Generate", "GenerateStream", "Tokenize", "ModelInfo"}
    stream = next(m for m in service.method if m.name == "GenerateStream")
    assert stream.server_streaming and stream.input_type == ".moe.v1.GenerateRequest"


# --- metrics and logs ---------------------------------------------------------------------------------------

SECRET_PROMPT = "zebra quartz lantern"


def test_metrics_count_requests_tokens_latencies_and_expert_rows_and_logs_hold_no_text(
        tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router.api")
    with start_server(tiny_checkpoint, server=ServerConfig(limits=LIMITS)) as srv:
        stub = srv.stub()
        prompts = [srv.tokenizer.encode(SECRET_PROMPT), [1, 330, 2033, 349], [1, 22557]]
        news = [5, 9, 3]
        answers = [stub.Generate(request(SECRET_PROMPT, max_new_tokens=news[0], request_id="r0"))]
        answers += [merge(stub.GenerateStream(request(p, max_new_tokens=n, request_id=f"r{i + 1}")))
                    for i, (p, n) in enumerate(zip(prompts[1:], news[1:]))]
        for bad in (request(""), request([1, 5], max_new_tokens=65)):
            rpc_error(lambda b=bad: stub.Generate(b))  # type: ignore[misc]
        srv.wait_idle()
        registry = srv.served.metrics.registry
        fed = sum(len(p) + n - 1 for p, n in zip(prompts, news))  # the last token of each is never fed back
        # The watcher copies the expert counts into the gauges once a second.
        wait_for(lambda: sum(metric(generate_latest(registry).decode(), "moe_expert_rows", layer="0", expert=str(e))
                             for e in range(4)) == 2 * fed, 3, "moe_expert_rows catches up")
        text = generate_latest(registry).decode()
        counted = srv.counting.rows.clone()

    assert [len(a.token_ids) for a in answers] == news
    assert metric(text, "moe_requests_total", status="OK") == 3
    assert metric(text, "moe_requests_total", status="INVALID_ARGUMENT") == 1
    assert metric(text, "moe_requests_total", status="OUT_OF_RANGE") == 1
    assert metric(text, "moe_generated_tokens_total") == sum(news)
    assert metric(text, "moe_time_to_first_token_seconds_count") == 3
    assert metric(text, "moe_inter_token_latency_seconds_count") == sum(n - 1 for n in news)
    assert metric(text, "moe_time_to_first_token_seconds_bucket", le="+Inf") == 3
    assert metric(text, "moe_queue_depth") == 0
    # Rows per (layer, expert): each fed token goes to top-2 experts in every layer.
    for layer in range(2):
        rows = [metric(text, "moe_expert_rows", layer=str(layer), expert=str(e)) for e in range(4)]
        assert rows == counted[layer].tolist()
        assert sum(rows) == 2 * fed and sum(r > 0 for r in rows) >= 2
    # One log line per request, without prompt or completion text.
    lines = [r.getMessage() for r in caplog.records if r.name == "router.api"]
    for request_id in ("r0", "r1", "r2"):
        assert sum(f"id={request_id} " in line for line in lines) == 1, lines
    logged = "\n".join(lines) + caplog.text
    assert SECRET_PROMPT not in logged and "zebra" not in logged
    for answer in answers:
        assert len(answer.text) < 10 or answer.text not in logged
    assert SECRET_PROMPT not in text  # nor in the metrics


def test_log_content_puts_the_prompt_in_the_request_log(tiny_checkpoint: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router.api")
    with start_server(tiny_checkpoint, server=ServerConfig(log_content=True)) as srv:
        srv.stub().Generate(request(SECRET_PROMPT, max_new_tokens=4, request_id="logged"))
    line = next(r.getMessage() for r in caplog.records if "id=logged " in r.getMessage())
    assert f"prompt={SECRET_PROMPT!r}" in line


def test_log_content_puts_the_completion_in_the_request_log(tiny_checkpoint: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router.api")
    with start_server(tiny_checkpoint, server=ServerConfig(log_content=True)) as srv:
        answer = srv.stub().Generate(request(SECRET_PROMPT, max_new_tokens=4, request_id="logged"))
    line = next(r.getMessage() for r in caplog.records if "id=logged " in r.getMessage())
    assert answer.text and f"completion={answer.text!r}" in line


# --- request ids, and regressions of bugs found here ------------------------------------------------------


def test_two_clients_using_the_same_request_id_each_get_their_own_answer(tiny_checkpoint: Path) -> None:
    # The request id is the client's: two clients may send the same one at once (the scheduler once keyed
    # its requests by it, mixing their tokens and killing the engine thread; its own server, in case).
    with start_server(tiny_checkpoint, grace_s=1.0) as srv:
        stub = srv.stub()
        prompts = [[1, 330, 2033, 349], [1, 22557, 28808]]
        alone = [stub.Generate(request(p, max_new_tokens=40), timeout=10) for p in prompts]
        barrier = threading.Barrier(2)
        got: list[Any] = [None, None]

        def client(i: int) -> None:
            barrier.wait()
            try:
                got[i] = srv.stub().Generate(request(prompts[i], max_new_tokens=40, request_id="same"), timeout=3)
            except grpc.RpcError as err:
                got[i] = err

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        for i in range(2):
            assert isinstance(got[i], router_pb2.GenerateResponse), got[i]
            assert list(got[i].token_ids) == list(alone[i].token_ids)
            assert got[i].request_id == "same"
        after = stub.Generate(request(prompts[0], max_new_tokens=40), timeout=3)
        assert list(after.token_ids) == list(alone[0].token_ids)


def test_a_tiny_temperature_neither_fails_nor_disturbs_the_batch(tiny_checkpoint: Path) -> None:
    with start_server(tiny_checkpoint, grace_s=1.0) as srv:
        stub = srv.stub()
        alone = stub.Generate(request([1, 330, 2033, 349], max_new_tokens=60), timeout=10)
        other: list[Any] = [None]

        def run_other() -> None:
            try:
                other[0] = merge(stub.GenerateStream(request([1, 330, 2033, 349], max_new_tokens=60), timeout=10))
            except grpc.RpcError as err:
                other[0] = err

        thread = threading.Thread(target=run_other)
        thread.start()
        wait_for(lambda: srv.scheduler.num_running == 1, 5, "the other request runs")
        try:
            tiny = stub.Generate(request([1, 5], max_new_tokens=4, temperature=1e-40, seed=1), timeout=10)
            code = CODE.OK
        except grpc.RpcError as err:
            code, tiny = err.code(), None
        thread.join(10)
        assert code in (CODE.OK, CODE.INVALID_ARGUMENT), code
        assert tiny is None or len(tiny.token_ids) == 4
        assert isinstance(other[0], router_pb2.GenerateResponse), other[0]
        assert list(other[0].token_ids) == list(alone.token_ids)


def test_a_warmed_up_server_counts_no_warm_up_rows_and_answers_as_a_cold_one(tiny_checkpoint: Path,
                                                                             server: ServerHandle) -> None:
    # On a GPU the server runs one full-size step before it listens (ServeConfig.warm_up, forced here): its
    # rows are no one's expert load, and its cache slots and memory are free again for the first request.
    prompt = [1, 330, 2033, 349]
    with start_server(tiny_checkpoint, cache=CacheConfig(num_slots=4, max_seq_len=64), warm_up=True) as warm:
        assert int(warm.counting.snapshot().sum()) == 0 and warm.idle()
        got = warm.stub().Generate(request(prompt, max_new_tokens=8), timeout=10)
        rows = warm.counting.snapshot()  # each of the 4 + 7 forward tokens, at its k experts, in every layer
        assert rows.sum(1).tolist() == [(len(prompt) + 7) * 2] * rows.shape[0]
    assert_same_completion(got, server.stub().Generate(request(prompt, max_new_tokens=8), timeout=10), "warmed up")
