"""Every end-of-sequence id of a folder's generation_config.json ends a completion on every engine, and a
request's stop_token_ids end it too (finish "stop"), even with ignore_eos.

hf-kv, hf-cb and vllm serve the custom-code folder (tests/helpers/custom_model.py), whose
generation_config.json lists an extra end-of-sequence id, on the servers the custom-code tests use too;
llama-cpp, which cannot convert that folder's architecture, serves tiny-llama with the same kind of list."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest
import requests

from engines.models import resolve_model
from loadtest.launch.server_process import ServerProcess
from server.grpc.wire import pb
from tests.helpers.custom_model import NEW_TOKENS, PROMPT, first_new


@dataclass(frozen=True)
class Case:
    server: ServerProcess
    prompt: str
    greedy: list[int]  # the engine's library's own greedy tokens, end-of-sequence ids ignored
    stop_at: int  # the position of the folder's extra end-of-sequence id in them


@pytest.fixture(scope="module")
def llama_cpp_case(tmp_path_factory):
    """tiny-llama, its generation_config.json listing one more end-of-sequence id (a token it generates),
    served by llama-cpp in float32, with transformers' own greedy continuation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engines.llama_cpp.gguf import llama_cpp_home

    if not (llama_cpp_home() / "bin" / "llama-server").is_file():
        pytest.skip("llama.cpp is built by `make llama-cpp`")
    source = resolve_model("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    greedy = out[0, ids.shape[1] :].tolist()
    folder = tmp_path_factory.mktemp("eos") / "tiny-llama-extra-eos"
    shutil.copytree(source, folder)
    settings = json.loads((folder / "generation_config.json").read_text())
    settings["eos_token_id"] = [settings["eos_token_id"], greedy[first_new(greedy)]]
    (folder / "generation_config.json").write_text(json.dumps(settings))
    server = ServerProcess(
        "--engine", "llama-cpp", "--model", str(folder), "--http-port", "0", "--dtype", "float32"
    ).wait_ready(600)
    yield Case(server, PROMPT, greedy, first_new(greedy))
    server.stop()


@pytest.fixture
def custom_case(custom_server, custom_reference):
    return Case(custom_server, PROMPT, custom_reference.greedy, custom_reference.stop_at)


def check_the_folders_extra_eos_id_ends_generation(case: Case) -> None:
    answer = case.server.generate(case.prompt, max_new_tokens=NEW_TOKENS)
    assert list(answer.token_ids) == case.greedy[: case.stop_at + 1]
    assert answer.finish_reason == "eos"


def check_stop_token_ids_end_generation_even_with_ignore_eos(case: Case) -> None:
    k = case.stop_at
    params = pb.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, stop_token_ids=[case.greedy[k]])
    answer = case.server.stub.Generate(pb.GenerateRequest(prompt=case.prompt, params=params), timeout=60)
    assert list(answer.token_ids) == case.greedy[: k + 1]
    assert answer.finish_reason == "stop"


def check_stop_token_ids_over_http_as_vllm_takes_them(case: Case) -> None:
    k, url = case.stop_at, case.server.http_url
    model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": case.prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    answer = requests.post(
        f"{url}/v1/completions", json={**body, "ignore_eos": True, "stop_token_ids": [case.greedy[k]]}, timeout=60
    ).json()
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == k + 1
    refused = requests.post(f"{url}/v1/completions", json={**body, "stop_token_ids": [-1]}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stop_token_ids"


def test_the_folders_extra_eos_id_ends_generation(custom_case):
    check_the_folders_extra_eos_id_ends_generation(custom_case)


def test_stop_token_ids_end_generation_even_with_ignore_eos(custom_case):
    check_stop_token_ids_end_generation_even_with_ignore_eos(custom_case)


def test_stop_token_ids_over_http_as_vllm_takes_them(custom_case):
    check_stop_token_ids_over_http_as_vllm_takes_them(custom_case)


@pytest.mark.llama_cpp
def test_llama_cpp_stops_at_the_folders_extra_eos_id_and_at_stop_token_ids(llama_cpp_case):
    check_the_folders_extra_eos_id_ends_generation(llama_cpp_case)
    check_stop_token_ids_end_generation_even_with_ignore_eos(llama_cpp_case)
    check_stop_token_ids_over_http_as_vllm_takes_them(llama_cpp_case)
