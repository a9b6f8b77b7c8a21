"""TLS, mutual TLS and bearer-token authentication of the public API, with certificates made in the test.

A CA signs a server certificate for 127.0.0.1 / localhost and a client certificate; a second CA, which
the servers do not trust, signs an impostor client certificate. Two servers: TLS with a bearer token,
and mTLS. The `moe-cluster generate --server` client is run (in-process, `cluster.cli.main`) against both.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.cli import main as cli_main
from protos import router_pb2, router_pb2_grpc
from router.api import ServerConfig, TlsConfig
from tests.serving import ServeProcess, ServerHandle, request, rpc_error, start_server

TOKEN = "s3cret-token-for-tests"
UNAUTHENTICATED = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"
PROMPT = [1, 330, 2033, 349]


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> tuple[Pem, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _pem(cert, key), key, cert


def make_leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, server: bool) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return _pem(builder.sign(ca_key, hashes.SHA256()), key)


def _pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    return Pem(cert.public_bytes(serialization.Encoding.PEM),
               key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()))


@dataclass(frozen=True)
class Certs:
    ca: Pem
    server: Pem
    client: Pem
    impostor: Pem  # a client certificate from a CA the servers do not trust
    other_ca: Pem
    files: dict[str, Path]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca, ca_key, ca_cert = make_ca("moe-test-ca")
    other_ca, other_key, other_cert = make_ca("someone-else")
    made = Certs(ca, make_leaf(ca_key, ca_cert, "moe-server", server=True),
                 make_leaf(ca_key, ca_cert, "moe-client", server=False),
                 make_leaf(other_key, other_cert, "impostor", server=False), other_ca, {})
    root = tmp_path_factory.mktemp("certs")
    contents = {"server.pem": made.server.cert, "server.key": made.server.key, "ca.pem": made.ca.cert, "other-ca.pem": made.other_ca.cert, "client.pem": made.client.cert,
                "client.key": made.client.key, "impostor.pem": made.impostor.cert, "impostor.key": made.impostor.key,
                "token": f"{TOKEN}\n".encode(), "wrong-token": b"not-the-token\n"}
    for name, data in contents.items():
        (root / name).write_bytes(data)
        made.files[name] = root / name
    return made


@pytest.fixture(scope="module")
def tls_server(tiny_checkpoint: Path, certs: Certs) -> Iterator[ServerHandle]:
    """TLS (server certificate only) and a bearer token."""
    cfg = ServerConfig(tls=TlsConfig(certs.server.cert, certs.server.key), auth_token=TOKEN)
    with start_server(tiny_checkpoint, server=cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def mtls_server(tiny_checkpoint: Path, certs: Certs) -> Iterator[ServerHandle]:
    """mTLS: clients must present a certificate signed by the test CA; no token."""
    cfg = ServerConfig(tls=TlsConfig(certs.server.cert, certs.server.key, client_ca=certs.ca.cert))
    with start_server(tiny_checkpoint, server=cfg) as srv:
        yield srv


def secure_stub(srv: ServerHandle, root: bytes | None, client: Pem | None = None,
                target: str | None = None) -> router_pb2_grpc.GenerationStub:
    credentials = grpc.ssl_channel_credentials(root, client.key if client else None, client.cert if client else None)
    return router_pb2_grpc.GenerationStub(srv.secure_channel(credentials, target))


def bearer(token: str = TOKEN) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def expected(tls_server: ServerHandle, certs: Certs) -> list[int]:
    """The greedy answer to PROMPT (what every accepted call must return)."""
    answer = secure_stub(tls_server, certs.ca.cert).Generate(request(PROMPT, max_new_tokens=6), metadata=bearer(),
                                                           timeout=30)
    assert len(answer.token_ids) == 6
    return list(answer.token_ids)


# --- TLS -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost"])
def test_tls_with_the_ca_works(tls_server: ServerHandle, certs: Certs, expected: list[int], target: str) -> None:
    stub = secure_stub(tls_server, certs.ca.cert, target=f"{target}:{tls_server.port}")
    answer = stub.Generate(request(PROMPT, max_new_tokens=6), metadata=bearer(), timeout=30)
    assert list(answer.token_ids) == expected
    streamed = list(stub.GenerateStream(request(PROMPT, max_new_tokens=6), metadata=bearer(), timeout=30))
    assert [t for p in streamed for t in p.token_ids] == expected


@pytest.mark.parametrize("client", ["system roots", "another CA", "plaintext"])
def test_tls_fails_without_the_ca(tls_server: ServerHandle, certs: Certs, client: str) -> None:
    if client == "plaintext":
        stub = tls_server.stub()  # an insecure channel to a TLS port
    else:
        stub = secure_stub(tls_server, None if client == "system roots" else certs.other_ca.cert)
    err = rpc_error(lambda: stub.Generate(request(PROMPT, max_new_tokens=2), metadata=bearer(), timeout=10))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert tls_server.scheduler.num_running == 0


# --- mTLS ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["no certificate", "certificate of another CA"])
def test_mtls_refuses_a_client_without_a_trusted_certificate(mtls_server: ServerHandle, certs: Certs,
                                                             client: str) -> None:
    stub = secure_stub(mtls_server, certs.ca.cert, None if client == "no certificate" else certs.impostor)
    err = rpc_error(lambda: stub.Generate(request(PROMPT, max_new_tokens=2), timeout=10))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()


def test_mtls_accepts_a_client_with_a_certificate(mtls_server: ServerHandle, certs: Certs,
                                                  expected: list[int]) -> None:
    stub = secure_stub(mtls_server, certs.ca.cert, certs.client)
    assert list(stub.Generate(request(PROMPT, max_new_tokens=6), timeout=30).token_ids) == expected


# --- bearer token ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [None, bearer("not-the-token"), [("authorization", TOKEN)],
                                      bearer(TOKEN + "x"), [("authorization", f"Basic {TOKEN}")]],
                         ids=["missing", "wrong", "no Bearer prefix", "longer", "other scheme"])
def test_a_missing_or_wrong_token_is_unauthenticated(tls_server: ServerHandle, certs: Certs,
                                                     metadata: list[tuple[str, str]] | None) -> None:
    stub = secure_stub(tls_server, certs.ca.cert)
    calls = {
        "Generate": lambda: stub.Generate(request(PROMPT, max_new_tokens=2), metadata=metadata, timeout=10),
        "GenerateStream": lambda: stub.GenerateStream(request(PROMPT, max_new_tokens=2), metadata=metadata,
                                                      timeout=10),
        "Tokenize": lambda: stub.Tokenize(router_pb2.TokenizeRequest(text="hi"), metadata=metadata, timeout=10),
        "ModelInfo": lambda: stub.ModelInfo(router_pb2.ModelInfoRequest(), metadata=metadata, timeout=10),
    }
    for name, call in calls.items():
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.code(), err.details())
        assert err.details() == UNAUTHENTICATED, name
    assert tls_server.scheduler.num_running == 0 and tls_server.scheduler.num_waiting == 0


def test_the_right_token_works_and_health_needs_none(tls_server: ServerHandle, certs: Certs,
                                                     expected: list[int]) -> None:
    stub = secure_stub(tls_server, certs.ca.cert)
    assert list(stub.Generate(request(PROMPT, max_new_tokens=6), metadata=bearer(), timeout=30).token_ids) == expected
    info = stub.ModelInfo(router_pb2.ModelInfoRequest(), metadata=bearer(), timeout=10)
    assert info.vocab_size == 32000
    channel = tls_server.secure_channel(grpc.ssl_channel_credentials(certs.ca.cert))
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# --- the command-line client ----------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_with_ca_and_token_file(tls_server: ServerHandle, certs: Certs, expected: list[int],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--server", tls_server.address, "--ca-cert", certs.files["ca.pem"], "--token-ids",
            ",".join(map(str, PROMPT)), "--max-new-tokens", 6, "--temperature", 0, "--ignore-eos"]
    code, out, err = run_cli(capsys, *base, "--auth-token-file", certs.files["token"], "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["token_ids"] == expected and result["finish_reason"] == "length"
    assert result["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 6}

    code, out, err = run_cli(capsys, *base, "--auth-token-file", certs.files["token"], "--stream")
    assert code == 0, err
    assert out == tls_server.tokenizer.decode(expected) + "\n"

    code, out, err = run_cli(capsys, *base, "--auth-token-file", certs.files["wrong-token"], "--json")
    assert (code, out) == (1, "")
    assert err.strip() == f"moe-cluster: UNAUTHENTICATED: {UNAUTHENTICATED}"

    code, out, err = run_cli(capsys, *base, "--json")  # no token at all
    assert code == 1 and err.startswith("moe-cluster: UNAUTHENTICATED:")


def test_cli_generate_with_a_client_certificate(mtls_server: ServerHandle, certs: Certs, expected: list[int],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--server", mtls_server.address, "--ca-cert", certs.files["ca.pem"], "--token-ids",
            ",".join(map(str, PROMPT)), "--max-new-tokens", 6, "--temperature", 0, "--ignore-eos", "--json",
            "--timeout", 10]
    code, out, err = run_cli(capsys, *base, "--client-cert", certs.files["client.pem"],
                             "--client-key", certs.files["client.key"])
    assert code == 0, err
    assert json.loads(out)["token_ids"] == expected

    code, out, err = run_cli(capsys, *base)  # no client certificate
    assert (code, out) == (1, "") and err.startswith("moe-cluster: UNAVAILABLE:")
    code, out, err = run_cli(capsys, *base, "--client-cert", certs.files["impostor.pem"],
                             "--client-key", certs.files["impostor.key"])
    assert (code, out) == (1, "") and err.startswith("moe-cluster: UNAVAILABLE:")


@pytest.mark.slow
def test_the_serve_command_takes_tls_client_ca_and_token_files(tiny_checkpoint: Path, certs: Certs,
                                                               expected: list[int],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # The real `moe-cluster serve` process, its security flags read from files.
    f = certs.files
    args = ["--model", tiny_checkpoint, "--port", 0, "--metrics-port", 0, "--dtype", "float32", "--device", "cpu",
            "--tls-cert", f["server.pem"], "--tls-key", f["server.key"], "--tls-client-ca", f["ca.pem"],
            "--auth-token-file", f["token"]]
    with ServeProcess(args) as proc:
        tls = ["generate", "--server", proc.address, "--ca-cert", f["ca.pem"]]
        client = ["--client-cert", f["client.pem"], "--client-key", f["client.key"]]
        ask = ["--token-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 6, "--temperature", 0, "--ignore-eos",
               "--json", "--timeout", 30]
        code, out, err = run_cli(capsys, *tls, *client, *ask, "--auth-token-file", f["token"])
        assert code == 0, err + "".join(proc.stderr)
        assert json.loads(out)["token_ids"] == expected
        code, out, err = run_cli(capsys, *tls, *client, *ask)  # no token
        assert code == 1 and err.strip() == f"moe-cluster: UNAUTHENTICATED: {UNAUTHENTICATED}"
        code, out, err = run_cli(capsys, *tls, *ask, "--auth-token-file", f["token"])  # no client certificate
        assert code == 1 and err.startswith("moe-cluster: UNAVAILABLE:")
        proc.terminate()
        assert proc.wait(30) == 0
