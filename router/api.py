"""The public gRPC API (moe.v1.Generation): requests in, validated, scheduled, streamed back.

Statuses are chosen here and only here: INVALID_ARGUMENT for a malformed request, OUT_OF_RANGE for
a prompt or max_new_tokens over the server's limits, RESOURCE_EXHAUSTED (with a retry hint) when the
queue is full, UNAVAILABLE while draining or when no host of a needed expert answered,
DEADLINE_EXCEEDED, CANCELLED. A client that goes away frees its sequence's slot within one step.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import router_pb2, router_pb2_grpc
from protos.keepalive import accept_pings_option, check_seconds, ping_options
from router.auth import BearerTokenInterceptor
from router.detokenizer import Detokenizer
from router.engine import RequestError
from router.metrics import Metrics
from router.sampler import SamplingParams
from router.scheduler import DrainingError, Event, Finished, QueueFullError, Request, Scheduler, Token
from router.tokenizer import ChatMessage, Tokenizer, TokenizerError

log = logging.getLogger(__name__)

FINISH_REASONS = {"length": router_pb2.FINISH_REASON_LENGTH, "stop": router_pb2.FINISH_REASON_STOP,
                  "cancelled": router_pb2.FINISH_REASON_CANCELLED}


class RequestRejected(Exception):
    """A request answered with a status instead of tokens."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_s = code, message, retry_after_s


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """What one request may ask for."""

    max_prompt_tokens: int = 4096
    max_new_tokens_cap: int = 2048
    default_max_new_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_new_tokens_cap", "default_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")


