"""The ExpertService gRPC server: runs one host's experts on the rows the router sends it.

Shapes: T rows in a request, D hidden, K expert slots per row, L layers, E experts per layer.
Requests are validated here and only here: each problem becomes a gRPC status whose message names
the offending values. Hidden states and token data are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NoReturn

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from torch import Tensor

from experts.weights import ExpertShard
from mixtral.config import ModelConfig
from mixtral.expert import ExpertWeights, moe_forward
from protos import expert_pb2, expert_pb2_grpc, tensors
from protos.keepalive import accept_pings_option, check_seconds
from protos.security import DispatchTls

log = logging.getLogger(__name__)

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name
_MAX_GRPC_MESSAGE_BYTES = 2**31 - 1  # gRPC stores the limit in a C int


@dataclass(frozen=True, slots=True)
class ExpertServerConfig:
    # gRPC's default 4 MiB receive limit is exactly one bf16 batch of 512 x 4096: framing pushes it over.
    max_message_bytes: int = 256 * 2**20  # largest request or response, bytes
    grace_s: float = 5.0  # seconds in-flight calls may finish after stop; match the pod's termination grace
    tls: DispatchTls | None = None  # None: plaintext (inside a trusted network)
    # Routers ping idle connections (router.dispatch.DispatchConfig.keepalive_s, 20 s); gRPC's default
    # refuses pings more often than every 5 minutes with a GOAWAY, which would end every open stream.
    min_ping_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.max_message_bytes <= _MAX_GRPC_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes={self.max_message_bytes} must be in [1, {_MAX_GRPC_MESSAGE_BYTES}]")
        if not (math.isfinite(self.grace_s) and self.grace_s >= 0):
            raise ValueError(f"grace_s={self.grace_s} must be a finite number of seconds >= 0")
        check_seconds("min_ping_interval_s", self.min_ping_interval_s)


class _Rejected(Exception):
    """A request this host will not run, with the status code the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class _Batch:
    layer: int
    hidden: Tensor  # [T, D] serving dtype, CPU
    expert_ids: Tensor  # [T, K] int32
    weights: Tensor  # [T, K] float32


