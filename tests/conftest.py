import pytest

from loadtest.launch.server_process import ServerProcess
from tests.helpers.loop_thread import LoopThread
from tests.helpers.marks import engine_param

# Before any test module imports them: the helpers' asserts then show their values as a test's do.
pytest.register_assert_rewrite("tests.helpers.engine_calls", "tests.helpers.observe")


@pytest.fixture(scope="session")
def tiny_server():
    """hf-kv on tiny-llama, one request at a time, a queue of two: shared by the end-to-end tests."""
    server = ServerProcess(
        "--engine", "hf-kv", "--model", "tiny-llama", "--max-concurrency", "1", "--max-queue", "2"
    ).wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smol_server():
    server = ServerProcess("--engine", "hf-kv", "--model", "smollm2-135m").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def custom_reference(tmp_path_factory):
    """A folder with code of its own (tests/helpers/custom_model.py) whose generation_config.json lists an
    extra end-of-sequence id, with transformers' own greedy continuation of the custom tests' prompt."""
    from tests.helpers.custom_model import build_with_reference

    return build_with_reference(tmp_path_factory.mktemp("custom") / "yayi")


@pytest.fixture(scope="session", params=[engine_param(e) for e in ("hf-kv", "hf-cb", "vllm")])
def custom_server(request, custom_reference):
    """That folder served with --trust-remote-code, one engine at a time: the custom-code and the stop-token
    tests share each server (pytest runs every test of one engine before starting the next)."""
    extra: tuple[str, ...] = ()
    if request.param == "vllm":
        pytest.importorskip("vllm", reason="vllm is installed by `make venv`")
        extra = ("--enforce-eager", "true")  # a quicker start; test_vllm's server runs the compiled default
    server = ServerProcess(
        "--engine",
        request.param,
        "--model",
        str(custom_reference.folder),
        "--trust-remote-code",
        "--http-port",
        "0",
        *extra,
    ).wait_ready(600)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def loop():
    """An event loop on its own thread, shared by a module's in-process engine tests."""
    thread = LoopThread()
    yield thread
    thread.close()
