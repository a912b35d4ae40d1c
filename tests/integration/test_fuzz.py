"""Property-based requests against a running server: whatever a client sends, the answer is a
result or a status naming the client's mistake, never INTERNAL or UNKNOWN, never a dead
server, never a chunk that is not UTF-8."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.grpc.wire import SERVICE_NAME, pb
from tests.helpers.observe import raw_stream

UINT32 = 2**32 - 1
# Only the client's own doing: an oversized generation may run out of time, nothing else.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 10

texts = st.text(max_size=120)  # any code point but surrogates, which protobuf cannot carry
prompts = st.one_of(
    texts, st.builds(lambda word, n: word * n, st.sampled_from(["word ", "中文", "🚀", " "]), st.integers(0, 1500))
)
# Edges where arithmetic breaks (a vanishing temperature once overflowed the sampler), valid
# values so other fields do not mask a field's bug, and any float32 at all.
edges = st.sampled_from(
    [
        0.0,
        -0.0,
        1e-45,
        1e-40,
        1e-6,
        1e-5,
        0.01,
        0.5,
        1.0,
        2.0,
        2.0000002,
        100.0,
        3.4e38,
        float("inf"),
        float("-inf"),
        float("nan"),
    ]
)


def floats(low: float, high: float):
    return st.one_of(edges, st.floats(low, high, width=32), st.floats(width=32))


def optional(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    fields = {
        # Valid lengths stay short so the test stays fast; the large branch is always past the context.
        "max_new_tokens": draw(optional(st.one_of(st.integers(0, 24), st.integers(1024, UINT32)))),
        "temperature": draw(optional(floats(0, 2))),
        "top_p": draw(optional(floats(0, 1))),
        "top_k": draw(optional(st.one_of(st.integers(0, 100), st.integers(0, UINT32)))),
        "repetition_penalty": draw(optional(floats(0, 3))),
        "seed": draw(optional(st.integers(0, 2**64 - 1))),
    }
    message = pb.SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    message.stop.extend(draw(st.lists(st.text(max_size=40), max_size=20)))
    message.ignore_eos = draw(st.booleans())
    return message


requests = st.builds(
    pb.GenerateRequest,
    request_id=st.text(max_size=300),
    prompt=prompts,
    params=sampling_params(),
    use_chat_template=st.booleans(),
)


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=requests, streamed=st.booleans())
def test_any_request_gets_a_result_or_a_client_error(tiny_server, message, streamed):
    code, chunks = grpc.StatusCode.OK, []
    try:
        if streamed:
            chunks = [pb.GenerateChunk.FromString(raw) for raw in raw_stream(tiny_server, message, CALL_TIMEOUT_S)]
        else:
            unary = tiny_server.channel.unary_unary(
                f"/{SERVICE_NAME}/Generate", request_serializer=pb.GenerateRequest.SerializeToString
            )
            chunks = [pb.GenerateResponse.FromString(unary(message, timeout=CALL_TIMEOUT_S))]
    except grpc.RpcError as error:
        code = error.code()
        assert code in ALLOWED, f"{code}: {error.details()}"
        assert error.details(), "an error must say what was wrong"
    # FromString refuses a string field that is not UTF-8; a lone surrogate would fail here.
    for chunk in chunks:
        chunk.text.encode("utf-8")
    if code == grpc.StatusCode.OK:
        last = chunks[-1]
        assert last.finish_reason in {"length", "eos", "stop"}
        assert sum(len(c.token_ids) for c in chunks) == last.usage.completion_tokens
    assert tiny_server.process.poll() is None
    assert tiny_server.health_status() == health_pb2.HealthCheckResponse.SERVING
