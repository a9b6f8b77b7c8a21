"""A persistent gRPC channel to one expert host, and the DispatchStream the router's calls travel on.

Each host gets one long-lived bidirectional `DispatchStream`; a layer's request is one message on it
and its answer the next response. A unary call would set up an HTTP/2 stream per layer, and
grpcio's sync client starts a thread for each call made while none is in flight on the channel:
on the 2-core machine a layer's round trip to two idle echo hosts took 970 us as unary calls and
660 us as stream messages (bench/README, "Where the cluster backend's time goes").

A stream has no deadline per message, so one watchdog thread per process cancels a stream the
router is waiting on whose oldest unanswered request is past its deadline; its answers then fail
with DEADLINE_EXCEEDED, as a unary call would. Any failure ends the stream: every answer still
pending on it fails with the stream's status, and the next request opens a new stream.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import deque

import grpc
from torch import Tensor

from protos import expert_pb2, expert_pb2_grpc
from protos.keepalive import ping_options
from protos.security import DispatchTls
from protos.tensors import from_message, to_message

_WATCH_INTERVAL_S = 0.05  # how late past its deadline a hung host's request is noticed, at most
KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 20.0, 10.0  # defaults of DispatchConfig.keepalive_s and keepalive_timeout_s


class DispatchError(grpc.RpcError):  # type: ignore[misc]  # grpc is untyped
    """A Dispatch that failed: the host's status, or DEADLINE_EXCEEDED from the watchdog."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class PendingAnswer:
    """One request on a stream; `result()` waits for its response (or the stream's failure)."""

    def __init__(self, stream: _DispatchStream, deadline: float) -> None:
        self._stream, self.deadline = stream, deadline
        self._response: expert_pb2.DispatchResponse | None = None
        self._error: DispatchError | None = None

    def result(self) -> expert_pb2.DispatchResponse:
        while self._response is None and self._error is None:
            self._stream.read_one()
        if self._error is not None:
            raise self._error
        assert self._response is not None
        return self._response

    def _answer(self, response: expert_pb2.DispatchResponse) -> None:
        self._response = response

    def _fail(self, error: DispatchError) -> None:
        self._error = error


_END = object()  # ends a stream's request iterator


class _DispatchStream:
    """One DispatchStream call: requests go out in order, responses answer the oldest pending request."""

    def __init__(self, stub: expert_pb2_grpc.ExpertServiceStub, endpoint: str) -> None:
        self.endpoint = endpoint
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._call = stub.DispatchStream(iter(self._requests.get, _END))
        self._pending: deque[PendingAnswer] = deque()
        self._error: DispatchError | None = None
        self._timed_out = False
        self._reading = False  # the router is blocked in read_one
        _WATCHDOG.watch(self)

    @property
    def failed(self) -> bool:
        return self._error is not None

    def send(self, request: expert_pb2.DispatchRequest, timeout_s: float) -> PendingAnswer:
        """Queue `request` (on a stream that has not failed: ExpertClient opens a new one after a failure)."""
        answer = PendingAnswer(self, time.monotonic() + timeout_s)
        self._pending.append(answer)
        self._requests.put(request)
        return answer

    def read_one(self) -> None:
        """Block for the next response and give it to the oldest pending request; on failure, fail them all."""
        self._reading = True
        try:
            response = next(self._call)
        except grpc.RpcError as err:
            self._fail_all(self._error_of(err))
            return
        except StopIteration:
            self._fail_all(DispatchError(grpc.StatusCode.UNAVAILABLE,
                                         f"host {self.endpoint} ended the dispatch stream"))
            return
        finally:
            self._reading = False
        self._pending.popleft()._answer(response)

    def overdue(self, now: float) -> bool:
        """Whether the router waits on this stream for a request past its deadline. An answer that
        arrived in time but is not read yet (the router reads another host's first) is not late."""
        try:
            return self._reading and self._pending[0].deadline < now  # the reader may pop it meanwhile
        except IndexError:
            return False

    def time_out(self) -> None:
        """The watchdog's verdict: cancel the call; the reader sees CANCELLED and fails its requests."""
        self._timed_out = True
        self._call.cancel()

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()

    def _error_of(self, err: grpc.RpcError) -> DispatchError:
        if self._timed_out:
            return DispatchError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"host {self.endpoint} did not answer a dispatch within its deadline")
        if isinstance(err, grpc.Call):
            return DispatchError(err.code(), err.details() or "")
        return DispatchError(grpc.StatusCode.UNKNOWN, str(err))

    def _fail_all(self, error: DispatchError) -> None:
        self._error = error
        self._requests.put(_END)  # grpc's thread that sends the requests waits on the queue: let it end
        while self._pending:
            self._pending.popleft()._fail(error)


class _Watchdog:
    """A daemon thread, started with the first stream, that times out the stream the router is blocked on
    once its oldest request is past its deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: weakref.WeakSet[_DispatchStream] = weakref.WeakSet()
        self._thread: threading.Thread | None = None

    def watch(self, stream: _DispatchStream) -> None:
        with self._lock:
            self._streams.add(stream)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dispatch-watchdog", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(_WATCH_INTERVAL_S)
            now = time.monotonic()
            with self._lock:
                streams = list(self._streams)
            for stream in streams:
                if not stream.failed and stream.overdue(now):
                    stream.time_out()


_WATCHDOG = _Watchdog()


class ExpertClient:
    """Client of one host's ExpertService; the channel stays open for the router's lifetime."""

    def __init__(self, endpoint: str, max_message_bytes: int, tls: DispatchTls | None = None,
                 keepalive_s: float = KEEPALIVE_S, keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S) -> None:
        """`keepalive_s`: ping the host after that long without traffic (`DispatchConfig.keepalive_s`)."""
        self.endpoint = endpoint
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes),
            *ping_options(keepalive_s, keepalive_timeout_s),  # also before the first stream and between streams
            ("grpc.http2.max_pings_without_data", 0)]  # the stream idles between steps: keep pinging
        if tls is None:
            self._channel = grpc.insecure_channel(endpoint, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(tls.ca, tls.private_key, tls.cert_chain)
            options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(endpoint, credentials, options=options)
        self._stub = expert_pb2_grpc.ExpertServiceStub(self._channel)
        self._stream: _DispatchStream | None = None

    def dispatch(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor,
                 timeout_s: float) -> PendingAnswer:
        """Send one Dispatch on the host's stream; `result()` of the answer is the response message.

        hidden [T, D] (the host's dtype), expert_ids [T, K] int32 (-1: slot served elsewhere),
        weights [T, K] float32. Raises DispatchError from `result()` when the host fails or misses
        the deadline.
        """
        request = expert_pb2.DispatchRequest(layer=layer, hidden=to_message(hidden),
                                             expert_ids=to_message(expert_ids), weights=to_message(weights))
        if self._stream is None or self._stream.failed:
            self._stream = _DispatchStream(self._stub, self.endpoint)
        return self._stream.send(request, timeout_s)

    @staticmethod
    def output(response: expert_pb2.DispatchResponse) -> Tensor:
        """The [T, D] answer of a completed Dispatch."""
        return from_message(response.output)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._channel.close()
