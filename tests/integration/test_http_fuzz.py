"""Property: whatever JSON or bytes reach any HTTP route, the answer is never a 500, every error is
JSON in OpenAI's shape, and the server goes on serving.

Documents are drawn both free-form and shaped like real requests (the fields the front end
reads, with values of any type), so the fuzzer gets past the first type check into the
sampling values, the messages and the stream options; strings may hold lone surrogates.
"""

from __future__ import annotations

import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.http.app import CHAT, COMPLETIONS, HEALTH, MODELS
from tests.helpers.servers import TINY_KV, served

GET_ROUTES = (HEALTH, MODELS)
POST_ROUTES = (COMPLETIONS, CHAT)
FIELDS = (
    "prompt",
    "messages",
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "repetition_penalty",
    "ignore_eos",
    "n",
    "echo",
    "logprobs",
    "top_logprobs",
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Any code point, surrogates included, and JSON's own escapes for them.
# (hypothesis leaves surrogates out unless asked for by category)
any_text = st.lists(st.characters() | st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]), max_size=20).map(
    "".join
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4))
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]) | values, "content": any_text | values},
    optional={"name": values},
)
VALID = ({"prompt": "hi", "max_tokens": 2}, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
# A valid request with one or two fields changed to anything: past the first refusal, into the rest.
mutated = st.builds(
    lambda base, changes: {**base, **changes},
    st.sampled_from(VALID),
    st.dictionaries(
        st.sampled_from(FIELDS) | st.sampled_from(FIELDS) | any_text,
        any_text
        | values
        | st.lists(message, min_size=1, max_size=3)
        | st.integers(min_value=10**300, max_value=10**301),
        min_size=1,
        max_size=2,
    ),
)
documents = mutated | st.dictionaries(any_text, values, max_size=6) | values


@pytest.fixture(scope="module")
def server():
    yield from served(*TINY_KV, "--http-port", "0", "--max-concurrency", "1", "--max-queue", "4")


def call(server, method: str, path: str, body: bytes | None) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        connection.close()


def check(status: int, content_type: str, body: bytes) -> None:
    assert status < 500 or status == 503, (status, body[:300])
    if content_type.startswith("text/event-stream"):
        for line in body.decode().split("\n\n"):
            if line and line != "data: [DONE]":
                json.loads(line.removeprefix("data: "))
        return
    assert content_type.startswith("application/json"), (status, content_type, body[:300])
    answer = json.loads(body)
    if status >= 400:
        assert set(answer["error"]) == {"message", "type", "param", "code"}, answer


@FUZZ
@given(path=st.sampled_from(POST_ROUTES), document=documents)
def test_any_json_document_gets_a_json_answer_never_a_500(server, path, document):
    check(*call(server, "POST", path, json.dumps(document).encode()))


@FUZZ
@given(path=st.sampled_from(POST_ROUTES + GET_ROUTES), raw=st.binary(max_size=512))
def test_any_bytes_get_a_json_answer_never_a_500(server, path, raw):
    check(*call(server, "GET" if path in GET_ROUTES else "POST", path, raw))


def test_the_server_still_serves_after_the_fuzzing(server):
    status, _, body = call(server, "POST", COMPLETIONS, json.dumps({"prompt": "hi", "max_tokens": 3}).encode())
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] >= 1
    assert not any("Traceback" in line for line in server.lines), "\n".join(server.lines[-40:])
