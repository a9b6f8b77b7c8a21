"""The `helm test` hook's health check (files/grpc_health_check.py) against a real gRPC server."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.helm.rendered import load_health_check

TOKEN = "s3cret-token"


class RequireToken(grpc.ServerInterceptor):
    """Refuses every call without `authorization: Bearer <TOKEN>`, as the router does with auth on."""

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if (("authorization", f"Bearer {TOKEN}")) in tuple(details.invocation_metadata or ()):
            return continuation(details)

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        return grpc.unary_unary_rpc_method_handler(deny)


@pytest.fixture()
def server() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[RequireToken()])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        srv.stop(grace=None)


def test_exits_zero_when_the_server_reports_serving(server: tuple[str, health.HealthServicer], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    address, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    assert load_health_check().main(["--server", address, "--timeout", "10", "--auth-token-file", str(token)]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_exits_one_naming_the_last_status_when_the_server_never_serves(
        server: tuple[str, health.HealthServicer], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    argv = ["--server", address, "--timeout", "1", "--interval", "0.2", "--auth-token-file", str(token)]
    assert load_health_check().main(argv) == 1
    assert "last: NOT_SERVING" in capsys.readouterr().err


def test_reports_the_refusal_when_the_token_is_missing(server: tuple[str, health.HealthServicer],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    address, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert load_health_check().main(["--server", address, "--timeout", "0.5", "--interval", "0.1"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
