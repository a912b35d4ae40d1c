"""Log-probabilities, echo, token-id prompts and the tokenizer routes on both wires, through a real server:
the openai SDK and raw JSON over HTTP, the generated stub over gRPC, each checked against Score."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import openai
import pytest

from loadtest.launch.server_process import request
from server.grpc.wire import pb
from tests.helpers.observe import metric
from tests.helpers.servers import TINY_KV, served

MODEL = "tiny-llama"
TEXT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def server():
    yield from served(*TINY_KV, "--http-port", "0", "--max-concurrency", "2")


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def post(server, path: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    call = urllib.request.Request(server.http_url + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_echo_log_probabilities_sum_to_score_on_both_wires(server, client):
    total = server.stub.Score(pb.ScoreRequest(text=TEXT), timeout=60)
    answer = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=0, echo=True, logprobs=1)
    logprobs = answer.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert math.isclose(sum(logprobs.token_logprobs[1:]), total.total_logprob, rel_tol=1e-4)
    assert answer.choices[0].text == TEXT and "".join(logprobs.tokens) == TEXT
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert answer.usage.completion_tokens == 0 and answer.usage.prompt_tokens == total.token_count + 1
    scored = server.generate(TEXT, max_new_tokens=0, prompt_logprobs=0)
    assert not scored.prompt_logprobs[0].HasField("logprob")
    assert math.isclose(sum(e.logprob for e in scored.prompt_logprobs[1:]), total.total_logprob, rel_tol=1e-4)


def test_generated_log_probabilities_are_the_greedy_choice_and_agree_across_wires(server, client):
    answer = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=4, logprobs=3, temperature=0)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and "".join(logprobs.tokens) == answer.choices[0].text
    for value, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert value == max(top.values()), "greedy: the chosen token is the most likely one"
        assert len(top) >= 3
    grpc_answer = server.generate(TEXT, max_new_tokens=4, logprobs=3)
    assert [round(e.logprob, 4) for e in grpc_answer.logprobs] == [round(v, 4) for v in logprobs.token_logprobs]
    assert [e.token_id for e in grpc_answer.logprobs] == list(grpc_answer.token_ids)
    assert all(len(e.top) == 3 for e in grpc_answer.logprobs)
    streamed = list(server.stream(TEXT, max_new_tokens=4, logprobs=3))
    assert [round(e.logprob, 4) for c in streamed for e in c.logprobs] == [
        round(e.logprob, 4) for e in grpc_answer.logprobs
    ]


def test_token_id_prompts_are_one_choice_each_in_order_and_each_is_counted(server, client):
    ids = post(server, "/tokenize", {"prompt": TEXT})[1]["tokens"]
    counted = metric(server, "yayi_requests_total", status="OK", api="http", method="/v1/completions")
    prompts = [ids, ids[:4], ids[2:7]]
    answer = client.completions.create(model=MODEL, prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    for choice, prompt in zip(answer.choices, prompts, strict=True):
        assert len(choice.logprobs.token_logprobs) == len(prompt) + 1
    alone = client.completions.create(model=MODEL, prompt=ids[:4], max_tokens=1, echo=True, logprobs=1)
    assert alone.choices[0].logprobs.token_logprobs == pytest.approx(answer.choices[1].logprobs.token_logprobs)
    assert answer.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert metric(server, "yayi_requests_total", status="OK", api="http", method="/v1/completions") == counted + 4
    text_answer = client.completions.create(model=MODEL, prompt=[TEXT, "hello"], max_tokens=2, temperature=0)
    assert len(text_answer.choices) == 2


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": [49152], "max_tokens": 1}, "prompt"),
        ({"prompt": [[1, 2], []], "max_tokens": 1}, "prompt[1]"),
        ({"prompt": [[1, 2], "x", [True]], "max_tokens": 1}, "prompt[2]"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": ["a", "b"], "stream": True}, "prompt"),
    ],
)
def test_bad_prompts_and_logprobs_are_400_naming_the_field(server, body, param):
    status, answer = post(server, "/v1/completions", body)
    assert status == 400 and answer["error"]["param"] == param, answer


def test_chat_log_probabilities(server, client):
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == 3 and all(len(entry.top_logprobs) == 2 for entry in content)
    assert "".join(entry.token for entry in content) == answer.choices[0].message.content
    status, refused = post(
        server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    )
    assert status == 400 and refused["error"]["param"] == "top_logprobs"


def test_a_stream_carries_each_tokens_log_probabilities(client):
    chunks = list(client.completions.create(model=MODEL, prompt=TEXT, max_tokens=5, logprobs=1, stream=True))
    tokens = [
        t for chunk in chunks if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.tokens
    ]
    assert len(tokens) == 5 and "".join(tokens) == "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)


def test_tokenizer_routes_take_vllms_bodies(server):
    status, tokens = post(server, "/tokenize", {"prompt": TEXT, "add_special_tokens": False, "return_token_strs": True})
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
    assert tokens["max_model_len"] == 1024
    status, text = post(server, "/detokenize", {"tokens": tokens["tokens"]})
    assert status == 200 and text == {"prompt": TEXT}
    status, refused = post(server, "/detokenize", {"tokens": [0, 10**9]})
    assert status == 400 and refused["error"]["param"] == "tokens[1]"
    with urllib.request.urlopen(f"{server.http_url}/tokenizer_info", timeout=30) as response:
        info = json.loads(response.read())
    assert info["tokenizer_class"] and info["eos_token"]


def test_every_body_names_its_object(server):
    models = json.loads(urllib.request.urlopen(f"{server.http_url}/v1/models", timeout=30).read())
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1})[1]["object"] == "text_completion"
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert chat[1]["object"] == "chat.completion"


def test_grpc_refuses_out_of_range_logprobs(server):
    import grpc

    with pytest.raises(grpc.RpcError) as error:
        server.stub.Generate(request("hi", logprobs=21), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in error.value.details()
