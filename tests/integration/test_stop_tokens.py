"""Every end-of-sequence id of a folder's generation_config.json ends a completion on every engine, and a
request's stop_token_ids end it too (finish "stop"), even with ignore_eos."""

from __future__ import annotations

import json
import shutil

import pytest

from engines.models import resolve_model
from loadtest.launch.server_process import ServerProcess
from server.grpc.wire import pb
from tests.helpers.marks import engine_param

PROMPT = "The quick brown fox"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def greedy():
    """tiny-llama's greedy continuation with its own EOS ignored, by transformers' own generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def first_new(tokens: list[int]) -> int:
    """The last position whose token appears there first: generation must end exactly there, before the
    NEW_TOKENS it would otherwise run to (tiny-llama's random weights may repeat one token: then position 0)."""
    return max(k for k in range(len(tokens)) if tokens[k] not in tokens[:k])


@pytest.fixture(scope="module")
def folder(tmp_path_factory, greedy):
    """tiny-llama, its generation_config.json listing one more end-of-sequence id: a token it generates."""
    target = tmp_path_factory.mktemp("eos") / "tiny-llama-extra-eos"
    shutil.copytree(resolve_model("tiny-llama"), target)
    settings = json.loads((target / "generation_config.json").read_text())
    settings["eos_token_id"] = [settings["eos_token_id"], greedy[first_new(greedy)]]
    (target / "generation_config.json").write_text(json.dumps(settings))
    return target


@pytest.fixture(scope="module", params=[engine_param(e) for e in ("hf-kv", "hf-cb", "vllm", "llama-cpp")])
def server(request, folder):
    if request.param == "vllm":
        pytest.importorskip("vllm", reason="vllm is installed by `make venv`")
    if request.param == "llama-cpp":
        from engines.llama_cpp.gguf import llama_cpp_home

        if not (llama_cpp_home() / "bin" / "llama-server").is_file():
            pytest.skip("llama.cpp is built by `make llama-cpp`")
    args = ("--dtype", "float32") if request.param == "llama-cpp" else ()
    server = ServerProcess("--engine", request.param, "--model", str(folder), "--http-port", "0", *args).wait_ready(600)
    yield server
    server.stop()


def test_the_folders_extra_eos_id_ends_generation(server, greedy):
    k = first_new(greedy)
    answer = server.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert list(answer.token_ids) == greedy[: k + 1]
    assert answer.finish_reason == "eos"


def test_stop_token_ids_end_generation_even_with_ignore_eos(server, greedy):
    k = first_new(greedy)
    params = pb.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, stop_token_ids=[greedy[k]])
    answer = server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, params=params), timeout=60)
    assert list(answer.token_ids) == greedy[: k + 1]
    assert answer.finish_reason == "stop"


def test_stop_token_ids_over_http_as_vllm_takes_them(server, greedy):
    import requests

    k = first_new(greedy)
    body = {"model": server_model(server), "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}
    answer = requests.post(
        f"{server.http_url}/v1/completions",
        json={**body, "ignore_eos": True, "stop_token_ids": [greedy[k]]},
        timeout=60,
    ).json()
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == k + 1
    refused = requests.post(f"{server.http_url}/v1/completions", json={**body, "stop_token_ids": [-1]}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stop_token_ids"


def server_model(server) -> str:
    import requests

    return requests.get(f"{server.http_url}/v1/models", timeout=10).json()["data"][0]["id"]
