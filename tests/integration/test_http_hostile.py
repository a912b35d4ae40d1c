"""The HTTP front end against clients that mean harm: idle and half-sent sockets, endless headers,
trickled bodies, parser-breaking JSON, floods of bad requests, and a server stopping under load.

Real servers on real ports, spoken to over raw sockets where no well-behaved client would go.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import psutil
import pytest

from loadtest.launch.server_process import ServerProcess
from tests.helpers.observe import metric, wait_until
from tests.helpers.servers import TINY_KV, served

READ_TIMEOUT_S = 2
MAX_CONNECTIONS = 64
HEADER_KB = 8


@pytest.fixture(scope="module")
def server():
    yield from served(
        *TINY_KV,
        "--http-port",
        "0",
        "--max-concurrency",
        "1",
        "--max-queue",
        "4",
        "--http-read-timeout",
        str(READ_TIMEOUT_S),
        "--http-max-connections",
        str(MAX_CONNECTIONS),
        "--http-max-header-kb",
        str(HEADER_KB),
    )


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.http_port), timeout=30)


def exchange(server: ServerProcess, raw: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Sends ``raw`` on a new connection and reads to its close: (status, headers, body)."""
    with connect(server) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while sending: the answer is still there to read
        return parse_response(read_all(sock))


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            return data
        data += chunk
    return data


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), data[:200]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return int(lines[0].split()[1]), headers, body


def dechunk(body: bytes) -> bytes:
    data = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            break
        data, body = data + body[:length], body[length + 2 :]
    return data


