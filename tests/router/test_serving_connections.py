"""The public API's connections over time: clients that ping idle connections, and clients that vanish.

Backend clients commonly set gRPC keepalive at 10-60 s; gRPC's default server policy closes the
connection of a client that pings more often than every 5 minutes without data (GOAWAY
"too_many_pings"), ending every request on it. And a client whose network path drops in silence must
not hold its sequence's slot until the OS gives up on the TCP connection: the server pings and closes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mixtral.block import Experts
from protos import router_pb2_grpc
from router.api import ApiLimits, ServerConfig
from router.kv_cache import CacheConfig
from tests.freezing_proxy import FreezingProxy
from tests.router.served import LIMITS
from tests.serving import ServerHandle, SlowExperts, request, start_server, wait_for

# gRPC's client sends at most one ping a second while no data flows, and the server ends the connection at
# the third ping that came sooner than it allows after another: 4 s into the silence, so 7 s leave room.
IDLE_S = 7.0
PINGING_CLIENT = [("grpc.keepalive_time_ms", 100), ("grpc.keepalive_permit_without_calls", 1),
                  ("grpc.http2.max_pings_without_data", 0)]


def _states_while_idle(srv: ServerHandle) -> list[grpc.ChannelConnectivity]:
    """Connectivity states of a pinging client's channel from READY through IDLE_S seconds without calls."""
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(srv.address, options=PINGING_CLIENT) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        channel.subscribe(states.append)
        time.sleep(IDLE_S)
        channel.unsubscribe(states.append)
        reply = router_pb2_grpc.GenerationStub(channel).Generate(request([1, 330], max_new_tokens=2), timeout=30)
    assert len(reply.token_ids) == 2  # and the channel still serves
    return states


@pytest.mark.parametrize("interval_s, kept", [(0.05, True), (10.0, False)])
def test_a_client_pinging_every_100_ms_keeps_its_idle_connection_where_the_server_allows_it(
        tiny_checkpoint: Path, interval_s: float, kept: bool) -> None:
    """client_ping_interval_s 0.05: the connection stays READY through 7 s of pings; at the 10 s default
    the same client's connection is closed (the channel leaves READY), which shows the pings are sent."""
    with start_server(tiny_checkpoint, server=ServerConfig(limits=LIMITS, client_ping_interval_s=interval_s)) as srv:
        states = _states_while_idle(srv)
    left_ready = [s for s in states if s is not grpc.ChannelConnectivity.READY]
    assert (not left_ready) == kept, states


@pytest.fixture
def slow_server(tiny_checkpoint: Path) -> Iterator[ServerHandle]:
    """Steps of at least 20 ms (250 tokens last 5 s); the server pings after 0.5 s of silence and gives up
    0.5 s later."""
    slow: list[SlowExperts] = []

    def wrap(experts: Experts) -> Experts:
        slow.append(SlowExperts(experts, delay_s=0.01))
        return slow[0]

    cfg = ServerConfig(limits=ApiLimits(max_prompt_tokens=64, max_new_tokens_cap=256), keepalive_s=0.5,
                       keepalive_timeout_s=0.5)
    with start_server(tiny_checkpoint, server=cfg, wrap=wrap, cache=CacheConfig(num_slots=4, max_seq_len=320)) as srv:
        yield srv


def test_a_client_whose_network_drops_in_silence_has_its_request_cancelled_and_its_slot_freed(
        slow_server: ServerHandle) -> None:
    proxy = FreezingProxy(slow_server.port)
    tokens: list[int] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
            call = router_pb2_grpc.GenerationStub(channel).GenerateStream(
                request([1, 330, 2033, 349], max_new_tokens=250), timeout=30)

            def read() -> None:
                try:
                    for part in call:
                        tokens.extend(part.token_ids)
                except grpc.RpcError:
                    pass  # the client's own deadline, once the test is over

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            wait_for(lambda: len(tokens) >= 3, 10, "the stream starts")
            proxy.freeze()
            frozen_at = time.monotonic()
            # keepalive_s + keepalive_timeout_s = 1 s; the whole generation would take another 4.9 s or more
            wait_for(proxy.server_closed.is_set, 4, "the server closes the silent connection")
            slow_server.wait_idle(timeout=1)
            assert time.monotonic() - frozen_at < 4.5 and len(tokens) < 250
            call.cancel()
    finally:
        proxy.close()
    stub = router_pb2_grpc.GenerationStub(slow_server.channel())  # the server goes on serving
    assert len(stub.Generate(request([1, 330], max_new_tokens=2), timeout=30).token_ids) == 2


@pytest.mark.parametrize("field", ["client_ping_interval_s", "keepalive_s", "keepalive_timeout_s"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), 2**31 / 1000])
def test_connection_timings_outside_what_grpc_takes_are_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"{field}=.* must be a number of seconds in \[0.001, 2147483\)"):
        ServerConfig(**{field: value})  # type: ignore[arg-type]
