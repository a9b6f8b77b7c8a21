"""How the gRPC connections between moe-cluster's processes and its clients are kept alive: the settings'
range and the channel options that ping a silent peer, for the expert-dispatch channel and the public API.
"""

from __future__ import annotations

_MS = 1000


def check_seconds(name: str, value: float) -> None:
    """ValueError naming `name` unless `value` seconds is a whole number of milliseconds gRPC can hold."""
    if not 0.001 <= value < 2**31 / _MS:
        raise ValueError(f"{name}={value} must be a number of seconds in [0.001, 2147483)")


def ping_options(keepalive_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """Options that ping the peer after `keepalive_s` without traffic, also with no call in flight, and close
    the connection when the ping has no answer within `timeout_s`."""
    return [("grpc.keepalive_time_ms", round(keepalive_s * _MS)),
            ("grpc.keepalive_timeout_ms", round(timeout_s * _MS)),
            # gRPC 1.85 waits this long for the keepalive ping's answer (default 1 minute), whatever the above
            ("grpc.http2.ping_timeout_ms", round(timeout_s * _MS)),
            ("grpc.keepalive_permit_without_calls", 1)]


def accept_pings_option(min_interval_s: float) -> tuple[str, int]:
    """The server option that accepts a client's pings this often while no data flows (gRPC's default, 5
    minutes, answers faster ones with a GOAWAY "too_many_pings" that ends every call on the connection)."""
    return "grpc.http2.min_ping_interval_without_data_ms", round(min_interval_s * _MS)
