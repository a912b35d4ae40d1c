"""A model folder with code of its own (auto_map: configuration, model and a slow SentencePiece tokenizer),
built here in seconds (tests/helpers/custom_model.py): refused without --trust-remote-code, served with it by
hf-kv, hf-cb and vllm on both wires, its greedy tokens those of transformers' own generate on the same folder."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from server.grpc.wire import pb
from tests.helpers.custom_model import CUSTOM_FILES, NEW_TOKENS, PROMPT, build_custom_model
from tests.helpers.observe import metric
from tests.helpers.servers import run_cli


@pytest.fixture(scope="module")
def folder(custom_reference):
    return custom_reference.folder


def test_a_folder_with_its_own_code_is_refused_without_the_flag(folder):
    for engine in ("hf-kv", "hf-cb", "vllm", "llama-cpp"):
        done = run_cli("--engine", engine, "--model", str(folder), timeout=120)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1] == (
            f"yayi-serve: error: refusing to run the model's own code ({', '.join(CUSTOM_FILES)}) from {folder}: "
            "pass --trust-remote-code if you trust it"
        )
        assert "listening" not in done.stdout, "refused before anything is bound or loaded"


def test_llama_cpp_names_the_architecture_its_converter_cannot_convert(folder):
    from engines.llama_cpp.gguf import llama_cpp_home

    if not (llama_cpp_home() / "src" / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp is built by `make llama-cpp`")
    done = run_cli("--engine", "llama-cpp", "--model", str(folder), "--trust-remote-code", timeout=300)
    assert done.returncode == 1
    assert "llama.cpp's converter cannot convert architecture YayiForCausalLM" in done.stderr.strip().splitlines()[-1]


def test_vllm_says_what_its_transformers_backend_needs_from_auto_map(tmp_path):
    pytest.importorskip("vllm", reason="vllm is installed by `make venv`")
    # As YAYI2's own config.json: AutoConfig and AutoModelForCausalLM, no AutoModel.
    folder = build_custom_model(tmp_path / "yayi", auto_model=False)
    done = run_cli("--engine", "vllm", "--model", str(folder), "--trust-remote-code", timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "through its Transformers backend, which builds the base model with AutoModel" in last, last
    assert '"AutoModel": "<modeling file>.<base model class>"' in last


def test_it_says_that_custom_code_ran(custom_server):
    server = custom_server
    info = server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert list(info.custom_code) == list(CUSTOM_FILES)
    assert any("custom_code=" + ",".join(CUSTOM_FILES) in line for line in server.lines)
    labels = {"custom_code": ",".join(CUSTOM_FILES)}
    assert metric(server, "yayi_engine_info", **labels) == 1


def test_greedy_tokens_are_transformers_own(custom_server, custom_reference):
    expected, tokenizer = custom_reference.greedy, custom_reference.tokenizer
    answer = custom_server.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert list(answer.token_ids) == expected
    assert answer.text == tokenizer.decode(expected)


def test_streams_whole_characters(custom_server, custom_reference):
    expected, tokenizer = custom_reference.greedy, custom_reference.tokenizer
    chunks = list(custom_server.stream(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [i for c in chunks for i in c.token_ids] == expected
    assert "".join(c.text for c in chunks) == tokenizer.decode(expected)
    assert not any("\ufffd" in c.text for c in chunks) or "\ufffd" in tokenizer.decode(expected)


def test_http_tokenize_logprobs_and_token_id_prompts(custom_server, custom_reference):
    server, reference = custom_server, custom_reference
    prompt_ids, expected, tokenizer = reference.prompt_ids, reference.greedy, reference.tokenizer
    call = urllib.request.Request(
        server.http_url + "/tokenize",
        data=json.dumps({"prompt": PROMPT}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(call, timeout=60) as response:
        assert json.loads(response.read())["tokens"] == prompt_ids
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        model = client.models.list().data[0].id
        answer = client.completions.create(
            model=model,
            prompt=prompt_ids,
            max_tokens=NEW_TOKENS,
            temperature=0,
            logprobs=2,
            extra_body={"ignore_eos": True},
        )
    choice = answer.choices[0]
    assert choice.text == tokenizer.decode(expected)
    assert "".join(choice.logprobs.tokens) == choice.text
    assert all(
        value == max(top.values())
        for value, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, strict=True)
    )
