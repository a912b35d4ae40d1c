"""--chat-template FILE: gives a folder without a template one, replaces a folder's own, and without any
template a chat completion is a 400 that says how to give one."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request

import jinja2
import pytest

from loadtest.launch.server_process import ServerProcess
from tests.helpers.custom_model import build_custom_model
from tests.helpers.servers import run_cli

# YAYI's own turn format.
TEMPLATE = (
    "{% for message in messages %}<|{{ message.role | capitalize }}|>{{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|YaYi|>{% endif %}"
)
MESSAGES = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "yayi.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_custom_model(tmp_path_factory.mktemp("custom") / "yayi")


@contextlib.contextmanager
def serving(*args: str):
    server = ServerProcess(*args).wait_ready(240)
    try:
        yield server
    finally:
        server.stop()


def post(url: str, body: dict) -> tuple[int, dict]:
    call = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def chat(server) -> tuple[int, dict]:
    return post(server.http_url + "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})


def test_without_a_template_chat_is_a_400_that_says_how_to_give_one(folder):
    with serving("--engine", "hf-kv", "--model", str(folder), "--trust-remote-code", "--http-port", "0") as server:
        status, body = chat(server)
        assert status == 400
        assert "--chat-template FILE" in body["error"]["message"]


def test_a_template_file_serves_a_folder_that_has_none(folder, template_file):
    args = ("--engine", "hf-kv", "--model", str(folder), "--trust-remote-code", "--http-port", "0")
    with serving(*args, "--chat-template", str(template_file)) as server:
        status, body = chat(server)
        assert status == 200 and body["usage"]["completion_tokens"] == 2
        status, info = post(server.http_url + "/tokenize", {"messages": MESSAGES})
        assert status == 200 and info["count"] > 0


def test_a_template_file_replaces_the_models_own(template_file):
    from transformers import AutoTokenizer

    from engines.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))
    own = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ours = jinja2.Environment().from_string(TEMPLATE).render(messages=MESSAGES, add_generation_prompt=True)
    assert own != ours
    args = ("--engine", "hf-kv", "--model", "tiny-llama", "--http-port", "0")
    with serving(*args, "--chat-template", str(template_file)) as server:
        status, info = post(server.http_url + "/tokenize", {"messages": MESSAGES})
        assert status == 200 and tokenizer.decode(info["tokens"]) == ours
        status, body = chat(server)
        assert status == 200 and body["usage"]["prompt_tokens"] == info["count"]


def test_a_file_that_is_not_jinja_is_refused_before_loading(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for message in messages %}")
    done = run_cli("--engine", "hf-kv", "--model", "tiny-llama", "--chat-template", str(bad), timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"yayi-serve: error: --chat-template {bad}: not a Jinja")