def post(path: str, body: bytes, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return (
        b"POST " + path.encode() + b" " + version + b"\r\nhost: test\r\ncontent-type: application/json\r\n"
        b"connection: close\r\n" + extra + b"content-length: %d\r\n\r\n" % len(body) + body
    )


def completion(prompt: str = "hi", **fields) -> bytes:
    return post("/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 2, **fields}).encode())


def openai_error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def closed(server: ServerProcess, reason: str) -> float:
    return metric(server, "yayi_http_connections_closed_total", reason=reason)


def rss(server: ServerProcess) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


# ---- before a request: connections, heads, bodies -------------------------------------------------


def test_hundreds_of_idle_and_half_sent_sockets_never_shut_out_a_caller(server):
    # Past the old bound (256) and past this server's connection cap: 300 that send nothing and
    # 100 that stop half-way through the request line.
    evicted = closed(server, "evicted_idle")
    idle = [connect(server) for _ in range(300)]
    for _ in range(100):
        sock = connect(server)
        sock.sendall(b"POST /v1/compl")
        idle.append(sock)
    try:
        started = time.monotonic()
        status, _, body = exchange(server, b"GET /health HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        assert status == 200 and json.loads(body) == {"status": "SERVING"}
        status, _, body = exchange(server, completion())
        assert status == 200, body
        assert time.monotonic() - started < READ_TIMEOUT_S, "served at once, not after the idle sockets timed out"
        assert closed(server, "evicted_idle") >= evicted + 400 - MAX_CONNECTIONS
    finally:
        for sock in idle:
            sock.close()


def test_a_slowloris_gets_408_at_the_read_timeout_while_a_caller_beside_it_is_served(server):
    timed_out = closed(server, "head_timeout")
    outcome = {}

    def trickle() -> None:
        with connect(server) as sock:
            started = time.monotonic()
            try:
                for byte in completion():
                    sock.sendall(bytes([byte]))
                    time.sleep(0.2)
            except OSError:
                pass  # the server closed it: what it said is read below
            outcome["answer"] = parse_response(read_all(sock))
            outcome["after"] = time.monotonic() - started

    slowloris = threading.Thread(target=trickle)
    slowloris.start()
    time.sleep(0.5)
    started = time.monotonic()
    status, _, _ = exchange(server, completion())
    served_in = time.monotonic() - started
    slowloris.join(30)
    assert status == 200 and served_in < 1.5, f"a caller beside the slowloris waited {served_in:.1f} s"
    status, headers, body = outcome["answer"]
    assert status == 408 and headers["connection"] == "close"
    assert openai_error(body)["code"] == "DEADLINE_EXCEEDED" and "--http-read-timeout" in openai_error(body)["message"]
    assert READ_TIMEOUT_S - 0.5 < outcome["after"] < READ_TIMEOUT_S + 3, "trickling bytes did not extend the deadline"
    assert closed(server, "head_timeout") == timed_out + 1


@pytest.mark.parametrize("size", [HEADER_KB * 1024 + 1, 1 << 20])
def test_a_head_over_the_bound_is_431_however_it_is_split(server, size):
    status, _, body = exchange(server, completion().replace(b"\r\n\r\n", b"\r\nx-pad: " + b"a" * size + b"\r\n\r\n"))
    assert status == 431 and "--http-max-header-kb" in openai_error(body)["message"]
    status, _, _ = exchange(server, completion().replace(b"\r\n\r\n", b"\r\nx-pad: " + b"a" * 4096 + b"\r\n\r\n"))
    assert status == 200, "a head under the bound is served"


def test_an_endless_header_holds_no_memory(server):
    before = rss(server)
    started = time.monotonic()
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nx-endless: ")
        refused = False
        while not refused and time.monotonic() - started < 20:
            try:
                sock.sendall(b"a" * (1 << 20))
            except OSError:
                refused = True  # what arrives after the refusal is dropped, then the socket closed
    assert refused, "the server kept reading one endless header for 20 s"
    assert rss(server) - before < 20 << 20


def test_a_trickled_body_gets_408_and_is_counted(server):
    before = metric(server, "yayi_requests_total", status="DEADLINE_EXCEEDED", api="http", method="/v1/completions")
    head = (
        b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
    )
    status, headers, body = exchange(server, head + b'{"pro', timeout=READ_TIMEOUT_S + 10)
    assert status == 408 and headers["connection"] == "close"
    assert openai_error(body)["code"] == "DEADLINE_EXCEEDED"
    after = metric(server, "yayi_requests_total", status="DEADLINE_EXCEEDED", api="http", method="/v1/completions")
    assert after == before + 1


@pytest.mark.slow
def test_when_every_connection_is_working_a_new_one_is_refused_with_503():
    server = ServerProcess(
        *TINY_KV, "--http-port", "0", "--max-concurrency", "1", "--max-queue", "2", "--http-max-connections", "2"
    ).wait_ready()
    try:
        streams = [connect(server) for _ in range(2)]
        for sock in streams:
            sock.sendall(completion(max_tokens=1000, ignore_eos=True, stream=True))
        assert wait_until(lambda: metric(server, "yayi_requests_running") == 1, 10)
        status, _, body = exchange(server, completion())
        assert status == 503 and "--http-max-connections" in openai_error(body)["message"]
        for sock in streams:
            sock.close()
        assert wait_until(lambda: metric(server, "yayi_requests_running") == 0, 10)
        status, _, _ = exchange(server, completion())
        assert status == 200, "room again once the working connections closed"
    finally:
        server.stop()


# ---- bodies no parser should choke on -------------------------------------------------------------

ZEROS = "0" * 400
SURROGATE = "\\ud800"


@pytest.mark.parametrize(
    "path, raw, param",
    [
        ("/v1/completions", f'{{"prompt": "hi", "temperature": 1{ZEROS}}}', "temperature"),
        ("/v1/completions", f'{{"prompt": "hi", "top_p": 1{ZEROS}}}', "top_p"),
        ("/v1/completions", f'{{"prompt": "hi", "repetition_penalty": 1{ZEROS}}}', "repetition_penalty"),
        ("/v1/completions", '{"prompt": "hi", "temperature": NaN}', None),
        ("/v1/completions", '{"prompt": "hi", "temperature": 1e999}', "temperature"),
        ("/v1/completions", "[" * 100_000, None),
        ("/v1/completions", '{"prompt": ' + "[" * 995 + "]" * 995 + "}", None),
        ("/v1/completions", f'{{"prompt": "a{SURROGATE}b"}}', "prompt"),
        ("/v1/completions", f'{{"prompt": "hi", "{SURROGATE}": 1}}', SURROGATE),
        ("/v1/completions", f'{{"prompt": "hi", "stream": true, "stream_options": {{"{SURROGATE}": 1}}}}', None),
        ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}', None),
        ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "hi", "{SURROGATE}": 1}}]}}', None),
    ],
)
def test_malformed_json_is_a_400_in_openais_shape_never_a_500(server, path, raw, param):
    status, headers, body = exchange(server, post(path, raw.encode(), b"x-request-id: hostile-1\r\n"))
    assert status == 400, body[:300]
    error = openai_error(body)
    assert error["type"] == "invalid_request_error" and error["code"] == "INVALID_ARGUMENT"
    if param is not None:
        assert error["param"] == param
    assert headers["x-request-id"] == "hostile-1"


