"""A persistent gRPC channel to one expert host, with the dispatch call as a future."""

from __future__ import annotations

from typing import Any

import grpc
from torch import Tensor

from protos import expert_pb2, expert_pb2_grpc
from protos.security import DispatchTls
from protos.tensors import from_message, to_message


class ExpertClient:
    """Client of one host's ExpertService; channels stay open for the router's lifetime."""

    def __init__(self, endpoint: str, max_message_bytes: int, tls: DispatchTls | None = None) -> None:
        self.endpoint = endpoint
        options: list[tuple[str, int | str]] = [("grpc.max_send_message_length", max_message_bytes),
                                                 ("grpc.max_receive_message_length", max_message_bytes)]
        if tls is None:
            self._channel = grpc.insecure_channel(endpoint, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(tls.ca, tls.private_key, tls.cert_chain)
            options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(endpoint, credentials, options=options)
        self._stub = expert_pb2_grpc.ExpertServiceStub(self._channel)

    def dispatch(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor, timeout_s: float) -> Any:
        """Start one Dispatch call; returns a grpc future whose result() is the response message.

        hidden [T, D] (the host's dtype), expert_ids [T, K] int32 (-1: slot served elsewhere),
        weights [T, K] float32.
        """
        request = expert_pb2.DispatchRequest(layer=layer, hidden=to_message(hidden),
                                             expert_ids=to_message(expert_ids), weights=to_message(weights))
        return self._stub.Dispatch.future(request, timeout=timeout_s)

    @staticmethod
    def output(response: expert_pb2.DispatchResponse) -> Tensor:
        """The [T, D] answer of a completed Dispatch."""
        return from_message(response.output)

    def close(self) -> None:
        self._channel.close()
