"""How the internal expert-dispatch channel is secured: mutual TLS under one internal CA.

Routers and expert hosts each present a certificate signed by the same CA and verify the other's.
Hosts listen on node IPs that change as pods move, so clients check the certificate against one
fixed name (`server_name`, a DNS SAN of the host certificate) rather than the IP they dial.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class DispatchTls:
    """PEM certificate chain and key of this side, and the CA that signed both sides."""

    cert_chain: bytes
    private_key: bytes
    ca: bytes
    server_name: str = "moe-expert-host"

    @classmethod
    def from_files(cls, cert: Path, key: Path, ca: Path, server_name: str = "moe-expert-host") -> DispatchTls:
        return cls(Path(cert).read_bytes(), Path(key).read_bytes(), Path(ca).read_bytes(), server_name)