class ExpertServiceServicer(expert_pb2_grpc.ExpertServiceServicer):
    """Serves the (layer, expert) pairs of one shard; Dispatch runs on one worker thread, off the event loop."""

    def __init__(self, shard: ExpertShard, model: ModelConfig, host_id: str, dtype: torch.dtype,
                 device: torch.device, threads: int | None = None) -> None:
        """`threads`: torch threads of the worker that computes (None: the process's setting). Give it
        when the caller loaded the shard on one thread: only one thread should run parallel torch ops,
        as a second OpenMP team makes libgomp's workers sleep between ops."""
        _check_shard(shard, model, dtype)
        self._shard, self._model, self._host_id, self._dtype = shard, model, host_id, dtype
        self._device = _indexed(device)
        self._rows_served = torch.zeros(model.num_hidden_layers, model.num_local_experts, dtype=torch.int64)  # [L, E]
        self._stopping = False
        # One thread: torch parallelises inside each op; the loop stays free for Describe and health.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"expert-{host_id}",
                                          initializer=lambda: _size_torch_pool(threads))

    async def Dispatch(self, request: expert_pb2.DispatchRequest, context: grpc.aio.ServicerContext
                       ) -> expert_pb2.DispatchResponse:
        return await self._dispatch(request, context)

    async def DispatchStream(self, requests: AsyncIterator[expert_pb2.DispatchRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[expert_pb2.DispatchResponse]:
        """Dispatch for each request of the stream, in order; a refused request ends the stream with its status.

        Once the host is stopping, the next request ends the stream with UNAVAILABLE, as a new call
        would be refused, so the router sends those rows to another replica at once.
        """
        async for request in requests:
            if self._stopping:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"host {self._host_id!r} is stopping: send its rows to another replica")
            yield await self._dispatch(request, context)

    async def _dispatch(self, request: expert_pb2.DispatchRequest, context: grpc.aio.ServicerContext
                        ) -> expert_pb2.DispatchResponse:
        shard = self._shard  # one snapshot per call: a re-placement swaps in a new shard between calls
        try:
            batch = self._decode(request, shard)
        except _Rejected as err:
            log.info("Dispatch rejected (%s): %s", err.code.name, err)
            await context.abort(err.code, str(err))
            raise  # unreachable: abort raises
        response, counts = await asyncio.get_running_loop().run_in_executor(self._worker, self._compute, batch,
                                                                            shard)
        self._rows_served[batch.layer] += torch.tensor(counts)  # on the loop thread, like Describe's read
        return response

    async def Describe(self, request: expert_pb2.DescribeRequest, context: grpc.aio.ServicerContext
                       ) -> expert_pb2.HostInfo:
        rows, shard = self._rows_served, self._shard
        experts = [expert_pb2.HostedExpert(layer=layer, expert=expert, rows_served=int(rows[layer, expert]))
                   for layer, expert in sorted(shard.experts)]
        return expert_pb2.HostInfo(host_id=self._host_id, experts=experts, dtype=tensors.dtype_name(self._dtype),
                                   device=str(self._device), expert_bytes=shard.num_bytes,
                                   hidden_size=self._model.hidden_size)

    def replace_shard(self, shard: ExpertShard) -> None:
        """Serve `shard` from the next call on (calls in flight finish on the one they started with)."""
        _check_shard(shard, self._model, self._dtype)
        self._shard = shard

    @property
    def shard(self) -> ExpertShard:
        return self._shard

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop_streams(self) -> None:
        """Refuse the next request of every open DispatchStream (called when the server begins to stop)."""
        self._stopping = True

    def close(self) -> None:
        """Stop the worker thread once the server no longer calls Dispatch."""
        self._worker.shutdown(wait=True)

    def _compute(self, batch: _Batch, shard: ExpertShard) -> tuple[expert_pb2.DispatchResponse, list[int]]:
        """[T, D] rows -> the encoded [T, D] output and rows computed per expert [E]; runs on the worker thread."""
        ids, weights = batch.expert_ids.to(self._device), batch.weights.to(self._device)
        output, counts = moe_forward(batch.hidden.to(self._device), ids, weights, shard.layer(batch.layer),
                                     self._model.num_local_experts)
        return expert_pb2.DispatchResponse(output=tensors.to_message(output.cpu())), counts

    def _decode(self, request: expert_pb2.DispatchRequest, shard: ExpertShard) -> _Batch:
        num_layers = self._model.num_hidden_layers
        if request.layer >= num_layers:
            raise _Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                            f"layer {request.layer} does not exist: the model has layers 0..{num_layers - 1}")
        batch = _Batch(request.layer, _decoded("hidden", request.hidden), _decoded("expert_ids", request.expert_ids),
                       _decoded("weights", request.weights))
        self._check_hidden(batch.hidden)
        experts = self._check_routing(batch)
        _check_hosted(shard, self._host_id, batch.layer, experts)
        return batch

    def _check_hidden(self, hidden: Tensor) -> None:
        width = self._model.hidden_size
        if hidden.dim() != 2 or hidden.shape[1] != width:
            _invalid(f"hidden has shape {list(hidden.shape)}, expected [T, {width}] (hidden_size {width})")
        if hidden.dtype != self._dtype:
            _invalid(f"hidden has dtype {tensors.dtype_name(hidden.dtype)}, this host serves "
                     f"{tensors.dtype_name(self._dtype)}")

    def _check_routing(self, batch: _Batch) -> set[int]:
        """Shapes and dtypes of the routing tensors, and their ids in range; returns the distinct ids."""
        rows, top_k, num_experts = batch.hidden.shape[0], self._model.num_experts_per_tok, self._model.num_local_experts
        ids, weights = batch.expert_ids, batch.weights
        if ids.dtype != torch.int32 or ids.dim() != 2 or ids.shape[0] != rows or not 1 <= ids.shape[1] <= top_k:
            _invalid(f"expert_ids has dtype {tensors.dtype_name(ids.dtype)} and shape {list(ids.shape)}, expected "
                     f"int32 [{rows}, K] (T = {rows} hidden rows, 1 <= K <= {top_k})")
        if weights.dtype != torch.float32 or weights.shape != ids.shape:
            _invalid(f"weights has dtype {tensors.dtype_name(weights.dtype)} and shape {list(weights.shape)}, "
                     f"expected float32 {list(ids.shape)} (the shape of expert_ids)")
        present = set(ids.flatten().tolist())  # in Python: a few torch ops cost more at decode's 64 ids
        bad = sorted(e for e in present if not -1 <= e < num_experts)
        if bad:
            _invalid(f"expert_ids holds {bad}, outside [-1, {num_experts})")
        return present



