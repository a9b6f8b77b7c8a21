"""The public API (moe.v1) answering bad and random input: each problem gets its documented status, never
INTERNAL or UNKNOWN, and the server serves the next request. The module server of conftest.py, the tiny
checkpoint in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import router_pb2
from tests.router.served import (
    CODE,
    FINISH,
    LIMITS,
    MAX_MESSAGE_BYTES,
    SLOTS,
    assert_same_completion,
)
from tests.serving import (
    ServerHandle,
    merge,
    request,
    rpc_error,
)

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
