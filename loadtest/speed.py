"""Locust load test of yayi-serve's streaming call: the inference log's speed test (docs/design.md).

    locust -f loadtest/speed.py --host 127.0.0.1:50051                      # web UI
    locust -f loadtest/speed.py --host 127.0.0.1:50051 --headless -u 4 -r 4 -t 60s --csv out/run
    locust -f loadtest/speed.py --host 127.0.0.1:50051 --headless -u 64 -t 60s --processes 4

Each user sends the log's speed prompts in turn (or --prompts-file) with greedy decoding and
exactly --max-new-tokens tokens (--ignore-eos), waiting for nothing between requests, so the
number of users is the concurrency.  At the end the serving-benchmark summary is printed and,
with --csv PREFIX, written to PREFIX_tokens.csv beside Locust's own CSVs.  In distributed
mode workers ship their samples to the master, which writes the one summary.
"""

from __future__ import annotations

import itertools

from locust import constant, events, task

from loadtest.grpc_user import StreamingGrpcUser
from loadtest.prompts import load_prompts
from loadtest.sample_collector import install
from loadtest.token_stats import RequestSample
from server.wire import pb

collector = install(events)
_prompt_turn = itertools.count()


class SpeedUser(StreamingGrpcUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.prompts = load_prompts(options.prompts_file)
        self.params = pb.SamplingParams(
            max_new_tokens=options.max_new_tokens, temperature=options.temperature, ignore_eos=options.ignore_eos
        )
        self.use_chat_template = options.chat_template
        self.timeout = options.request_timeout

    @task
    def generate(self) -> None:
        prompt = self.prompts[next(_prompt_turn) % len(self.prompts)]
        self.generate_stream(
            pb.GenerateRequest(prompt=prompt, params=self.params, use_chat_template=self.use_chat_template),
            timeout=self.timeout,
        )

    def record(self, sample: RequestSample) -> None:
        collector.add(sample)