def _decoded(field: str, message: expert_pb2.Tensor) -> Tensor:
    try:
        return tensors.from_message(message)
    except tensors.TensorFormatError as err:
        raise _Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {err}") from None


def _invalid(message: str) -> NoReturn:
    raise _Rejected(grpc.StatusCode.INVALID_ARGUMENT, message)


def _size_torch_pool(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _check_hosted(shard: ExpertShard, host_id: str, layer: int, experts: set[int]) -> None:
    # FAILED_PRECONDITION: the router's routing table is stale (a re-placement moved the expert);
    # it refreshes the table and sends the rows to a host that serves them.
    hosted = shard.layer(layer)
    missing = sorted(experts - {-1} - hosted.keys())
    if missing:
        raise _Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                        f"host {host_id!r} does not serve layer {layer} expert(s) {missing}; "
                        f"for layer {layer} it serves experts {sorted(hosted)}")


def _check_shard(shard: ExpertShard, model: ModelConfig, dtype: torch.dtype) -> None:
    for (layer, expert), weights in shard.experts.items():
        if not (0 <= layer < model.num_hidden_layers and 0 <= expert < model.num_local_experts):
            raise ValueError(f"shard entry (layer {layer}, expert {expert}) is outside the model's "
                             f"{model.num_hidden_layers} layers x {model.num_local_experts} experts")
        if _dtypes(weights) != {dtype}:
            raise ValueError(f"shard entry (layer {layer}, expert {expert}) has weights in {_dtypes(weights)}, "
                             f"the host serves {dtype}: load the shard in the serving dtype")


def _dtypes(weights: ExpertWeights) -> set[torch.dtype]:
    return {weights.w13.dtype, weights.w2.dtype}


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:N (the current device), so Describe reports the card in use."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


async def start_server(servicer: ExpertServiceServicer, cfg: ExpertServerConfig, address: str = "127.0.0.1",
                       port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Serve ExpertService and grpc.health.v1.Health on address:port (0: any free port) -> (server, bound port)."""
    options = [("grpc.max_send_message_length", cfg.max_message_bytes),
               ("grpc.max_receive_message_length", cfg.max_message_bytes),
               accept_pings_option(cfg.min_ping_interval_s),
               ("grpc.keepalive_permit_without_calls", 1)]
    server = grpc.aio.server(options=options)
    expert_pb2_grpc.add_ExpertServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host = f"[{address}]" if ":" in address else address  # IPv6 literals need brackets
    if cfg.tls is None:
        bound_port = server.add_insecure_port(f"{host}:{port}")
    else:  # mutual TLS: routers present a certificate signed by the same internal CA
        credentials = grpc.ssl_server_credentials([(cfg.tls.private_key, cfg.tls.cert_chain)],
                                                  root_certificates=cfg.tls.ca, require_client_auth=True)
        bound_port = server.add_secure_port(f"{host}:{port}", credentials)
    await server.start()
    for service in (health.OVERALL_HEALTH, SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("ExpertService listening on %s:%d", host, bound_port)
    return server, bound_port


class ServingThread:
    """An asyncio event loop in a daemon thread serving one ExpertService, for callers that are not async."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, server: grpc.aio.Server,
                 port: int, servicer: ExpertServiceServicer, cfg: ExpertServerConfig) -> None:
        self._loop, self._thread, self._server = loop, thread, server
        self._servicer, self._cfg = servicer, cfg
        self.port = port

    @classmethod
    def start(cls, servicer: ExpertServiceServicer, cfg: ExpertServerConfig, address: str = "127.0.0.1",
              port: int = 0) -> ServingThread:
        """Start the loop and the server; returns once the port is bound."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_run_loop, args=(loop,), name="expert-service", daemon=True)
        thread.start()
        try:
            server, bound_port = asyncio.run_coroutine_threadsafe(
                start_server(servicer, cfg, address, port), loop).result()
        except BaseException:
            _stop_loop(loop, thread)
            raise
        return cls(loop, thread, server, bound_port, servicer, cfg)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop the server (in-flight calls get grace_s, default cfg.grace_s), then the loop, thread and worker."""
        if self._loop.is_closed():
            return
        grace = self._cfg.grace_s if grace_s is None else grace_s
        self._servicer.stop_streams()
        asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result()
        _stop_loop(self._loop, self._thread)
        self._servicer.close()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
