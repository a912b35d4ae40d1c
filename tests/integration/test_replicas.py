"""Two real replicas of tiny-llama (hf-kv) behind a real HAProxy, on 127.0.0.1 (loadtest/launch/replicas.py).

Balancing (every call counted by the replica that served it), a replica killed mid-stream, a
replica drained through HAProxy, and one signalled behind HAProxy's back.  Which replica served a
call comes from the header HAProxy sets on every response (``x-yayi-replica``), checked against the
replicas' own /metrics.  The tests share one set of replicas and run in file order.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import grpc
import pytest

from loadtest import ROOT
from loadtest.launch.replicas import (
    REPLICA_HEADER,
    RETRY_CHANNEL_OPTIONS,
    RETRY_SERVICE_CONFIG,
    Replica,
    Replicas,
    find_haproxy,
    free_port,
)
from loadtest.launch.server_process import open_channel, request
from loadtest.measure import scrape
from server.grpc.wire import pb_grpc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_haproxy() is None, reason="haproxy not installed (Debian package `haproxy`; `make test` installs it)"
    ),
]

SERVE = ["--engine", "hf-kv", "--model", "tiny-llama"]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "yayi-serve.json"
CHECK_INTERVAL_S = 0.5
GENERATING = ("Generate", "GenerateStream")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("replicas")  # HAProxy's config, socket and log
    with Replicas(2, SERVE, check_interval_ms=int(CHECK_INTERVAL_S * 1000), grace_period_s=30, workdir=workdir) as r:
        yield r


@pytest.fixture(scope="module")
def stub(replicas):
    channel = open_channel(replicas.address)
    yield pb_grpc.InferenceStub(channel)
    channel.close()


@dataclass
class Outcome:
    status: str
    replica: str | None  # from HAProxy's header; None when no response header came back
    tokens: int
    started: float
    first_token_at: float | None
    ended: float


def call_stream(
    stub, prompt: str, max_new_tokens: int, progress: dict | None = None, key=None, calls: dict | None = None
) -> Outcome:
    """One stream; ``progress[key]`` gets (replica, time) at its first token, ``calls[key]`` the call."""
    started, first, tokens, status = time.monotonic(), None, 0, "OK"
    call = stub.GenerateStream(request(prompt, max_new_tokens=max_new_tokens, ignore_eos=True), timeout=90)
    if calls is not None:
        calls[key] = call
    try:
        for chunk in call:
            if first is None:
                first = time.monotonic()
                if progress is not None:
                    progress[key] = (dict(call.initial_metadata()).get(REPLICA_HEADER), first)
            tokens += len(chunk.token_ids)
    except grpc.RpcError as error:
        status = error.code().name
    replica = dict(call.initial_metadata() or ()).get(REPLICA_HEADER)
    return Outcome(status, replica, tokens, started, first, time.monotonic())


def call_unary(stub, prompt: str, max_new_tokens: int) -> Outcome:
    started = time.monotonic()
    try:
        response, call = stub.Generate.with_call(
            request(prompt, max_new_tokens=max_new_tokens, ignore_eos=True), timeout=90
        )
    except grpc.RpcError as error:
        return Outcome(error.code().name, None, 0, started, None, time.monotonic())
    replica = dict(call.initial_metadata()).get(REPLICA_HEADER)
    return Outcome("OK", replica, len(response.token_ids), started, started, time.monotonic())


class Load:
    """``users`` threads streaming one call after another through the proxy until stopped."""

    def __init__(self, stub, users: int = 6, max_new_tokens: int = 16) -> None:
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._user, args=(stub, i, max_new_tokens), daemon=True) for i in range(users)
        ]

    def _user(self, stub, index: int, max_new_tokens: int) -> None:
        while not self._stop.is_set():
            self.outcomes.append(call_stream(stub, f"user {index} asks", max_new_tokens))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)


def generating(samples: scrape.Samples, name: str) -> float:
    """A per-method counter summed over the generating methods (health checks and the like left out)."""
    return sum(scrape.total(samples, name, method=m) or 0.0 for m in GENERATING)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---- the configuration, without starting anything -------------------------------------------------


def test_rendered_config_passes_haproxys_own_check(tmp_path):
    proxy = Replicas(3, SERVE, workdir=tmp_path)
    proxy.replicas = [
        Replica(f"r{i}", SimpleNamespace(port=41000 + i, http_port=42000 + i, metrics_port=43000 + i)) for i in range(3)
    ]
    config = proxy.render_config()
    assert "$" not in config.split("\nglobal", 1)[1], "a template field left unfilled"
    assert f"bind 127.0.0.1:{proxy.port} proto h2" in config
    assert "balance leastconn" in config and "option httpchk GET /health" in config
    for i in range(3):
        assert f"server r{i} 127.0.0.1:{41000 + i} proto h2 port {42000 + i} check-proto h1" in config
    proxy.config_path.write_text(config)
    result = subprocess.run([find_haproxy(), "-c", "-f", str(proxy.config_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the running pair -------------------------------------------------------------------------------


def test_calls_reach_both_replicas_and_every_token_is_counted_once(replicas, stub):
    before = [scrape.read(r.server.metrics_port) for r in replicas.replicas]
    # Unary and streaming calls of different lengths, four at a time: leastconn spreads them.
    jobs = [(i, i % 2 == 0, 3 + i % 9) for i in range(40)]
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda j: (call_stream if j[1] else call_unary)(stub, f"request {j[0]}", j[2]), jobs))
    after = [scrape.read(r.server.metrics_port) for r in replicas.replicas]

    assert [o.status for o in outcomes] == ["OK"] * 40
    served = {
        r.name: generating(a, "yayi_requests_total") - generating(b, "yayi_requests_total")
        for r, b, a in zip(replicas.replicas, before, after)
    }
    assert all(count > 0 for count in served.values()), served
    assert sum(served.values()) == 40
    # The header says which replica answered; each replica's own counter agrees.
    assert Counter(o.replica for o in outcomes) == served
    # `or 0`: a counter's series appears with its first increment.
    counted = sum(
        (scrape.total(a, "yayi_generation_tokens_total") or 0) - (scrape.total(b, "yayi_generation_tokens_total") or 0)
        for b, a in zip(before, after)
    )
    received = sum(o.tokens for o in outcomes)
    assert received == counted == sum(j[2] for j in jobs)
    print(f"\nserved per replica: {served}; tokens received {received}, counted by the replicas {counted:g}")


def prometheus_scraping(targets: list[str], workdir) -> tuple[subprocess.Popen, str]:
    """A real Prometheus scraping ``targets`` every second; its process and URL once ready."""
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: yayi-serve\n"
        f"    static_configs:\n      - targets: {json.dumps(targets)}\n"
    )
    process = subprocess.Popen(
        [
            shutil.which("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _ready(url), 60, "prometheus ready")
    return process, url


def _ready(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/-/ready", timeout=1)
        return True
    except OSError:
        return False


def query(url: str, expr: str) -> list[dict]:
    answer = json.loads(urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}").read())
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


@pytest.mark.skipif(not shutil.which("prometheus"), reason="no prometheus (Debian package: `make test` installs it)")
def test_dashboard_shows_each_replica(replicas, stub, tmp_path):
    targets = [f"127.0.0.1:{r.server.metrics_port}" for r in replicas.replicas]
    process, url = prometheus_scraping(targets, tmp_path)
    try:
        with Load(stub, users=4):
            # A few scrapes of each replica under load, so every rate() has two samples or more.
            wait_for(lambda: len(query(url, "count_over_time(yayi_requests_running[1m]) >= 4")) == 2, 60, "scrapes")
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "instance" in t["expr"]]
        assert len(exprs) >= 5
        for expr in exprs:
            instances = {series["metric"].get("instance") for series in query(url, expr)}
            assert instances == set(targets), (expr, instances)
        share = query(url, next(e for e in exprs if "scalar(" in e))
        assert sum(float(s["value"][1]) for s in share) == pytest.approx(1.0)
    finally:
        process.terminate()
        process.wait(20)


def test_sigkill_fails_only_the_streams_it_was_sending_and_traffic_returns(replicas, stub):
    victim, survivor = (r.name for r in replicas.replicas)
    progress: dict[str, tuple[str, float]] = {}
    calls: dict[str, grpc.Call] = {}

    def marked_down() -> float:
        replicas.wait_state(0, "DOWN", timeout=10)
        return time.monotonic()

    with ThreadPoolExecutor(7) as pool:
        # A long stream on each replica (leastconn: the second goes to the idle one), then four short
        # ones, two queued behind each long one: hf-kv generates one request at a time, and a queued
        # stream has had no response yet. The kill follows the victim's first token at once: even
        # at this machine's quietest, 1000 tokens take far longer than that.
        longs = [pool.submit(call_stream, stub, f"long {i}", 1000, progress, f"long {i}", calls) for i in range(2)]
        wait_for(lambda: replicas.forwarded(0) + replicas.forwarded(1) == 2, 30, "both long streams placed")
        shorts = [pool.submit(call_stream, stub, f"short {i}", 24) for i in range(4)]
        wait_for(lambda: any(r == victim for r, _ in progress.values()), 60, f"a token streamed from {victim}")
        killed_at = time.monotonic()
        replicas.kill(0)
        down = pool.submit(marked_down)
        # The survivor's long stream has shown what it had to; stopping it lets the queue behind it go.
        wait_for(lambda: len(progress) == 2, 60, "both long streams streaming")
        assert {r for r, _ in progress.values()} == {victim, survivor}
        calls[next(k for k, (r, _) in progress.items() if r == survivor)].cancel()
        # Calls made after the kill, some of them before HAProxy has noticed: none may fail.
        later = [call_unary(stub, f"after the kill {i}", 4) for i in range(8)]
        down_after = down.result()
        outcomes = {f"long {i}": f.result() for i, f in enumerate(longs)}
        short_outcomes = [f.result() for f in shorts]

    cut = outcomes[next(k for k, (r, _) in progress.items() if r == victim)]
    # HAProxy ends a stream whose server vanished with END_STREAM and no grpc-status, which gRPC
    # reports as UNKNOWN ("Stream removed"); a direct connection would have given UNAVAILABLE.
    assert cut.status in ("UNKNOWN", "UNAVAILABLE") and cut.replica == victim and 0 < cut.tokens < 1000, cut
    # The victim's queued streams had no response yet: HAProxy retried them on the survivor.
    assert [(o.status, o.replica) for o in short_outcomes] == [("OK", survivor)] * 4, short_outcomes
    assert [(o.status, o.replica) for o in later] == [("OK", survivor)] * 8
    assert down_after - killed_at <= CHECK_INTERVAL_S + 1.0, f"DOWN {down_after - killed_at:.2f}s after the kill"
    print(f"\none stream cut after {cut.tokens} tokens; {victim} DOWN {down_after - killed_at:.2f}s after the kill")

    replicas.restart(0)  # the same ports, so HAProxy's server line finds it
    with ThreadPoolExecutor(4) as pool:
        back = list(pool.map(lambda i: call_unary(stub, f"back {i}", 4), range(12)))
    assert all(o.status == "OK" for o in back)
    assert Counter(o.replica for o in back)[victim] > 0, back


def test_drain_through_haproxy_under_load_fails_nothing(replicas, stub):
    draining = replicas.replicas[0]
    with Load(stub) as load:
        wait_for(lambda: Counter(o.replica for o in load.outcomes)[draining.name] >= 2, 60, "calls on both")
        wait_for(lambda: replicas.forwarded(0) > 0, 30, "calls open on the replica")
        replicas.take_out(0)
        taken_out_at = time.monotonic()
        exit_code = replicas.drain(0)  # its calls answered, then SIGTERM; waits for the exit
        time.sleep(1.0)
    outcomes = load.outcomes
    assert exit_code == 0 and "yayi-serve: drained, exiting" in draining.server.lines
    assert [o.status for o in outcomes if o.status != "OK"] == []
    # Calls it already had finished during the drain; none started afterwards reached it.
    assert any(o.replica == draining.name and o.ended > taken_out_at for o in outcomes)
    assert not any(o.replica == draining.name and o.started > taken_out_at for o in outcomes)
    replicas.restart(0)


def test_sigterm_behind_haproxys_back_fails_nothing_for_clients_that_retry(replicas):
    # No HAProxy drain first: the replica refuses new calls at once while HAProxy still sends it
    # some until its next check sees the 503; gRPC's retry policy on UNAVAILABLE absorbs those.
    channel = open_channel(replicas.address, options=RETRY_CHANNEL_OPTIONS)
    retrying = pb_grpc.InferenceStub(channel)
    target = replicas.replicas[0]
    try:
        with Load(retrying) as load:
            wait_for(lambda: Counter(o.replica for o in load.outcomes)[target.name] >= 2, 60, "calls on both")
            sent_before = int(replicas.stats()[target.name]["stot"])
            signalled_at = time.monotonic()
            target.server.signal(signal.SIGTERM)
            replicas.wait_state(0, "DOWN", timeout=10)
            sent_after = int(replicas.stats()[target.name]["stot"])
            assert target.server.process.wait(60) == 0
            time.sleep(1.0)
    finally:
        channel.close()
    outcomes = load.outcomes
    assert [o.status for o in outcomes if o.status != "OK"] == []
    assert any(o.replica == target.name and o.ended > signalled_at for o in outcomes), "in-flight calls finished"
    print(f"\ncalls HAProxy sent to the draining replica before its check saw the 503: {sent_after - sent_before}")


def test_retry_policy_retries_a_refused_call_four_times(replicas):
    # The mechanism the test above relies on, made certain: a replica held draining by a call in
    # flight refuses every attempt, and the replica itself counts them. It is the last replica left.
    last = replicas.replicas[1]
    held = last.server.stream("hold the drain open", max_new_tokens=1000, ignore_eos=True, timeout=120)
    next(held)
    last.server.signal(signal.SIGTERM)
    last.server.wait_for_line("yayi-serve: draining", 30)
    before = scrape.total(scrape.read(last.server.metrics_port), "yayi_requests_total", status="UNAVAILABLE") or 0
    # The policy as shipped but with short backoffs, so every attempt lands while the held call lasts.
    config = copy.deepcopy(RETRY_SERVICE_CONFIG)
    config["methodConfig"][0]["retryPolicy"].update(initialBackoff="0.01s", maxBackoff="0.02s")
    options = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
    channel = open_channel(last.server.address, options=options)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.InferenceStub(channel).Generate(request("refused", max_new_tokens=4), timeout=30)
        after = scrape.total(scrape.read(last.server.metrics_port), "yayi_requests_total", status="UNAVAILABLE")
    finally:
        channel.close()
        held.cancel()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert after - before == RETRY_SERVICE_CONFIG["methodConfig"][0]["retryPolicy"]["maxAttempts"]
    assert last.server.process.wait(60) == 0
