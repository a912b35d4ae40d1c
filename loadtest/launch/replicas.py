"""N yayi-serve replicas on this machine behind HAProxy: ``make replicas``, tests/integration/test_replicas.py, bench/.

    python -m loadtest.launch.replicas --replicas 2 --port 50050 -- --engine hf-kv --model tiny-llama

starts the replicas (``ServerProcess``: real servers on free ports, each with its HTTP front end
for ``/health``), renders deploy/haproxy/haproxy.cfg.template for them, starts HAProxy and prints
the one address to call.  HAProxy balances each gRPC call (an HTTP/2 stream) to the replica with
the fewest calls outstanding, takes a replica out when its ``/health`` stops answering 200, and
retries on another replica a call that a replica never answered.

Draining one replica: the server refuses new calls with UNAVAILABLE the moment it is signalled,
as its health turns 503, and HAProxy only learns of the 503 at its next check.  A refusal is an
HTTP 200 carrying grpc-status 14, which HAProxy cannot retry, so ``drain`` first tells HAProxy
(runtime API: state drain, no new calls), waits until the replica's calls are answered and only
then signals it.  A replica signalled behind HAProxy's back refuses the calls sent to it until the
next check (at most one ``check_interval_ms``): clients that retry UNAVAILABLE
(``RETRY_SERVICE_CONFIG``, gRPC's own retry policy) never see those refusals.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loadtest import ROOT
from loadtest.launch.server_process import ServerProcess

TEMPLATE = ROOT / "deploy" / "haproxy" / "haproxy.cfg.template"
BACKEND = "yayi"
REPLICA_HEADER = "x-yayi-replica"  # set by HAProxy on every response: the server line's name

# gRPC's retry policy for callers behind the proxy: a refused call (UNAVAILABLE before any
# response) did no work, so trying again is safe; gRPC never retries a stream that already
# received a message.  Backoffs are drawn between 0 and the current bound, which doubles:
# four retries span about 1.9 s on average, well past one health-check interval.
RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": "yayi.serving.v1.Inference"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.25s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
RETRY_CHANNEL_OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG))]


class HAProxyMissing(RuntimeError):
    """No haproxy binary: Debian's package provides it (`make haproxy` installs it)."""


