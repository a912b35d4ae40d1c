"""TLS, mutual TLS and bearer-token auth against real servers, with certificates made here."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loadtest.launch.server_process import ServerProcess, tls_credentials
from server.grpc.wire import pb, pb_grpc
from tests.helpers.certs import CertificateAuthority
from tests.helpers.observe import metric
from tests.helpers.servers import run_cli

TOKEN = "t0ken-under-test-7f3a9c"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger_ca = CertificateAuthority("yayi test CA"), CertificateAuthority("some other CA")
    (folder / "ca.crt").write_bytes(ca.cert)
    server_cert, server_key = ca.issue("localhost", server=True).write(folder, "server")
    (folder / "token").write_text(TOKEN + "\n")
    return {
        "folder": folder,
        "ca": ca,
        "stranger_ca": stranger_ca,
        "server_cert": server_cert,
        "server_key": server_key,
        "client": ca.issue("good client", server=False),
        "stranger_client": stranger_ca.issue("stranger", server=False),
    }


@pytest.fixture(scope="module")
def token_server(pki):
    """Plaintext with token auth, one stream per connection, DEBUG logs (to catch a logged token)."""
    server = ServerProcess(
        "--engine",
        "hf-kv",
        "--model",
        "tiny-llama",
        "--auth-token-file",
        str(pki["folder"] / "token"),
        "--max-concurrent-streams",
        "1",
        "--log-level",
        "DEBUG",
        token=TOKEN,
    ).wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(pki):
    client = pki["client"]
    server = ServerProcess(
        "--engine",
        "hf-kv",
        "--model",
        "tiny-llama",
        "--metrics-port",
        "-1",
        "--tls-cert",
        str(pki["server_cert"]),
        "--tls-key",
        str(pki["server_key"]),
        "--tls-client-ca",
        str(pki["folder"] / "ca.crt"),
        credentials=tls_credentials(pki["ca"].cert, client.cert, client.key),
    ).wait_ready()
    yield server
    server.stop()


def calls(channel: grpc.Channel) -> dict:
    """One call of each shape the server offers, through ``channel``."""
    stub = pb_grpc.InferenceStub(channel)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    return {
        "Generate": lambda: stub.Generate(
            pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=2)), timeout=10
        ),
        "GenerateStream": lambda: list(
            stub.GenerateStream(pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=2)), timeout=10)
        ),
        "Score": lambda: stub.Score(pb.ScoreRequest(text="two words"), timeout=10),
        "GetModelInfo": lambda: stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10),
        "reflection": lambda: list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        ),
    }


def health_of(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


@pytest.mark.parametrize(
    "token, refusal",
    [
        (None, "missing credentials"),
        ("wrong-token", "invalid bearer token"),
        (TOKEN + "x", "invalid bearer token"),
        (TOKEN[:-1], "invalid bearer token"),
    ],
)
def test_token_auth_refuses_every_call_but_health(token_server, token, refusal):
    refused_before = metric(token_server, "yayi_requests_total", status="UNAUTHENTICATED")
    channel = grpc.insecure_channel(token_server.address) if token is None else token_server.open_channel(token=token)
    with channel:
        for name, call in calls(channel).items():
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert refusal in error.value.details() and TOKEN not in error.value.details()
        assert health_of(channel) == health_pb2.HealthCheckResponse.SERVING, "probes carry no token"
    assert metric(token_server, "yayi_requests_total", status="UNAUTHENTICATED") == refused_before + 5


def test_token_auth_admits_the_right_token_and_never_logs_it(token_server):
    for name, call in calls(token_server.channel).items():
        assert call(), name
    assert token_server.generate("hello", max_new_tokens=3).usage.completion_tokens == 3
    assert any("refused /yayi.serving.v1.Inference/Generate" in line for line in token_server.lines), (
        "refusals are logged at DEBUG, so the no-token check below looks at a log that had the chance"
    )
    assert not any(TOKEN in line for line in token_server.lines)


def test_concurrent_streams_per_connection_are_bounded(token_server):
    # --max-concurrent-streams 1: while one call holds the connection, a second call on it
    # waits for the stream, but a second connection is served at once.
    holder = token_server.open_channel()
    stream = pb_grpc.InferenceStub(holder).GenerateStream(
        pb.GenerateRequest(prompt="hold", params=pb.SamplingParams(max_new_tokens=900, ignore_eos=True)), timeout=60
    )
    next(stream)
    with pytest.raises(grpc.RpcError) as error:
        pb_grpc.InferenceStub(holder).GetModelInfo(pb.ModelInfoRequest(), timeout=1.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with token_server.open_channel() as other:
        assert pb_grpc.InferenceStub(other).GetModelInfo(pb.ModelInfoRequest(), timeout=5).engine == "hf-kv"
    stream.cancel()
    holder.close()


def test_mutual_tls_admits_a_client_certificate_from_the_ca(mtls_server):
    assert mtls_server.generate("hello", max_new_tokens=3).usage.completion_tokens == 3
    assert mtls_server.health_status() == health_pb2.HealthCheckResponse.SERVING
    assert any("security: TLS with client certificates" in line for line in mtls_server.lines)


@pytest.mark.parametrize(
    "client", ["plaintext", "no client certificate", "client certificate from another CA", "server CA not trusted"]
)
def test_mutual_tls_refuses(mtls_server, pki, client):
    ca, stranger = pki["ca"], pki["stranger_client"]
    credentials = {
        "plaintext": None,
        "no client certificate": tls_credentials(ca.cert),
        "client certificate from another CA": tls_credentials(ca.cert, stranger.cert, stranger.key),
        "server CA not trusted": tls_credentials(pki["stranger_ca"].cert, pki["client"].cert, pki["client"].key),
    }[client]
    channel = (
        grpc.insecure_channel(mtls_server.address)
        if credentials is None
        else grpc.secure_channel(mtls_server.address, credentials)
    )
    with channel, pytest.raises(grpc.RpcError) as error:
        health_of(channel)  # even the open health service sits behind the handshake
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_server.health_status() == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tls-cert", "{folder}/server.crt"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "{folder}/ca.crt"], "needs --tls-cert and --tls-key"),
        (
            ["--tls-cert", "{folder}/server.key", "--tls-key", "{folder}/server.key"],
            "not a PEM file holding a CERTIFICATE",
        ),
        (["--tls-cert", "{folder}/server.crt", "--tls-key", "{folder}/missing.key"], "--tls-key {folder}/missing.key"),
        (["--auth-token-file", "{folder}/missing-token"], "--auth-token-file"),
        (["--auth-token-file", "{folder}/empty-token"], "must be non-empty printable ASCII"),
        (["--max-concurrent-streams", "0"], "--max-concurrent-streams must be at least 1"),
    ],
)
def test_bad_security_flags_exit_with_a_message(pki, args, message):
    folder = pki["folder"]
    (folder / "empty-token").write_text("  \n")
    args = [a.format(folder=folder) for a in args]
    started = time.monotonic()
    run = run_cli("--model", "tiny-llama", *args, timeout=120)
    assert run.returncode != 0
    assert message.format(folder=folder) in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert time.monotonic() - started < 60, "refused before the model loads"