def test_the_context_overflow_names_max_tokens(server):
    status, _, body = exchange(server, completion(max_tokens=5000))
    error = openai_error(body)
    assert status == 400 and error["param"] == "max_tokens" and "max_tokens=5000" in error["message"]
    assert "max_new_tokens" not in error["message"]


def test_unknown_routes_and_methods_and_oversize_bodies_answer_in_openais_shape(server):
    status, _, body = exchange(server, b"GET /v2/nothing HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
    assert status == 404 and openai_error(body)["code"] == "NOT_FOUND"
    status, _, body = exchange(server, b"GET /v1/completions HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
    assert status == 405 and openai_error(body)["type"] == "invalid_request_error"
    status, _, body = exchange(server, completion("x" * (2 << 20)))
    assert status == 413 and openai_error(body)["type"] == "invalid_request_error"


def test_an_http_1_0_stream_is_not_chunked(server):
    status, headers, body = exchange(
        server, post("/v1/completions", b'{"prompt": "hi", "max_tokens": 3, "stream": true}', version=b"HTTP/1.0")
    )
    assert status == 200 and "transfer-encoding" not in headers, headers
    assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n"), "the body runs to the close, unframed"


# ---- memory on error paths ------------------------------------------------------------------------


def test_thousands_of_bad_requests_leave_no_memory_behind(server):
    big = "x " * 200_000  # 400 kB: each refused body would be held until a full collection
    bodies = [
        ("/v1/completions", {"prompt": big, "temperature": 5}),
        ("/v1/completions", {"prompt": big, "n": 2}),
        ("/v1/completions", {"prompt": big, "model": "another"}),
        ("/v1/completions", {"prompt": big, "max_tokens": 100_000}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 10_000, "top_p": 0}),
        ("/v1/completions", {"prompt": "y" * 900_000, "top_k": -5}),  # just under --max-receive-mb
    ]
    import http.client

    def one_round(count: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
        for index in range(count):
            path, body = bodies[index % len(bodies)]
            connection.request(
                "POST", path, body=json.dumps(body).encode(), headers={"content-type": "application/json"}
            )
            response = connection.getresponse()
            response.read()
            assert response.status == 400, response.status
            if response.getheader("connection") == "close":
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
        connection.close()

    one_round(60)  # the first requests grow the allocator's pools; what follows must not grow
    settled = rss(server)
    for _ in range(3):
        one_round(300)
    grown = rss(server) - settled
    assert grown < 80 << 20, f"RSS grew {grown >> 20} MB over 900 refused requests"


# ---- the drain's end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_past_the_grace_period_a_queued_call_gets_503_and_a_stream_its_error_event():
    server = ServerProcess(
        *TINY_KV, "--http-port", "0", "--max-concurrency", "1", "--max-queue", "2", "--grace-period", "1"
    ).wait_ready()
    stream_sock = connect(server)
    queued_sock = connect(server)
    try:
        stream_sock.sendall(completion(max_tokens=1000, ignore_eos=True, stream=True))
        assert wait_until(lambda: metric(server, "yayi_requests_running") == 1, 10)
        queued_sock.sendall(completion(max_tokens=4))
        assert wait_until(lambda: metric(server, "yayi_requests_waiting") == 1, 10)
        server.signal(signal.SIGTERM)
        queued = parse_response(read_all(queued_sock))
        streamed = parse_response(read_all(stream_sock))
        assert server.process.wait(30) == 0
    finally:
        stream_sock.close()
        queued_sock.close()
        server.stop()
    status, _, body = queued
    assert (
        status == 503
        and openai_error(body)["code"] == "UNAVAILABLE"
        and "--grace-period" in openai_error(body)["message"]
    )
    status, _, body = streamed
    events = [line for line in body.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]", events[-3:]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "UNAVAILABLE"
    logged = "\n".join(server.lines)
    assert "Traceback" not in logged and "Exception in ASGI application" not in logged, logged[-3000:]