def find_haproxy() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def replica_env(count: int, threads: int | None) -> dict[str, str]:
    """Each replica's share of the CPU cores for torch's thread pool (OMP_NUM_THREADS).

    Left alone, every replica's torch starts one busy-waiting thread per core: two replicas on this
    2-core machine then generated 3 to 12 tokens/s each against 220 to 280 with one thread each.
    An OMP_NUM_THREADS set by the caller wins.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(threads or max(1, (os.cpu_count() or 1) // count))}


def draining(server: ServerProcess) -> bool:
    return any(line.startswith("yayi-serve: draining") for line in server.lines)


@dataclass
class Replica:
    name: str  # HAProxy's server name, and what REPLICA_HEADER says
    server: ServerProcess

    @property
    def ports(self) -> dict[str, int]:
        return {"grpc": self.server.port, "http": self.server.http_port, "metrics": self.server.metrics_port}


class Replicas:
    def __init__(
        self,
        count: int,
        serve_args: list[str],
        host: str = "127.0.0.1",
        port: int = 0,
        check_interval_ms: int = 500,
        grace_period_s: float = 30.0,
        stream_timeout: str = "10m",
        workdir: Path | None = None,
        ready_timeout: float = 240.0,
        threads_per_replica: int | None = None,
    ) -> None:
        if count < 1:
            raise ValueError("at least one replica")
        self.haproxy_binary = find_haproxy()
        if self.haproxy_binary is None:
            raise HAProxyMissing("haproxy not found: `make haproxy` installs Debian's package")
        self.count = count
        self.serve_args = [*serve_args, "--grace-period", f"{grace_period_s:g}"]
        self.host = host
        self.port = port or free_port(host)
        self.stats_port = free_port()
        self.check_interval_ms = check_interval_ms
        self.grace_period_s = grace_period_s
        self.stream_timeout = stream_timeout
        self.ready_timeout = ready_timeout
        self.env = replica_env(count, threads_per_replica)
        # Kept after stop(): HAProxy's log says which replica served what and when it went DOWN.
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="yayi-replicas-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "haproxy.cfg"
        self.log_path = self.workdir / "haproxy.log"
        self.stats_socket = self.workdir / "haproxy.sock"
        if len(str(self.stats_socket)) > 100:  # a Unix socket's path holds at most 107 bytes
            self.stats_socket = Path(tempfile.mkdtemp(prefix="yayi-haproxy-")) / "haproxy.sock"
        self.replicas: list[Replica] = []
        self.haproxy: subprocess.Popen | None = None
        self._log = None

    # ---- start and stop ------------------------------------------------------------------------

    def start(self) -> Replicas:
        try:
            # Side by side: each start is mostly imports and loading the model.
            with ThreadPoolExecutor(self.count) as pool:
                starts = [pool.submit(self._start_server, []) for _ in range(self.count)]
            # Those that started are stopped again (by stop() below) when another one failed.
            self.replicas = [Replica(f"r{i}", s.result()) for i, s in enumerate(starts) if not s.exception()]
            for s in starts:
                if s.exception():
                    raise s.exception()
            self.config_path.write_text(self.render_config())
            self._log = open(self.log_path, "w")
            # -db: in the foreground, so it is our child and dies with stop().
            # Its own session: a Ctrl-C meant for the launcher must not stop HAProxy before the replicas drain.
            self.haproxy = subprocess.Popen(
                [self.haproxy_binary, "-db", "-f", str(self.config_path)],
                stdout=subprocess.DEVNULL,
                stderr=self._log,
                start_new_session=True,
            )
            for index in range(self.count):
                self.wait_state(index, "UP", timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_server(self, port_args: list[str]) -> ServerProcess:
        # --http-port 0: the HTTP front end's GET /health is what HAProxy checks.
        server = ServerProcess(
            *self.serve_args, "--http-port", "0", *port_args, ready_timeout=self.ready_timeout, env=self.env
        )
        try:
            return server.wait_ready(self.ready_timeout)
        except BaseException:
            server.process.kill()
            raise

    def stop(self) -> None:
        """SIGTERM every replica at once (each drains its calls), then HAProxy."""
        alive = [r.server for r in self.replicas if r.server.process.poll() is None]
        for server in alive:
            # Not twice: a second signal makes yayi-serve exit at once, cutting its drain short (a
            # Ctrl-C in the terminal has already reached every replica of the process group).
            if not draining(server):
                server.signal(signal.SIGTERM)
        for server in alive:
            try:
                server.process.wait(self.grace_period_s + 15)
            except subprocess.TimeoutExpired:
                server.process.kill()
        for replica in self.replicas:
            replica.server.stop()  # closes its channel; the process has ended
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> Replicas:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- HAProxy's configuration and runtime API -----------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def render_config(self) -> str:
        servers = "\n".join(
            f"    server {r.name} 127.0.0.1:{r.ports['grpc']} proto h2 port {r.ports['http']} check-proto h1"
            for r in self.replicas
        )
        return string.Template(TEMPLATE.read_text()).substitute(
            stats_socket=self.stats_socket,
            stream_timeout=self.stream_timeout,
            check_timeout=f"{max(1000, 2 * self.check_interval_ms)}ms",
            host=self.host,
            port=self.port,
            check_interval=f"{self.check_interval_ms}ms",
            servers=servers,
            stats_port=self.stats_port,
        )

    def command(self, line: str) -> str:
        """One command on HAProxy's runtime API (the stats socket)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` for the backend's servers, by server name (status, scur, stot, ...)."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = (dict(zip(header, line.split(","))) for line in lines[1:] if line)
        return {row["svname"]: row for row in rows if row["pxname"] == BACKEND and row["svname"] != "BACKEND"}

    def state(self, index: int) -> str:
        """HAProxy's status of the replica: UP, DOWN, DRAIN, MAINT, or a transition such as "DOWN 1/2".

        "UP" only once a health check has passed: HAProxy starts every server UP before checking it.
        """
        row = self.stats()[self.replicas[index].name]
        if row["status"] == "UP" and row["check_status"] != "L7OK":
            return "UP, unchecked"
        return row["status"]

    def wait_state(self, index: int, wanted: str, timeout: float) -> float:
        """Seconds until HAProxy reports ``wanted`` for the replica; TimeoutError with the log's tail."""
        started = time.monotonic()
        while True:
            try:
                if self.state(index) == wanted:
                    return time.monotonic() - started
            except OSError:
                pass  # the socket is not there yet
            if self.haproxy is not None and self.haproxy.poll() is not None:
                raise RuntimeError(f"haproxy exited ({self.haproxy.returncode}):\n{self.log_tail()}")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{self.replicas[index].name} not {wanted} after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # ---- one replica -----------------------------------------------------------------------------

    def kill(self, index: int) -> None:
        """SIGKILL: the replica vanishes mid-call, as on a crash or an OOM kill."""
        process = self.replicas[index].server.process
        process.kill()
        process.wait()

    def drain(self, index: int) -> int:
        """Take the replica out gracefully: no new calls from HAProxy, its calls finished, then SIGTERM.

        After the state change HAProxy sends no new call to it, so nothing meets the refusals of a
        draining server.  The signal then waits, up to the grace period, until HAProxy has no call
        open to it, each answered to the end (status included): the server's own drain, which ends
        when its handlers return, can stop the transport before the last one's status has left.
        Returns the replica's exit code.
        """
        replica = self.replicas[index]
        self.take_out(index)
        deadline = time.monotonic() + self.grace_period_s
        while self.forwarded(index) and time.monotonic() < deadline:
            time.sleep(0.02)
        replica.server.signal(signal.SIGTERM)
        return replica.server.process.wait(self.grace_period_s + 15)

    def take_out(self, index: int) -> None:
        """HAProxy sends the replica no new call (state drain); the calls it has carry on."""
        self.command(f"set server {BACKEND}/{self.replicas[index].name} state drain")

    def forwarded(self, index: int) -> int:
        """Calls HAProxy has open to the replica now."""
        return int(self.stats()[self.replicas[index].name]["scur"])

    def restart(self, index: int) -> None:
        """Start the replica again on the same ports, so HAProxy's server line finds it; wait until UP."""
        replica = self.replicas[index]
        ports = replica.ports
        replica.server.stop()
        replica.server = self._start_server(
            ["--port", str(ports["grpc"]), "--http-port", str(ports["http"]), "--metrics-port", str(ports["metrics"])]
        )
        # A drained server stays drained (an admin state) until told otherwise.
        self.command(f"set server {BACKEND}/{replica.name} state ready")
        self.wait_state(index, "UP", timeout=30)

    def describe(self) -> str:
        threads = self.env.get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "torch's default"))
        lines = [
            f"yayi-serve: {self.count} replicas behind HAProxy; call gRPC (h2c) at {self.address}",
            f"  each replica: {' '.join(self.serve_args)}, OMP_NUM_THREADS={threads}",
        ]
        for r in self.replicas:
            p = r.ports
            lines.append(
                f"  {r.name}: grpc 127.0.0.1:{p['grpc']}, health http://127.0.0.1:{p['http']}/health, "
                f"metrics http://127.0.0.1:{p['metrics']}/metrics"
            )
        lines.append(
            f"  HAProxy: stats http://127.0.0.1:{self.stats_port}/, metrics http://127.0.0.1:{self.stats_port}/metrics,"
            f" config {self.config_path}, log {self.log_path}"
        )
        return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.launch.replicas",
        description="N yayi-serve replicas behind HAProxy on this machine; yayi-serve's flags follow `--`.",
    )
    parser.add_argument("--replicas", "-n", type=int, default=2)
    parser.add_argument("--host", default="127.0.0.1", help="where HAProxy listens (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=50050, help="HAProxy's gRPC port (0: a free one)")
    parser.add_argument("--check-interval-ms", type=int, default=500, help="HAProxy's /health check period")
    parser.add_argument("--grace-period", type=float, default=30.0, help="each replica's drain grace, seconds")
    parser.add_argument(
        "--threads-per-replica",
        type=int,
        help="torch threads of each replica (OMP_NUM_THREADS; default: the CPU cores shared out)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    serve_args = argv[split + 1 :]
    stop = False

    def on_signal(signum, frame) -> None:
        nonlocal stop
        stop = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    replicas = Replicas(
        args.replicas,
        serve_args,
        host=args.host,
        port=args.port,
        check_interval_ms=args.check_interval_ms,
        grace_period_s=args.grace_period,
        threads_per_replica=args.threads_per_replica,
    )
    with replicas:
        print(replicas.describe(), flush=True)
        states = {}
        while not stop:
            # Say when HAProxy takes a replica out or puts it back, as its log does.
            current = {name: row["status"] for name, row in replicas.stats().items()}
            for name, status in current.items():
                if states and states.get(name) != status:
                    print(f"yayi-serve replicas: {name} {states.get(name)} -> {status}", flush=True)
            states = current
            time.sleep(0.5)
        print("yayi-serve replicas: stopping (each replica drains its calls)", flush=True)
        # A Ctrl-C reached the replicas too; let them say so before stop() decides whom to signal.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not all(draining(r.server) for r in replicas.replicas):
            time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