@dataclass(frozen=True, slots=True)
class Guardrail:
    """Mistral's safe_prompt: a system prompt prepended to chats that ask for it (or all, by default)."""

    prompt: str = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
                   "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness "
                   "and positivity.")
    default_on: bool = False

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("the guardrail prompt is empty: give the system prompt text")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request: prompt ids, sampling, stop strings, whether to return logprobs."""

    request_id: str  # the client's id (or one we made), echoed back
    key: str  # unique among running requests, whatever ids clients send
    prompt: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    logprobs: bool


class RequestStream:
    """Events of one scheduled request, handed from the engine thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def sink(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class GenerationService(router_pb2_grpc.GenerationServicer):
    """moe.v1.Generation over a Scheduler."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, info: router_pb2.ModelInfoResponse,
                 limits: ApiLimits, metrics: Metrics, guardrail: Guardrail | None = None,
                 log_content: bool = False) -> None:
        self.scheduler, self.tokenizer, self.info, self.limits = scheduler, tokenizer, info, limits
        self.metrics, self.guardrail, self.log_content = metrics, guardrail or Guardrail(), log_content

    async def Generate(self, request: router_pb2.GenerateRequest, context: Any) -> router_pb2.GenerateResponse:
        whole = router_pb2.GenerateResponse()
        try:
            async for part in self.run(request, context.time_remaining()):
                merge_response(whole, part)
        except RequestRejected as err:
            await _abort(context, err)
        return whole

    async def GenerateStream(self, request: router_pb2.GenerateRequest, context: Any
                             ) -> AsyncIterator[router_pb2.GenerateResponse]:
        try:
            async for part in self.run(request, context.time_remaining()):
                yield part
        except RequestRejected as err:
            await _abort(context, err)

    async def Tokenize(self, request: router_pb2.TokenizeRequest, context: Any) -> router_pb2.TokenizeResponse:
        try:
            ids = self._tokenize(request, safe_prompt=False)
        except RequestRejected as err:
            await context.abort(err.code, err.message)
        return router_pb2.TokenizeResponse(token_ids=ids)

    async def ModelInfo(self, request: router_pb2.ModelInfoRequest, context: Any) -> router_pb2.ModelInfoResponse:
        return self.info

    async def run(self, request: router_pb2.GenerateRequest, time_remaining: float | None
                  ) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Validate, schedule and stream one request: each step's new tokens, then a final message with the
        finish reason, usage and timings. Raises RequestRejected with the status to answer instead.
        Used by every protocol front end (moe.v1 here, KServe v2 in router.kserve)."""
        arrived = time.monotonic()
        try:
            prepared = self.prepare(request)
            stream = self._submit(prepared, time_remaining, arrived)
        except RequestRejected as err:
            self.metrics.requests.labels(status=err.code.name).inc()
            raise
        async for part in self._responses(prepared, stream, arrived):
            yield part

    def prepare(self, request: router_pb2.GenerateRequest) -> Prepared:
        """Validate and convert a request; RequestRejected names what is wrong."""
        prompt = self._prompt(request)
        max_new = request.max_new_tokens if request.HasField("max_new_tokens") else min(
            self.limits.default_max_new_tokens, self.limits.max_new_tokens_cap)
        if max_new > self.limits.max_new_tokens_cap:
            raise RequestRejected(grpc.StatusCode.OUT_OF_RANGE, f"max_new_tokens={max_new} is over the server's "
                                  f"cap of {self.limits.max_new_tokens_cap}")
        sampling = request.sampling
        try:
            params = SamplingParams(
                max_new_tokens=max_new,
                temperature=sampling.temperature if sampling.HasField("temperature") else 1.0,
                top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
                top_k=sampling.top_k if sampling.HasField("top_k") else None,
                seed=sampling.seed if sampling.HasField("seed") else None,
                stop_token_ids=tuple(request.stop_token_ids), ignore_eos=request.ignore_eos)
        except ValueError as err:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        key = uuid.uuid4().hex
        return Prepared(request.request_id or key, key, prompt, params, tuple(request.stop), request.return_logprobs)

    def _prompt(self, request: router_pb2.GenerateRequest) -> list[int]:
        safe = request.safe_prompt if request.HasField("safe_prompt") else self.guardrail.default_on
        if request.WhichOneof("prompt") == "token_ids":
            ids = list(request.token_ids.ids)
        else:
            ids = self._tokenize(request, safe_prompt=safe)
        if not ids:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty: give text, chat "
                                  "messages or token ids")
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestRejected(grpc.StatusCode.OUT_OF_RANGE, f"the prompt has {len(ids)} tokens, more than the "
                                  f"server's limit of {self.limits.max_prompt_tokens}")
        return ids

    def _tokenize(self, request: Any, safe_prompt: bool) -> list[int]:
        kind = request.WhichOneof("prompt")
        try:
            if kind == "text":
                return self.tokenizer.encode(request.text) if request.text else []
            if kind == "chat":
                messages = [ChatMessage(m.role, m.content) for m in request.chat.messages]
                if safe_prompt:
                    messages = [ChatMessage("system", self.guardrail.prompt), *messages]
                return self.tokenizer.encode_chat(messages)
        except TokenizerError as err:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "no prompt: set text, chat or token_ids")

    def _submit(self, prepared: Prepared, time_remaining: float | None, arrived: float) -> RequestStream:
        stream = RequestStream(asyncio.get_running_loop())
        deadline = None if time_remaining is None else arrived + time_remaining
        scheduled = Request(prepared.key, prepared.prompt, prepared.params, stream.sink, deadline, arrived)
        try:
            self.scheduler.submit(scheduled)
        except RequestError as err:
            code = grpc.StatusCode.OUT_OF_RANGE if "exceeds" in str(err) else grpc.StatusCode.INVALID_ARGUMENT
            raise RequestRejected(code, str(err)) from None
        except QueueFullError as err:
            raise RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), err.retry_after_s) from None
        except DrainingError as err:
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, str(err)) from None
        return stream

    async def _responses(self, prepared: Prepared, stream: RequestStream, arrived: float
                         ) -> AsyncIterator[router_pb2.GenerateResponse]:
        detok = Detokenizer(self.tokenizer, prepared.stop)
        progress = _Progress(arrived)
        done = False
        try:
            while not done:
                event = await stream.queue.get()
                if isinstance(event, Token):
                    part = self._on_token(prepared, detok, event, progress)
                    if part is not None:
                        yield part
                    continue
                done = True
                yield self._on_finish(prepared, detok, event, progress)
        finally:
            if not done:  # the client cancelled or went away: free the slot
                self.scheduler.finish(prepared.key, "cancelled")
                self._log(prepared, "cancelled", progress)

    def _on_token(self, prepared: Prepared, detok: Detokenizer, event: Token, progress: _Progress
                  ) -> router_pb2.GenerateResponse | None:
        if detok.stopped:
            return None  # a stop string ended the text; the finish is on its way
        progress.token(self.metrics)
        delta = detok.add(event.token_id)
        if detok.stopped:
            self.scheduler.finish(prepared.key, "stop")
        return router_pb2.GenerateResponse(request_id=prepared.request_id, token_ids=[event.token_id], text=delta,
                                           logprobs=[event.logprob] if prepared.logprobs else [])

    def _on_finish(self, prepared: Prepared, detok: Detokenizer, event: Finished, progress: _Progress
                   ) -> router_pb2.GenerateResponse:
        tail = detok.flush()
        progress.completion = detok.text
        reason = "stop" if detok.stopped and event.reason in ("length", "stop") else event.reason
        self._log(prepared, reason, progress)
        if event.reason == "deadline":
            self.metrics.requests.labels(status="DEADLINE_EXCEEDED").inc()
            raise RequestRejected(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        if event.reason == "error":
            self.metrics.requests.labels(status="UNAVAILABLE").inc()
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, f"generation failed: {event.error}")
        self.metrics.requests.labels(status="OK").inc()
        now = time.monotonic()
        return router_pb2.GenerateResponse(
            request_id=prepared.request_id, text=tail, finish_reason=FINISH_REASONS[reason],
            usage=router_pb2.Usage(prompt_tokens=len(prepared.prompt), completion_tokens=progress.tokens),
            timings=router_pb2.Timings(first_token_s=progress.first_token_s, total_s=now - progress.arrived))

    def _log(self, prepared: Prepared, reason: str, progress: _Progress) -> None:
        # Prompts and completions stay out of logs unless the operator turned --log-content on.
        content = ""
        if self.log_content:
            content = f" prompt={self.tokenizer.decode(prepared.prompt)!r} completion={progress.completion!r}"
        log.info("request id=%s prompt_tokens=%d completion_tokens=%d finish=%s ttft_s=%.3f total_s=%.3f%s",
                 prepared.request_id, len(prepared.prompt), progress.tokens, reason, progress.first_token_s,
                 time.monotonic() - progress.arrived, content)


