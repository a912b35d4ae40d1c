"""The HTTP front end's parts in process, without a server: request parsing, and the event
stream's stall and hang-up paths."""

from __future__ import annotations

import pytest

MODEL = "tiny-llama"


def test_request_parsing_types_and_names():
    from engines.errors import InvalidRequest
    from server.http.protocol import FieldError
    from server.http.protocol import generate_call as parse_generate

    call = parse_generate(
        {"prompt": ["one"], "max_tokens": 5, "top_k": -1, "stop": "x", "logprobs": None, "n": 1}, MODEL, chat=False
    )
    assert (call.prompt, call.params.max_new_tokens, call.params.top_k, call.params.stop) == ("one", 5, 0, ("x",))
    for body, param in [
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": True}, "temperature"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": [1, "two"]}, "prompt[0]"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ]:
        with pytest.raises(FieldError) as error:
            parse_generate(body, MODEL, chat="messages" in body)
        assert error.value.field == param, body
        assert isinstance(error.value, InvalidRequest)
    chat = parse_generate(
        {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]},
        MODEL,
        chat=True,
    )
    assert chat.prompt.messages == (("system", "Be brief."), ("user", "hi"))


def test_a_refusal_names_its_field_from_the_error_itself():
    from server.http.protocol import DetokenizeRequest, FieldError, TokenizeRequest, generate_call

    def refused(body: dict, chat: bool = False) -> FieldError:
        with pytest.raises(FieldError) as error:
            generate_call(body, MODEL, chat=chat)
        return error.value

    # A range check of SamplingParams: its InvalidRequest.field, in the body's own words.
    error = refused({"prompt": "x", "max_tokens": 0})
    assert error.field == "max_tokens" and str(error).startswith("max_tokens must be at least 1")
    error = refused({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, chat=True)
    assert error.field == "max_completion_tokens" and "max_new_tokens" not in str(error)
    assert refused({"prompt": "x", "temperature": 9}).field == "temperature"
    # A type error: pydantic's location; strict, so no "5" or true is taken as a number.
    error = refused({"prompt": "x", "temperature": True})
    assert (error.field, str(error)) == ("temperature", "temperature must be a number, got true")
    assert refused({"prompt": "x", "seed": "5"}).field == "seed"
    assert refused({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}).field == (
        "stream_options.include_usage"
    )
    error = refused({"prompt": "x", "temperature": 10**400})
    assert error.field == "temperature" and "out of range" in str(error)
    # An unknown field comes first, named, with what the route takes.
    error = refused({"prompt": "x", "temperature": "hot", "no_such": 1})
    assert error.field == "no_such" and "this server takes" in str(error) and "user" not in str(error)
    assert refused({"prompt": "x", "model": "another"}).field == "model"
    for body, param in [
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "add_special_tokens": 1}, "add_special_tokens"),
        ({"text": "x"}, "text"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ]:
        with pytest.raises(FieldError) as error:
            TokenizeRequest.parse(body, MODEL)
        assert error.value.field == param, body
    tokenize = TokenizeRequest.parse({"messages": [{"role": "user", "content": "hi"}], "prompt": None}, MODEL)
    assert tokenize.messages.messages == (("user", "hi"),) and tokenize.add_generation_prompt
    with pytest.raises(FieldError) as error:
        DetokenizeRequest.parse({"tokens": [1, True]}, MODEL)
    assert error.value.field == "tokens"
    assert DetokenizeRequest.parse({"tokens": [1, 2], "model": MODEL}, MODEL).tokens == [1, 2]


def test_outputs_join_into_the_whole_answer():
    from engines.base import GenerationOutput
    from engines.logprobs import TokenLogprob
    from server.whole_output import WholeOutput

    def entry(token_id: int) -> TokenLogprob:
        return TokenLogprob(token_id=token_id, text=str(token_id), logprob=-1.0, top=())

    whole = WholeOutput()
    whole.add(GenerationOutput("", (5,), 3, 1, logprobs=(entry(5),), prompt_logprobs=(None, entry(1), entry(2))))
    whole.add(GenerationOutput("ab", (6,), 3, 2, logprobs=(entry(6),), prompt_logprobs=()))
    whole.add(GenerationOutput("c", (7,), 3, 3, finish_reason="length", logprobs=(entry(7),)))
    assert (whole.text, whole.token_ids, whole.finish_reason) == ("abc", [5, 6, 7], "length")
    assert [e.token_id for e in whole.logprobs] == [5, 6, 7] and len(whole.prompt_logprobs) == 3
    assert (whole.prompt_tokens, whole.completion_tokens) == (3, 3)


def _stream_parts(never_sent: int | None = None, hang_up_after: float | None = None):
    """An EventStream over a generator shaped like http_app's, with a send that can stop draining."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from server.calls import CallFailed, Calls
    from server.http.stream import EventStream
    from server.metrics import ServerMetrics

    class Engine:
        healthy = True

    metrics = ServerMetrics("test", "test", CollectorRegistry())
    calls = Calls(Engine(), metrics)
    closed = []

    async def events():
        try:
            async with calls.call(metrics.recorder("/v1/completions", api="http")):
                for index in range(1, 1000):
                    await asyncio.sleep(0.01)
                    yield f"data: {index}\n\n".encode()
        except CallFailed as failure:
            assert failure.stalled
            raise  # as http_app's generator does: the stream must not let it escape
        finally:
            closed.append(True)

    sent: list[bytes] = []

    async def send(message):
        if message["type"] == "http.response.body" and len(sent) == never_sent:
            await asyncio.Event().wait()  # a client that stopped reading: the write never drains
        sent.append(message.get("body", b""))

    async def receive():
        if hang_up_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(hang_up_after)
        return {"type": "http.disconnect"}

    def count(status: str) -> float:
        labels = {"engine": "test", "model": "test", "status": status, "method": "/v1/completions", "api": "http"}
        return metrics.registry.get_sample_value("yayi_requests_total", labels) or 0.0

    async def run():
        generator = events()
        first = await anext(generator)
        stream = EventStream(first, generator, {}, stall_timeout_s=0.2, tasks=set(), cut=lambda: None)
        await stream({"type": "http"}, receive, send)

    return run, calls, metrics, count, closed, sent


def test_a_stalled_http_reader_is_cancelled_and_counted():
    import asyncio

    run, calls, metrics, count, closed, sent = _stream_parts(never_sent=4)
    asyncio.run(asyncio.wait_for(run(), 10))
    assert closed and calls.in_flight == 0
    assert count("CANCELLED") == 1 and count("OK") == 0
    assert metrics.registry.get_sample_value("yayi_stream_stalls_total", {"engine": "test", "model": "test"}) == 1


def test_an_http_hang_up_mid_stream_cancels_the_generator():
    import asyncio

    run, calls, _, count, closed, sent = _stream_parts(hang_up_after=0.1)
    asyncio.run(asyncio.wait_for(run(), 10))
    assert closed and calls.in_flight == 0 and count("CANCELLED") == 1
    assert 2 <= len(sent) < 100, "the stream stopped soon after the hang-up"
