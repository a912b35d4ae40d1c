"""A real ``yayi-serve`` process on free ports, and a real gRPC client for it.

Used by the tests, the benchmarks and the comparison driver: each starts servers side by
side on port 0 and reads the ports back from the start-up line (with ``--http-port 0``,
``http_port`` and ``http_url`` too).  A server with TLS or token auth is reached by passing
``credentials`` (from ``tls_credentials``) and ``token``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest import ROOT
from server.grpc.wire import pb, pb_grpc

_LISTENING = re.compile(r"grpc listening on [^:]+:(\d+)(?:, metrics on http://[^:]+:(\d+)/metrics)?")
_HTTP = re.compile(r", http on (https?)://[^:]+:(\d+)/v1")


class ServerProcess:
    def __init__(
        self,
        *args: str,
        ready_timeout: float = 240.0,
        env: dict | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        command = [
            sys.executable,
            "-m",
            "server.cli",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--host",
            "127.0.0.1",
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._line_seen = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()
        match = self.wait_for_line(_LISTENING, ready_timeout)
        self.port = int(match.group(1))
        self.metrics_port = int(match.group(2)) if match.group(2) else None
        # The OpenAI-compatible front end, when started with --http-port.
        http = _HTTP.search(match.string)
        self.http_port = int(http.group(2)) if http else None
        self.http_url = f"{http.group(1)}://127.0.0.1:{self.http_port}" if http else None
        self.address = f"127.0.0.1:{self.port}"
        self.credentials = credentials
        self.token = token
        self.channel = self.open_channel()
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def open_channel(
        self, credentials: grpc.ChannelCredentials | None = None, token: str | None = None, options: list | None = None
    ) -> grpc.Channel:
        """A new connection (its own HTTP/2 streams), by default with this server's credentials and token."""
        return open_channel(self.address, credentials or self.credentials, token or self.token, options)

    def _pump(self) -> None:
        for line in self.process.stdout:
            with self._line_seen:
                self.lines.append(line.rstrip("\n"))
                self._line_seen.notify_all()
        with self._line_seen:
            self._line_seen.notify_all()

    def wait_for_line(self, pattern: re.Pattern | str, timeout: float) -> re.Match:
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._line_seen:
            while True:
                for line in self.lines[seen:]:
                    if match := pattern.search(line):
                        return match
                seen = len(self.lines)
                if self.process.poll() is not None and seen == len(self.lines):
                    raise RuntimeError(f"server exited ({self.process.returncode}):\n" + "\n".join(self.lines[-40:]))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no line matching {pattern.pattern!r}:\n" + "\n".join(self.lines[-40:]))
                self._line_seen.wait(min(remaining, 1.0))

    def wait_ready(self, timeout: float = 240.0) -> ServerProcess:
        self.wait_for_line("yayi-serve: ready", timeout)
        return self

    def peak_rss_bytes(self) -> int:
        """The server process's resident-memory high-water mark (Linux VmHWM)."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not found in /proc status")

    def engine_processes(self) -> list[psutil.Process]:
        """The server's children that run an engine (``python -m engines.process.child``, hf-cb's
        ``--engine-process``)."""
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "engines.process.child" in child.cmdline():
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        return found

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def generate(self, prompt: str, timeout: float = 60, **params) -> pb.GenerateResponse:
        return self.stub.Generate(request(prompt, **params), timeout=timeout)

    def stream(self, prompt: str, timeout: float = 60, **params):
        return self.stub.GenerateStream(request(prompt, **params), timeout=timeout)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self) -> int:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    options: list | None = None,
) -> grpc.Channel:
    """Plaintext, TLS (``credentials``), and either with ``authorization: Bearer <token>`` on every call."""
    if token is not None:
        # gRPC sends call credentials only over a protected channel; over plaintext, local
        # credentials vouch for a loopback connection instead (and refuse any other).
        transport = credentials or grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        credentials = grpc.composite_channel_credentials(transport, grpc.access_token_call_credentials(token))
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def tls_credentials(ca: bytes, client_cert: bytes | None = None, client_key: bytes | None = None):
    """Trust ``ca`` for the server's certificate; a client certificate and key for mutual TLS."""
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=client_key, certificate_chain=client_cert)


def request(prompt: str, request_id: str = "", use_chat_template: bool = False, **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt, request_id=request_id, use_chat_template=use_chat_template, params=pb.SamplingParams(**params)
    )
