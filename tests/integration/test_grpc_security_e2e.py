"""The gRPC API secured end to end: a real server with TLS (a self-signed certificate
made here) and bearer tokens, real gRPC clients and the real ``headrace get`` command.

The store is the in-memory one (this is about the transport, not Redis): every entity
answers its defaults, which is enough to tell an answer from a refusal.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from pydantic import SecretStr

from headrace.cli import main
from headrace.core.errors import BackendError
from headrace.core.online_store import MemoryOnlineStore
from headrace.core.settings import ServeSettings
from serving.client import FeatureClient, Unauthenticated
from serving.server import FeatureServer, build_server
from tests.certs import self_signed

pytestmark = pytest.mark.integration

OLD, NEW = "old-Tok3n-e2e-4f1a", "new-Tok3n-e2e-9c2b"
WRONG = "wrong-Tok3n-e2e-77"
SECRETS = (OLD, NEW, WRONG)


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path)


@pytest.fixture
def server(tmp_path: Path, cert: tuple[Path, Path],
           caplog: pytest.LogCaptureFixture) -> Iterator[FeatureServer]:
    caplog.set_level(logging.DEBUG)
    settings = ServeSettings.from_env(
        {"HEADRACE_GRPC_TLS_CERT": str(cert[0]), "HEADRACE_GRPC_TLS_KEY": str(cert[1]),
         "HEADRACE_GRPC_TOKENS": f"{OLD},{NEW}"},
        split_enabled=False, models_dir=str(tmp_path / "models"))
    with build_server(settings, port=0, host="127.0.0.1", store=MemoryOnlineStore()) as srv:
        yield srv


def address(srv: FeatureServer) -> str:
    return f"127.0.0.1:{srv.port}"


@pytest.mark.parametrize("token", [OLD, NEW])  # rotation: both listed tokens answer
def test_right_token_over_tls_answers(server: FeatureServer, cert: tuple[Path, Path],
                                      token: str) -> None:
    with FeatureClient(address(server), timeout_s=5.0, tls_ca=str(cert[0]),
                       token=SecretStr(token)) as client:
        answer = client.get("user", ["u1"])
    assert [e.id for e in answer.entities] == ["u1"]


@pytest.mark.parametrize(("token", "reason"), [(None, "missing"), (WRONG, "wrong")])
def test_no_or_wrong_token_is_unauthenticated(server: FeatureServer, cert: tuple[Path, Path],
                                              token: str | None, reason: str) -> None:
    with FeatureClient(address(server), timeout_s=5.0, tls_ca=str(cert[0]),
                       token=token) as client:
        with pytest.raises(Unauthenticated, match="UNAUTHENTICATED"):
            client.get("user", ["u1"])
        with pytest.raises(Unauthenticated, match="UNAUTHENTICATED"):
            client.score("u1", [{"ad_id": "a1", "campaign_id": "c1", "bid_cpm": 1.0}])
    assert server.metrics.value("headrace_serving_auth_failures_total", reason=reason) == 2


def test_plaintext_client_to_tls_server_fails(server: FeatureServer) -> None:
    with FeatureClient(address(server), timeout_s=2.0, token=OLD) as client:
        with pytest.raises(BackendError, match="UNAVAILABLE"):
            client.get("user", ["u1"])


def test_health_answers_without_a_token(server: FeatureServer, cert: tuple[Path, Path]) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=cert[0].read_bytes())
    with grpc.secure_channel(address(server), creds) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5.0)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_the_token(server: FeatureServer, cert: tuple[Path, Path]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    creds = grpc.ssl_channel_credentials(root_certificates=cert[0].read_bytes())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.secure_channel(address(server), creds) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5.0))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(stub.ServerReflectionInfo(
            iter([request]), timeout=5.0, metadata=(("authorization", f"Bearer {NEW}"),)))
    names = {s.name for s in answers[0].list_services_response.service}
    assert "headrace.v1.ScoringService" in names


def test_get_command_with_tls_and_token(server: FeatureServer, cert: tuple[Path, Path],
                                        capsys: pytest.CaptureFixture[str],
                                        caplog: pytest.LogCaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["get", "--server", address(server), "--entity", "user", "--id", "u1",
            "--tls-ca", str(cert[0]), "--json"]
    assert main([*argv, "--token", OLD]) == 0
    out = capsys.readouterr()
    assert '"id": "u1"' in out.out

    assert main([*argv, "--token", WRONG]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headrace get: feature server at ") and "UNAUTHENTICATED" in err
    assert len(err.splitlines()) == 1 and WRONG not in err

    monkeypatch.setenv("HEADRACE_GRPC_TOKEN", NEW)  # the env token, and the env CA
    monkeypatch.setenv("HEADRACE_GRPC_TLS_CA", str(cert[0]))
    assert main(argv[:7] + ["--json"]) == 0
    captured = capsys.readouterr()

    # nothing the server logged or exports, nor what the command printed, names a token
    exported = generate_latest(server.metrics.registry).decode()
    assert 'headrace_serving_auth_failures_total{reason="wrong"} 1.0' in exported
    logged = "\n".join(r.getMessage() for phase in ("setup", "call")
                       for r in caplog.get_records(phase))
    assert "accepted bearer token(s)" in logged
    for text in (exported, logged, err, captured.out, captured.err, out.out, out.err):
        for secret in SECRETS:
            assert secret not in text


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path) -> None:
    server_cert, server_key = self_signed(tmp_path)
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    client_cert, client_key = self_signed(client_dir)  # self-signed: its own CA
    settings = ServeSettings.from_env(
        {"HEADRACE_GRPC_TLS_CERT": str(server_cert), "HEADRACE_GRPC_TLS_KEY": str(server_key),
         "HEADRACE_GRPC_TLS_CLIENT_CA": str(client_cert)},
        split_enabled=False, models_dir=str(tmp_path / "models"))
    request = health_pb2.HealthCheckRequest(service="")
    roots = server_cert.read_bytes()
    with build_server(settings, port=0, host="127.0.0.1", store=MemoryOnlineStore()) as srv:
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=roots, private_key=client_key.read_bytes(),
            certificate_chain=client_cert.read_bytes())
        with grpc.secure_channel(address(srv), with_cert) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5.0)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with FeatureClient(address(srv), timeout_s=2.0, tls_ca=str(server_cert)) as client:
            with pytest.raises(BackendError, match="UNAVAILABLE"):
                client.get("user", ["u1"])
        with FeatureClient(address(srv), timeout_s=2.0, tls_ca=str(server_cert),
                           tls_cert=str(client_cert), tls_key=str(client_key)) as client:
            assert client.get("user", ["u1"]).entities[0].id == "u1"
        argv = ["get", "--server", address(srv), "--entity", "user", "--id", "u1",
                "--tls-ca", str(server_cert)]
        assert main([*argv, "--tls-cert", str(client_cert), "--tls-key",
                     str(client_key)]) == 0