def merge_response(whole: router_pb2.GenerateResponse, part: router_pb2.GenerateResponse) -> None:
    """Fold one streamed message into the whole completion."""
    whole.request_id = part.request_id
    whole.token_ids.extend(part.token_ids)
    whole.text += part.text
    whole.logprobs.extend(part.logprobs)
    if part.finish_reason:
        whole.finish_reason = part.finish_reason
        whole.usage.CopyFrom(part.usage)
        whole.timings.CopyFrom(part.timings)


async def _abort(context: Any, err: RequestRejected) -> None:
    if err.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-s", f"{err.retry_after_s:.1f}"),))
    await context.abort(err.code, err.message)


class _Progress:
    """Token count and latencies of one request, fed into the histograms."""

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.tokens = 0
        self.first_token_s = 0.0
        self.completion = ""  # the text, kept only for --log-content
        self._last: float | None = None

    def token(self, metrics: Metrics) -> None:
        now = time.monotonic()
        if self._last is None:
            self.first_token_s = now - self.arrived
            metrics.time_to_first_token.observe(self.first_token_s)
        else:
            metrics.inter_token_latency.observe(now - self._last)
        self._last = now
        self.tokens += 1
        metrics.generated_tokens.inc()


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Server certificate and key (PEM); with client_ca, clients must present a certificate it signed."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where and how the public API listens."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    max_message_bytes: int = 16 * 2**20
    tls: TlsConfig | None = None
    auth_token: str | None = None  # None: no authentication
    limits: ApiLimits = ApiLimits()
    guardrail: Guardrail = Guardrail()
    log_content: bool = False
    # Clients may ping a connection this often while no data flows (a request waiting in the queue, or an
    # idle channel). gRPC's default, 5 minutes, answers faster pings with a GOAWAY "too_many_pings" that
    # ends every request on the connection; clients commonly set keepalive at 10-60 s.
    client_ping_interval_s: float = 10.0
    # The server pings a connection after keepalive_s without traffic and closes it when no answer comes
    # within keepalive_timeout_s: a client that vanished without closing (a dropped network path) has its
    # requests cancelled and their slots freed then, instead of after the OS's TCP timeout (minutes to hours).
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in 0-65535")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes={self.max_message_bytes} must be at least 1024")
        for name in ("client_ping_interval_s", "keepalive_s", "keepalive_timeout_s"):
            check_seconds(name, getattr(self, name))


@dataclass
class PublicServer:
    """The running public server and the handles its owner needs."""

    server: grpc.aio.Server
    port: int
    health: Any  # grpc_health.v1.health.aio.HealthServicer
    service_names: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)


async def build_server(generation: GenerationService, cfg: ServerConfig,
                       extra: tuple[tuple[Any, str], ...] = ()) -> PublicServer:
    """Start the public server: moe.v1.Generation, any `extra` (adder, service name) pairs, health and
    reflection, with TLS and bearer-token auth as configured -> the running server and its port."""
    options = [("grpc.max_send_message_length", cfg.max_message_bytes),
               ("grpc.max_receive_message_length", cfg.max_message_bytes),
               accept_pings_option(cfg.client_ping_interval_s),
               *ping_options(cfg.keepalive_s, cfg.keepalive_timeout_s)]  # idle connections too, both ways
    interceptors = [BearerTokenInterceptor(cfg.auth_token)] if cfg.auth_token is not None else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    router_pb2_grpc.add_GenerationServicer_to_server(generation, server)
    names = [router_pb2.DESCRIPTOR.services_by_name["Generation"].full_name]
    for add, name in extra:
        add(server)
        names.append(name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, cfg)
    await server.start()
    public = PublicServer(server, port, health_servicer, tuple(names))
    await public.set_serving(False)  # SERVING once the owner says every expert is reachable
    return public


def _bind(server: grpc.aio.Server, cfg: ServerConfig) -> int:
    address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
    if cfg.tls is None:
        return int(server.add_insecure_port(address))
    credentials = grpc.ssl_server_credentials([(cfg.tls.private_key, cfg.tls.cert_chain)],
                                              root_certificates=cfg.tls.client_ca,
                                              require_client_auth=cfg.tls.client_ca is not None)
    return int(server.add_secure_port(address, credentials))
