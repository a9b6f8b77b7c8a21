"""The public API (moe.v1) over real servers on loopback ports, local backend, the tiny checkpoint in float32.

Most tests share one module server (`server`); tests that need other limits, slow steps, a broken
engine or a process of their own start their own. "Alone" means the same request served with nothing
else running: greedy results served concurrently must be identical to it (the batch never changes a
result).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
from tests.serving import (
    ServeProcess,
    ServerHandle,
    SlowExperts,
    merge,
    request,
    rpc_error,
    start_server,
    stream_parts,
)

LIMITS = ApiLimits(max_prompt_tokens=64, max_new_tokens_cap=64, default_max_new_tokens=16)
SLOTS = 8
MAX_MESSAGE_BYTES = 64 * 1024
# Logprobs near -10 (a flat random model) have a float32 spacing of about 1e-6, and a batch sums in another
# order than a lone request: measured differences reach 1.5e-5 over 24 tokens, 4e-5 over 200.
LOGPROB_ATOL, LOGPROB_RTOL = 1e-5, 2e-6
FINISH = router_pb2.FinishReason
CODE = grpc.StatusCode


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


def assert_logprobs_close(got: list[float], want: list[float], what: str = "", long: bool = False) -> None:
    scale = 4 if long else 1  # 200+ tokens: the differences grow with the KV cache
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=scale * LOGPROB_ATOL,
                               rtol=scale * LOGPROB_RTOL, msg=lambda m: f"{what}: {m}")


def assert_same_completion(got: router_pb2.GenerateResponse, want: router_pb2.GenerateResponse, what: str) -> None:
    assert list(got.token_ids) == list(want.token_ids), what
    assert_logprobs_close(list(got.logprobs), list(want.logprobs), what)
    assert got.text == want.text, what
    assert got.finish_reason == want.finish_reason, what
    assert got.usage == want.usage, what


def check_stream_shape(parts: list[router_pb2.GenerateResponse], tokenizer: Any) -> router_pb2.GenerateResponse:
    """A stream is one message per token, then a final one with finish reason and usage; its text deltas
    concatenate to the decoded tokens (so any U+FFFD is one the whole text has at that place), and no
    delta before the last ends in U+FFFD, the mark of a character whose bytes are still arriving."""
    assert parts, "an empty stream"
    *steps, last = parts
    assert all(len(p.token_ids) == 1 and not p.finish_reason for p in steps)
    assert not last.token_ids and last.finish_reason != FINISH.FINISH_REASON_UNSPECIFIED
    whole = merge(parts)
    assert last.usage.completion_tokens == len(whole.token_ids)
    assert whole.text == tokenizer.decode(list(whole.token_ids))
    assert not any(p.text.endswith("\ufffd") for p in steps)
    return whole


# --- 32 concurrent clients ---------------------------------------------------------------------------

TEXTS = ["The experts of a mixture", "Bonjour, comment ça va ?", "東京 and Kyoto 🙂", "def f(x): return x * 2",
         "Once upon a time", "1, 2, 3, 4,"]


def concurrent_requests() -> list[router_pb2.GenerateRequest]:
    """32 requests: text, chat and token-id prompts of 2-30 tokens, 4-20 new tokens, greedy (even i)
    and seeded sampling with various temperature / top_p / top_k (odd i)."""
    reqs = []
    for i in range(32):
        text = TEXTS[i % len(TEXTS)] + " word" * (i % 5)
        sampled = i % 2 == 1
        kw: dict[str, Any] = dict(max_new_tokens=4 + (i * 7) % 17, ignore_eos=not sampled or i % 4 == 1)
        if sampled:
            kw.update(temperature=(0.6, 0.9, 1.3, 2.5)[i % 4], top_p=(1.0, 0.9, 0.7)[i % 3],
                      top_k=(None, 40)[(i // 2) % 2], seed=1000 + i)
        if i % 3 == 0:
            reqs.append(request(text, **kw))
        elif i % 3 == 1:
            chat = [("system", "Be brief.")] if i % 2 else []
            reqs.append(request(chat=[*chat, ("user", text)], **kw))
        else:
            reqs.append(request([1, *range(100 + 37 * i, 100 + 37 * i + 1 + i % 11)], **kw))
    return reqs


def prompt_ids(stub: router_pb2_grpc.GenerationStub, req: router_pb2.GenerateRequest) -> list[int]:
    kind = req.WhichOneof("prompt")
    if kind == "token_ids":
        return list(req.token_ids.ids)
    tokenize = router_pb2.TokenizeRequest(text=req.text) if kind == "text" else router_pb2.TokenizeRequest(chat=req.chat)
    return list(stub.Tokenize(tokenize).token_ids)


def transformers_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: list[int]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # every token, as ignore_eos does
    return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p, n in zip(prompts, new_tokens)]


@pytest.mark.slow
def test_32_concurrent_streams_equal_each_request_alone_and_transformers(server: ServerHandle,
                                                                         tiny_checkpoint: Path) -> None:
    reqs = concurrent_requests()
    stub = server.stub()
    alone = [stub.Generate(r, timeout=60) for r in reqs]

    barrier = threading.Barrier(len(reqs))
    streams: list[list[router_pb2.GenerateResponse] | BaseException] = [[] for _ in reqs]
    peak = [0]
    done = threading.Event()

    def client(i: int) -> None:
        own = server.stub()  # one channel per client, as separate processes would have
        barrier.wait()
        try:
            streams[i] = stream_parts(own, reqs[i], timeout=60)
        except BaseException as err:  # reported below, with the request
            streams[i] = err

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.scheduler.num_running)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    watcher.join()

    assert peak[0] == SLOTS, f"the requests never filled the batch (peak {peak[0]} running)"
    for i, (req, parts, want) in enumerate(zip(reqs, streams, alone)):
        assert not isinstance(parts, BaseException), f"request {i}: {parts!r}"
        whole = check_stream_shape(parts, server.tokenizer)
        assert whole.usage.prompt_tokens == len(prompt_ids(stub, req)) == want.usage.prompt_tokens
        if req.ignore_eos:
            assert whole.finish_reason == FINISH.FINISH_REASON_LENGTH and len(whole.token_ids) == req.max_new_tokens
        if req.sampling.temperature == 0:
            assert_same_completion(whole, want, f"greedy request {i}")
        # Seeded sampling's batch invariance is checked at the engine level below (test_seeded_sampling_...).

    greedy = [i for i, r in enumerate(reqs) if r.sampling.temperature == 0]
    assert len(greedy) == 16
    expected = transformers_greedy(tiny_checkpoint, [prompt_ids(stub, reqs[i]) for i in greedy],
                                   [reqs[i].max_new_tokens for i in greedy])
    for i, tokens in zip(greedy, expected):
        assert list(alone[i].token_ids) == tokens, f"greedy request {i} differs from transformers"


@pytest.mark.slow
def test_seeded_sampling_does_not_depend_on_the_batch(tiny_checkpoint: Path) -> None:
    # Deterministic (the engine alone, fixed batches): 48 seeded requests, 24 tokens each, in batches of 8
    # versus one at a time. Served concurrently, the same happens to the sampled requests of the 32 clients.
    model = load_local_model(LocalConfig(tiny_checkpoint, dtype="float32", device="cpu"))
    g = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, 32000, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()]
               for _ in range(48)]
    params = [SamplingParams(max_new_tokens=24, temperature=(0.7, 1.0, 1.5)[i % 3], top_p=(1.0, 0.9)[i % 2],
                             seed=i, ignore_eos=True) for i in range(48)]
    alone = [build_engine(model, CacheConfig(num_slots=1, max_seq_len=64), EngineConfig()).generate([p], [sp])[0]
             for p, sp in zip(prompts, params)]
    batched = [c for start in range(0, 48, 8)
               for c in build_engine(model, CacheConfig(num_slots=8, max_seq_len=64), EngineConfig()).generate(
                   prompts[start:start + 8], params[start:start + 8])]
    differ = [i for i in range(48) if alone[i].token_ids != batched[i].token_ids]
    assert not differ, f"{len(differ)} of 48 seeded requests sample other tokens in a batch of 8: {differ}"


def test_seeded_sampling_repeats_and_the_seed_matters(server: ServerHandle) -> None:
    stub = server.stub()
    req = request([1, 330, 2033, 349], max_new_tokens=12, temperature=1.5, seed=7)
    first, second = stub.Generate(req), stub.Generate(req)
    req.sampling.seed = 8
    other = stub.Generate(req)
    assert list(first.token_ids) == list(second.token_ids)
    assert list(first.token_ids) != list(other.token_ids)


# --- text: deltas, multi-byte characters, stop strings ----------------------------------------------


def boundaries(tokenizer: Any, ids: list[int]) -> list[int]:
    """Character offsets of the text at each token boundary (decode of each prefix)."""
    return [len(tokenizer.decode(ids[:k])) for k in range(len(ids) + 1)]


@pytest.fixture(scope="module")
def base(server: ServerHandle) -> router_pb2.GenerateResponse:
    """A greedy 24-token completion without stop strings, the reference of the stop tests."""
    answer = server.stub().Generate(request([1, 415, 5565, 302, 4843], max_new_tokens=24))
    assert answer.finish_reason == FINISH.FINISH_REASON_LENGTH and len(answer.text) > 40
    return answer


def with_stop(stop: list[str], max_new_tokens: int = 24) -> router_pb2.GenerateRequest:
    return request([1, 415, 5565, 302, 4843], max_new_tokens=max_new_tokens, stop=stop)


def test_stop_string_across_a_token_boundary_cuts_the_text_and_finishes_with_stop(server: ServerHandle,
                                                                                 base: router_pb2.GenerateResponse
                                                                                 ) -> None:
    ids, text = list(base.token_ids), base.text
    bounds = boundaries(server.tokenizer, ids)
    # A stop string of 2 characters either side of a boundary in the middle, at its first occurrence.
    at = next(b for b in bounds[len(ids) // 3:] if 2 <= b <= len(text) - 2 and text.find(text[b - 2:b + 2]) == b - 2)
    stop = text[at - 2:at + 2]
    cut = text[:at - 2]
    # The token that completes the stop string is the last one generated.
    completes = next(k for k in range(1, len(ids) + 1) if stop in server.tokenizer.decode(ids[:k]))
    stub = server.stub()
    unary = stub.Generate(with_stop([stop, "never appears \u2603"]))
    parts = stream_parts(stub, with_stop([stop, "never appears \u2603"]))
    streamed = merge(parts)
    for got in (unary, streamed):
        assert got.text == cut
        assert got.finish_reason == FINISH.FINISH_REASON_STOP
        assert list(got.token_ids) == ids[:completes]
        assert got.usage.completion_tokens == completes
    released = ""
    for part in parts:  # nothing after or inside the stop string is ever streamed
        released += part.text
        assert cut.startswith(released)


def test_the_earliest_of_several_stop_strings_wins(server: ServerHandle, base: router_pb2.GenerateResponse) -> None:
    text = base.text
    early, late = text[12:15], text[30:34]
    got = server.stub().Generate(with_stop([late, early]))
    assert got.text == text[:min(text.find(early), text.find(late))]
    assert len(got.text) <= 12 and got.finish_reason == FINISH.FINISH_REASON_STOP


def test_a_stop_string_that_never_appears_changes_nothing(server: ServerHandle,
                                                          base: router_pb2.GenerateResponse) -> None:
    got = server.stub().Generate(with_stop(["\u2603 not in the text"]))
    assert_same_completion(got, base, "unused stop string")


def test_a_stop_string_completed_by_the_last_token_finishes_with_stop(server: ServerHandle,
                                                                     base: router_pb2.GenerateResponse) -> None:
    ids = list(base.token_ids)
    bounds = boundaries(server.tokenizer, ids)
    end = bounds[-1]
    stop = base.text[end - 3:end]
    assert stop in base.text[bounds[-2] - 1:] and base.text.find(stop) == end - 3
    got = server.stub().Generate(with_stop([stop]))
    assert got.text == base.text[:end - 3]
    assert got.finish_reason == FINISH.FINISH_REASON_STOP


def test_stop_token_ids_end_after_the_token(server: ServerHandle, base: router_pb2.GenerateResponse) -> None:
    ids = list(base.token_ids)
    stop_id = ids[7]
    first = ids.index(stop_id)
    req = with_stop([])
    req.stop_token_ids.append(stop_id)
    got = server.stub().Generate(req)
    assert list(got.token_ids) == ids[:first + 1]
    assert got.finish_reason == FINISH.FINISH_REASON_STOP
    assert got.text == server.tokenizer.decode(ids[:first + 1])


# --- bad input ---------------------------------------------------------------------------------------


def _no_prompt() -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(max_new_tokens=4)


def _empty_ids() -> router_pb2.GenerateRequest:
    req = router_pb2.GenerateRequest(max_new_tokens=4)
    req.token_ids.SetInParent()
    return req


def _empty_chat() -> router_pb2.GenerateRequest:
    req = router_pb2.GenerateRequest(max_new_tokens=4)
    req.chat.SetInParent()
    return req


BAD_REQUESTS: dict[str, tuple[Callable[[], router_pb2.GenerateRequest], grpc.StatusCode, str]] = {
    "empty text": (lambda: request(""), CODE.INVALID_ARGUMENT, "the prompt is empty"),
    "empty token ids": (_empty_ids, CODE.INVALID_ARGUMENT, "the prompt is empty"),
    "no prompt at all": (_no_prompt, CODE.INVALID_ARGUMENT, "no prompt: set text, chat or token_ids"),
    "prompt over the limit (ids)": (lambda: request([1] + [100] * 64), CODE.OUT_OF_RANGE,
                                    "the prompt has 65 tokens, more than the server's limit of 64"),
    "prompt over the limit (text)": (lambda: request("word " * 100), CODE.OUT_OF_RANGE,
                                     "more than the server's limit of 64"),
    "token id outside the vocabulary": (lambda: request([1, 32000]), CODE.INVALID_ARGUMENT,
                                        "token id 32000 is outside the vocabulary [0, 32000)"),
    "negative temperature": (lambda: request([1, 5], temperature=-0.5), CODE.INVALID_ARGUMENT,
                             "temperature=-0.5 must be >= 0"),
    "NaN temperature": (lambda: request([1, 5], temperature=math.nan), CODE.INVALID_ARGUMENT, "temperature=nan"),
    "top_p 0": (lambda: request([1, 5], temperature=1.0, top_p=0.0), CODE.INVALID_ARGUMENT,
                "top_p=0.0 must be in (0, 1]"),
    "top_p 1.5": (lambda: request([1, 5], temperature=1.0, top_p=1.5), CODE.INVALID_ARGUMENT,
                  "top_p=1.5 must be in (0, 1]"),
    "top_k 0": (lambda: request([1, 5], temperature=1.0, top_k=0), CODE.INVALID_ARGUMENT, "top_k=0 must be at least 1"),
    "max_new_tokens 0": (lambda: request([1, 5], max_new_tokens=0), CODE.INVALID_ARGUMENT,
                         "max_new_tokens=0 must be at least 1"),
    "max_new_tokens over the cap": (lambda: request([1, 5], max_new_tokens=65), CODE.OUT_OF_RANGE,
                                    "max_new_tokens=65 is over the server's cap of 64"),
    "unknown chat role": (lambda: request(chat=[("robot", "hi")]), CODE.INVALID_ARGUMENT,
                          "unknown chat role 'robot'; use one of system, user, assistant"),
    "chat ending with the assistant": (lambda: request(chat=[("user", "hi"), ("assistant", "yes")]),
                                       CODE.INVALID_ARGUMENT, "mistral-common rejected the chat request"),
    "empty chat": (_empty_chat, CODE.INVALID_ARGUMENT, "Conversation must have at least one message"),
    "message over the server's max size": (lambda: request("x" * (MAX_MESSAGE_BYTES + 100)),
                                           CODE.RESOURCE_EXHAUSTED, "larger than max"),
}


@pytest.fixture(scope="module")
def healthy_answer(server: ServerHandle) -> router_pb2.GenerateResponse:
    return server.stub().Generate(request([1, 330, 2033], max_new_tokens=6))


@pytest.mark.parametrize("streaming", [False, True], ids=["Generate", "GenerateStream"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_the_server_serves_the_next(server: ServerHandle, case: str, streaming: bool,
                                                                    healthy_answer: router_pb2.GenerateResponse
                                                                    ) -> None:
    make, code, message = BAD_REQUESTS[case]
    stub = server.stub()
    call = stub.GenerateStream if streaming else stub.Generate
    err = rpc_error(lambda: call(make(), timeout=30))
    assert err.code() == code, err.details()
    assert message in err.details()
    assert_same_completion(stub.Generate(request([1, 330, 2033], max_new_tokens=6), timeout=30), healthy_answer,
                           "the request after a bad one")
    server.wait_idle()


@pytest.mark.parametrize(("tokenize", "message"), [
    (router_pb2.TokenizeRequest(), "no prompt: set text, chat or token_ids"),
    (router_pb2.TokenizeRequest(chat=router_pb2.Chat(messages=[router_pb2.ChatMessage(role="robot", content="x")])),
     "unknown chat role 'robot'"),
])
def test_bad_tokenize_request_is_invalid_argument(server: ServerHandle, tokenize: router_pb2.TokenizeRequest,
                                                  message: str) -> None:
    err = rpc_error(lambda: server.stub().Tokenize(tokenize, timeout=10))
    assert err.code() == CODE.INVALID_ARGUMENT and message in err.details()


def test_model_info_describes_the_model_and_limits(server: ServerHandle) -> None:
    info = server.stub().ModelInfo(router_pb2.ModelInfoRequest(), timeout=10)
    assert (info.model_type, info.vocab_size, info.hidden_size, info.num_layers, info.num_experts,
            info.num_experts_per_token, info.dtype, info.backend) == ("mixtral", 32000, 64, 2, 4, 2, "float32", "local")
    assert (info.max_prompt_tokens, info.max_new_tokens, info.max_running, info.max_queue) == (64, 64, SLOTS, 64)
    assert info.tokenizer == "mistral-v1"


# --- random requests -----------------------------------------------------------------------------------

ROLES = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=8))
TEMPERATURES = st.floats(width=32)
PROMPTS = st.one_of(
    st.none(),
    st.text(max_size=120),
    st.lists(st.tuples(ROLES, st.text(max_size=40)), max_size=4),
    st.lists(st.integers(0, 40_000), max_size=80),
)


@st.composite
def random_requests(draw: st.DrawFn) -> router_pb2.GenerateRequest:
    prompt = draw(PROMPTS)
    req = router_pb2.GenerateRequest()
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None and prompt and isinstance(prompt[0], tuple):
        req.chat.messages.extend(router_pb2.ChatMessage(role=r, content=c) for r, c in prompt)
    elif prompt is not None:
        if prompt or draw(st.booleans()):
            req.token_ids.ids.extend(prompt)  # type: ignore[arg-type]
        else:
            req.chat.SetInParent()
    for name, values in (("temperature", TEMPERATURES), ("top_p", st.floats(width=32)),
                         ("top_k", st.integers(0, 2**32 - 1)), ("seed", st.integers(0, 2**64 - 1))):
        value = draw(st.none() | values)
        if value is not None:
            setattr(req.sampling, name, value)
    max_new = draw(st.none() | st.integers(0, 8) | st.integers(0, 2**32 - 1))
    if max_new is not None:
        req.max_new_tokens = max_new
    req.stop.extend(draw(st.lists(st.text(max_size=4), max_size=3)))
    req.stop_token_ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=3)))
    req.return_logprobs = draw(st.booleans())
    req.ignore_eos = draw(st.booleans())
    if draw(st.booleans()):
        req.safe_prompt = draw(st.booleans())
    return req


ACCEPTABLE = {CODE.OK, CODE.INVALID_ARGUMENT, CODE.OUT_OF_RANGE}


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=random_requests(), streaming=st.booleans(), request_id=st.text(max_size=12))
def test_random_requests_never_get_internal_or_unknown(server: ServerHandle, healthy_answer: router_pb2.GenerateResponse,
                                                       req: router_pb2.GenerateRequest, streaming: bool,
                                                       request_id: str) -> None:
    req.request_id = request_id  # any text, repeated across examples too: it is only echoed back
    if req.HasField("max_new_tokens") and 8 < req.max_new_tokens <= LIMITS.max_new_tokens_cap:
        req.max_new_tokens = 8  # keep it fast; the drawn values above 8 are nearly all over the cap anyway
    stub = server.stub()
    try:
        answer = merge(stub.GenerateStream(req, timeout=30)) if streaming else stub.Generate(req, timeout=30)
        code, details = CODE.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details()
    assert code in ACCEPTABLE, f"{code}: {details} for {req}"
    if code == CODE.OK:
        assert answer.finish_reason in (FINISH.FINISH_REASON_LENGTH, FINISH.FINISH_REASON_STOP)
        assert len(answer.token_ids) <= (req.max_new_tokens if req.HasField("max_new_tokens")
                                         else LIMITS.default_max_new_tokens)
        assert answer.request_id == req.request_id or (not req.request_id and len(answer.request_id) == 32)
    else:
        assert details, "an error without a message"
    assert_same_completion(stub.Generate(request([1, 330, 2033], max_new_tokens=6), timeout=30), healthy_answer,
                           "the request after a random one")


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


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.005)


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
