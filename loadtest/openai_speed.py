"""The same speed test against vLLM's own OpenAI-compatible server, for comparison.

    locust -f loadtest/openai_speed.py --host http://127.0.0.1:8000 --served-model NAME --headless -u 4 -t 60s

Same prompts, same options, same per-request samples and summary as loadtest/speed.py, over
streaming ``/v1/completions``; the user is loadtest/openai_user.py, which speed.py also uses
(``--api http``) to drive our own HTTP front end.
"""

from __future__ import annotations

from locust import constant, events, task

from loadtest.openai_user import StreamingOpenAIUser, add_served_model_argument
from loadtest.sample_collector import install
from loadtest.token_stats import RequestSample

collector = install(events, add_served_model_argument)


class OpenAISpeedUser(StreamingOpenAIUser):
    wait_time = constant(0)

    @task
    def generate(self) -> None:
        super().generate()

    def record(self, sample: RequestSample) -> None:
        collector.add(sample)
