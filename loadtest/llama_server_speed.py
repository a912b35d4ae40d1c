"""The OpenAI speed test (loadtest/openai_speed.py) against llama.cpp's own llama-server.

    locust -f loadtest/llama_server_speed.py --host http://127.0.0.1:8080 --served-model NAME --headless -u 4 -t 60s

The same user, prompts, options and summary, with one difference: every request on a fresh
connection.  llama-server answers a streamed completion with ``Keep-Alive`` and then closes the
connection, so a client that reuses it sees about every other request fail with "Remote end
closed connection without response" (measured on llama.cpp of llama-cpp-python 0.3.36).  Our
llama-cpp engine reaches its own llama-server child the same way, a connection per request; on
the loopback a connection costs a fraction of a millisecond beside requests of tens of them.
"""

from __future__ import annotations

from locust import constant, events, task

from loadtest.openai_user import StreamingOpenAIUser, add_served_model_argument
from loadtest.sample_collector import install
from loadtest.token_stats import RequestSample

collector = install(events, add_served_model_argument)


class LlamaServerSpeedUser(StreamingOpenAIUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        super().on_start()
        self.session.headers["Connection"] = "close"

    @task
    def generate(self) -> None:
        super().generate()

    def record(self, sample: RequestSample) -> None:
        collector.add(sample)
