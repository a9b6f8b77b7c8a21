"""The gRPC client behind `moe-cluster generate --server HOST:PORT`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from protos import router_pb2, router_pb2_grpc
from router.api import merge_response
from router.sampler import SamplingParams
from router.tokenizer import ChatMessage

FINISH_NAMES = {router_pb2.FINISH_REASON_LENGTH: "length", router_pb2.FINISH_REASON_STOP: "stop",
                router_pb2.FINISH_REASON_CANCELLED: "cancelled"}


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How to reach a server: address, optional TLS (with a client certificate for mTLS) and token."""

    server: str
    ca_cert: Path | None = None  # PEM bundle that signed the server's certificate: enables TLS
    client_cert: Path | None = None
    client_key: Path | None = None
    auth_token: str | None = None
    timeout_s: float = 600.0


def open_channel(cfg: ClientConfig) -> grpc.Channel:
    if cfg.ca_cert is None:
        return grpc.insecure_channel(cfg.server)
    key = cfg.client_key.read_bytes() if cfg.client_key else None
    cert = cfg.client_cert.read_bytes() if cfg.client_cert else None
    credentials = grpc.ssl_channel_credentials(cfg.ca_cert.read_bytes(), key, cert)
    return grpc.secure_channel(cfg.server, credentials)


def build_request(params: SamplingParams, *, text: str | None = None, token_ids: Sequence[int] | None = None,
                  chat: Sequence[ChatMessage] | None = None, stop: Sequence[str] = ()) -> router_pb2.GenerateRequest:
    """A GenerateRequest asking for logprobs, from the same fields as a local run."""
    sampling = router_pb2.SamplingParameters(temperature=params.temperature, top_p=params.top_p)
    if params.top_k is not None:
        sampling.top_k = params.top_k
    if params.seed is not None:
        sampling.seed = params.seed
    request = router_pb2.GenerateRequest(sampling=sampling, max_new_tokens=params.max_new_tokens, stop=list(stop),
                                         stop_token_ids=list(params.stop_token_ids), return_logprobs=True,
                                         ignore_eos=params.ignore_eos)
    if token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    elif chat is not None:
        request.chat.messages.extend(router_pb2.ChatMessage(role=m.role, content=m.content) for m in chat)
    else:
        request.text = text or ""
    return request


def generate(cfg: ClientConfig, request: router_pb2.GenerateRequest, stream: bool,
             on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Call the server; returns the result in the JSON shape of the local `generate --json`."""
    metadata = [("authorization", f"Bearer {cfg.auth_token}")] if cfg.auth_token else None
    with open_channel(cfg) as channel:
        stub = router_pb2_grpc.GenerationStub(channel)
        if not stream:
            return _result(stub.Generate(request, timeout=cfg.timeout_s, metadata=metadata))
        whole = router_pb2.GenerateResponse()
        for part in stub.GenerateStream(request, timeout=cfg.timeout_s, metadata=metadata):
            if on_text is not None and part.text:
                on_text(part.text)
            merge_response(whole, part)
        return _result(whole)


def _result(response: router_pb2.GenerateResponse) -> dict[str, Any]:
    return {
        "token_ids": list(response.token_ids), "text": response.text, "logprobs": list(response.logprobs),
        "finish_reason": FINISH_NAMES.get(response.finish_reason, "unknown"), "request_id": response.request_id,
        "usage": {"prompt_tokens": response.usage.prompt_tokens,
                  "completion_tokens": response.usage.completion_tokens},
        "timings": {"first_token_s": round(response.timings.first_token_s, 4),
                    "total_s": round(response.timings.total_s, 4)},
    }
