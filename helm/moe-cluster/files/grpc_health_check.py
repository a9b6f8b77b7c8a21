"""Wait until a gRPC server reports SERVING on grpc.health.v1.Health: the first step of `helm test`.

Runs in the moe-cluster image (grpcio and grpcio-health-checking are installed there) and speaks
plaintext, TLS, or mutual TLS, with an optional bearer token, as the router is configured.
Exit code 0 once SERVING; 1 with the last status seen when the time is up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="HOST:PORT of the gRPC server")
    p.add_argument("--service", default="", help="health service name (empty: the whole server)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for SERVING")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between checks")
    p.add_argument("--ca-cert", type=Path, default=None, help="CA bundle (PEM) of the server certificate: use TLS")
    p.add_argument("--client-cert", type=Path, default=None, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--client-key", type=Path, default=None, help="client private key (PEM) for mutual TLS")
    p.add_argument("--auth-token-file", type=Path, default=None, help="send 'authorization: Bearer <token>'")
    return p.parse_args(argv)


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    if args.ca_cert is None:
        return grpc.insecure_channel(args.server)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.ca_cert.read_bytes(),
        private_key=args.client_key.read_bytes() if args.client_key else None,
        certificate_chain=args.client_cert.read_bytes() if args.client_cert else None,
    )
    return grpc.secure_channel(args.server, credentials)


def wait_serving(args: argparse.Namespace) -> tuple[bool, str]:
    metadata = []
    if args.auth_token_file is not None:
        metadata.append(("authorization", f"Bearer {args.auth_token_file.read_text().strip()}"))
    deadline = time.monotonic() + args.timeout
    last = "no answer yet"
    with open_channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=5, metadata=metadata)
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True, last
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            if time.monotonic() + args.interval > deadline:
                return False, last
            time.sleep(args.interval)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    serving, last = wait_serving(args)
    if serving:
        print(f"{args.server}: SERVING")
        return 0
    print(f"{args.server}: not SERVING after {args.timeout:.0f} s (last: {last})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
