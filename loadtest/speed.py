"""Locust load test of yayi-serve's streaming call: the inference log's speed test.

    locust -f loadtest/speed.py --host 127.0.0.1:50051                      # web UI
    locust -f loadtest/speed.py --host 127.0.0.1:50051 --headless -u 4 -r 4 -t 60s --csv out/run
    locust -f loadtest/speed.py --host 127.0.0.1:50051 --headless -u 64 -t 60s --processes 4
    locust -f loadtest/speed.py --api http --host http://127.0.0.1:8000 --headless -u 4 -t 60s
    locust -f loadtest/speed.py --api http --host http://127.0.0.1:8000 --served-model NAME --headless -u 4 -t 60s
    locust -f loadtest/speed.py --api http --fresh-connection true --host http://127.0.0.1:8080 --served-model NAME ...

Each user sends the log's speed prompts in turn (or --prompts-file) with greedy decoding and
exactly --max-new-tokens tokens (--ignore-eos), waiting for nothing between requests, so the
number of users is the concurrency.  ``--api grpc`` (the default) calls ``GenerateStream``;
``--api http`` streams ``/v1/completions`` from the OpenAI-compatible front end
(``yayi-serve --http-port``) with the same user that measures vLLM's own server
(loadtest/users/http_user.py), so the two front ends are measured by the same clock; the same
``--api http`` user measures the outside OpenAI-compatible servers (vLLM's own, ``transformers
serve``, llama-server with ``--fresh-connection true``), so every row has one clock.  At the end
the serving-benchmark summary is printed and, with --csv PREFIX, written to PREFIX_tokens.csv
beside Locust's own CSVs.  In distributed mode workers ship their samples to the master,
which writes the one summary.
"""

from __future__ import annotations

import itertools

from locust import constant, events, task

from loadtest.measure.prompts import load_prompts
from loadtest.measure.token_stats import RequestSample
from loadtest.users.grpc_user import StreamingGrpcUser
from loadtest.users.http_user import StreamingOpenAIUser, add_served_model_argument
from loadtest.users.recorder import flag, install
from server.grpc.wire import pb


def _arguments(group) -> None:
    group.add_argument(
        "--api",
        choices=["grpc", "http"],
        default="grpc",
        help="front end: grpc (GenerateStream; --host HOST:PORT) or http (/v1/completions; --host http://HOST:PORT)",
    )
    add_served_model_argument(group)
    group.add_argument(
        "--fresh-connection",
        type=flag,
        default=False,
        help="true: a new HTTP connection per request (llama-server closes a streamed one after answering)",
    )


collector = install(events, _arguments)
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


class HttpSpeedUser(StreamingOpenAIUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        super().on_start()
        if self.environment.parsed_options.fresh_connection:
            # llama-server answers a streamed completion with Keep-Alive and then closes the connection,
            # so a reused one sees about every other request fail with "Remote end closed connection
            # without response" (llama.cpp of llama-cpp-python 0.3.36); a connection per request costs
            # a fraction of a millisecond on the loopback beside requests of tens of them.
            self.session.headers["Connection"] = "close"

    @task
    def generate(self) -> None:
        super().generate()

    def record(self, sample: RequestSample) -> None:
        collector.add(sample)


@events.init.add_listener
def _one_front_end(environment, **_) -> None:
    # Both users live in this file; --api picks the one that runs (the runner reads this list at start).
    options = environment.parsed_options
    chosen = HttpSpeedUser if options is not None and options.api == "http" else SpeedUser
    environment.user_classes[:] = [chosen]
