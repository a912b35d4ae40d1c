import pytest

from loadtest.launch.server_process import ServerProcess
from tests.helpers.loop_thread import LoopThread

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


@pytest.fixture(scope="module")
def loop():
    """An event loop on its own thread, shared by a module's in-process engine tests."""
    thread = LoopThread()
    yield thread
    thread.close()
