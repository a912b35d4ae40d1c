"""A model folder with code of its own (auto_map: configuration, model and a slow SentencePiece tokenizer),
built here in seconds (tests/helpers/custom_model.py): refused without --trust-remote-code, served with it by
hf-kv, hf-cb and vllm on both wires, its greedy tokens those of transformers' own generate on the same folder."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from loadtest.launch.server_process import ServerProcess
from server.grpc.wire import pb
from tests.helpers.custom_model import CUSTOM_FILES, build_custom_model
from tests.helpers.marks import engine_param
from tests.helpers.observe import metric
from tests.helpers.servers import run_cli

PROMPT = "雅意模型的分词器把数字 2024 切成"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_custom_model(tmp_path_factory.mktemp("custom") / "yayi")


@pytest.fixture(scope="module")
def reference(folder):
    """The prompt's ids and transformers' own greedy continuation of them, on the folder's own classes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    assert type(tokenizer).__name__ == "YayiTokenizer" and type(model).__name__ == "YayiForCausalLM"
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist(), tokenizer


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


@pytest.fixture(scope="module", params=[engine_param(e) for e in ("hf-kv", "hf-cb", "vllm")])
def server(request, folder):
    if request.param == "vllm":
        pytest.importorskip("vllm", reason="vllm is installed by `make venv`")
    server = ServerProcess(
        "--engine", request.param, "--model", str(folder), "--trust-remote-code", "--http-port", "0"
    ).wait_ready(600)
    yield server
    server.stop()


def test_it_says_that_custom_code_ran(server):
    info = server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert list(info.custom_code) == list(CUSTOM_FILES)
    assert any("custom_code=" + ",".join(CUSTOM_FILES) in line for line in server.lines)
    labels = {"custom_code": ",".join(CUSTOM_FILES)}
    assert metric(server, "yayi_engine_info", **labels) == 1


def test_greedy_tokens_are_transformers_own(server, reference):
    _, expected, tokenizer = reference
    answer = server.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert list(answer.token_ids) == expected
    assert answer.text == tokenizer.decode(expected)


def test_streams_whole_characters(server, reference):
    _, expected, tokenizer = reference
    chunks = list(server.stream(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [i for c in chunks for i in c.token_ids] == expected
    assert "".join(c.text for c in chunks) == tokenizer.decode(expected)
    assert not any("\ufffd" in c.text for c in chunks) or "\ufffd" in tokenizer.decode(expected)


def test_http_tokenize_logprobs_and_token_id_prompts(server, reference):
    prompt_ids, expected, tokenizer = reference
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
