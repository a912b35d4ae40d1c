"""The open-loop sender: each request of a trace leaves at its arrival time, whatever the earlier
ones are doing, over HTTP (any OpenAI-compatible server) or gRPC (our GenerateStream).

Why not an outside sender (Locust, guidellm, ``vllm bench serve``):
- Locust's users are a closed loop: a user sends its next request when its last one ends, so a
  slow server slows its own load down; that is kept for ``locust -f loadtest/speed.py``.
- guidellm and ``vllm bench serve`` speak only HTTP; our server is measured through gRPC too.
- Every target must replay one seeded trace (the same prompts, output lengths and arrival
  offsets, loadtest/capacity/trace.py) and each tool draws its own; and the client's own lag
  must be known, to tell a slow server from a client that fell behind.
``vllm bench serve`` stays as the second clock: it replays the capacity point's rate and
burstiness with its ``--goodput`` (loadtest/capacity/second_clock.py), and the two must agree.

The sender is asyncio with aiohttp and grpc.aio: one event loop sends and reads every stream.
How late each request left (its lag) is recorded; a step whose lag p99 exceeds the stated bound
is invalid, because its figures would be the client's, not the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

from loadtest.capacity.trace import Request

OK, REFUSED, ERROR, TIMEOUT = "ok", "refused", "error", "timeout"


@dataclass
class Sample:
    """One request as the client saw it; times in seconds from when it left."""

    index: int
    scheduled_s: float  # its arrival offset in the step
    lag_s: float = 0.0  # how late it left
    sent_s: float = 0.0  # when it left, from the step's start
    ttft_s: float | None = None
    e2e_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    tokens: int = 0
    status: str = OK
    error: str = ""
    in_flight_at_send: int = 0  # requests not yet answered when it left: the queue the client sees

    @property
    def tpot_s(self) -> float | None:
        if self.status != OK or self.ttft_s is None or self.e2e_s is None or self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)

    def row(self) -> dict:
        return {**asdict(self), "tpot_s": self.tpot_s}


class Refused(Exception):
    """The server said it is full (429 / RESOURCE_EXHAUSTED): a refusal, not an error."""


class Wire(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def stream(self, request: Request):
        """An async iterator of token counts, one per chunk that carries text (raises Refused)."""
        ...


class HttpWire:
    """Streaming ``/v1/completions`` on any OpenAI-compatible server."""

    def __init__(
        self,
        base_url: str,
        model: str,
        ignore_eos: bool = True,
        fresh_connection: bool = False,
        continuous_usage: bool = True,
    ) -> None:
        self.url = base_url.rstrip("/") + "/v1/completions"
        self.model, self.ignore_eos, self.fresh_connection = model, ignore_eos, fresh_connection
        self.continuous_usage = continuous_usage
        self.session = None

    async def open(self) -> None:
        import aiohttp

        # No pool limit: an open loop must never wait for a free connection.
        connector = aiohttp.TCPConnector(limit=0, force_close=self.fresh_connection)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def body(self, request: Request) -> dict:
        options = {"include_usage": True}
        if self.continuous_usage:
            options["continuous_usage_stats"] = True
        body = {
            "model": self.model,
            "prompt": request.prompt,
            "max_tokens": request.output_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": options,
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def stream(self, request: Request):
        async with self.session.post(self.url, json=self.body(request)) as response:
            if response.status == 429:
                raise Refused(f"HTTP 429: {(await response.text())[:200]}")
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
            counted = 0
            async for raw in response.content:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"])[:200])
                text = "".join(choice.get("text") or "" for choice in chunk.get("choices") or [])
                usage = chunk.get("usage") or {}
                total = usage.get("completion_tokens")
                if total is not None and total > counted:
                    # The usage says how many tokens this chunk held (vLLM's continuous usage).
                    yield total - counted
                    counted = total
                elif text:
                    yield 1  # a server that gives usage only at the end: one text chunk, one token
                    counted += 1


class GrpcWire:
    """Our GenerateStream through grpc.aio, over as many connections as the calls in flight need.

    One HTTP/2 connection carries at most the server's ``--max-concurrent-streams`` (64) calls at
    once; past that the server refuses the stream (RST_STREAM REFUSED_STREAM, seen as UNAVAILABLE).
    An open loop past capacity holds more calls than that, as many clients would, each on its own
    connection: a call goes out on the connection with the fewest in flight, and a new connection
    opens once each holds ``streams_per_connection``.  The HTTP sender likewise opens a connection
    per request in flight (its pool has no limit).
    """

    def __init__(self, address: str, ignore_eos: bool = True, streams_per_connection: int = 32) -> None:
        self.address, self.ignore_eos = address, ignore_eos
        self.streams_per_connection = streams_per_connection
        self.channels: list = []
        self.stubs: list = []
        self.in_flight: list[int] = []

    async def open(self) -> None:
        self._connect()

    def _connect(self) -> None:
        import grpc

        from server.grpc.wire import pb_grpc

        # A channel of its own subchannel pool opens its own connection: channels with the same target and
        # options otherwise share one.
        channel = grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.channels.append(channel)
        self.stubs.append(pb_grpc.InferenceStub(channel))
        self.in_flight.append(0)

    def _pick(self) -> int:
        index = min(range(len(self.in_flight)), key=self.in_flight.__getitem__)
        if self.in_flight[index] >= self.streams_per_connection:
            self._connect()
            index = len(self.in_flight) - 1
        return index

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def stream(self, request: Request):
        import grpc

        from server.grpc.wire import pb

        params = pb.SamplingParams(max_new_tokens=request.output_tokens, temperature=0.0, ignore_eos=self.ignore_eos)
        index = self._pick()
        self.in_flight[index] += 1
        try:
            call = self.stubs[index].GenerateStream(pb.GenerateRequest(prompt=request.prompt, params=params))
            async for chunk in call:
                if chunk.token_ids:
                    yield len(chunk.token_ids)
                elif chunk.text:
                    yield 1
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise Refused(f"RESOURCE_EXHAUSTED: {exc.details()}") from None
            raise RuntimeError(f"{exc.code().name}: {exc.details()}") from None
        finally:
            self.in_flight[index] -= 1


@dataclass
class Step:
    """One rate's run: every request's sample, and whether the client kept up."""

    rate: float
    samples: list[Sample]
    lag_p99_s: float
    max_lag_s: float
    duration_s: float

    @property
    def valid(self) -> bool:
        return self.lag_p99_s <= self.max_lag_s


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def _one(wire: Wire, request: Request, sample: Sample, started: float, timeout: float, open_: list) -> None:
    sample.sent_s = time.perf_counter() - started
    sent = time.perf_counter()
    last = None
    try:
        # aclosing: a stream cut by the timeout closes its connection (the server frees the slot) now.
        async with asyncio.timeout(timeout), contextlib.aclosing(wire.stream(request)) as stream:
            async for tokens in stream:
                now = time.perf_counter()
                if last is None:
                    sample.ttft_s = now - sent
                else:
                    sample.itls_s.append(now - last)
                last = now
                sample.tokens += tokens
        sample.e2e_s = time.perf_counter() - sent
        if sample.ttft_s is None:
            sample.status, sample.error = ERROR, "the stream ended without a token"
    except Refused as exc:
        sample.status, sample.error = REFUSED, str(exc)
    except TimeoutError:
        sample.status, sample.error = TIMEOUT, f"no answer within {timeout:g} s"
    except Exception as exc:  # any failure of one request is that request's row, not the step's end
        sample.status, sample.error = ERROR, f"{type(exc).__name__}: {exc}"[:300]
    finally:
        open_[0] -= 1


async def run_step(
    wire: Wire, schedule: list[tuple[float, Request]], rate: float, max_lag_s: float, timeout_s: float
) -> Step:
    """Sends every request of ``schedule`` (offset seconds, request) at its time; waits for all to end."""
    samples: list[Sample] = []
    tasks = []
    open_ = [0]
    await wire.open()
    try:
        started = time.perf_counter()
        for offset, request in schedule:
            delay = started + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sample = Sample(request.index, offset, lag_s=max(0.0, time.perf_counter() - started - offset))
            sample.in_flight_at_send = open_[0]
            open_[0] += 1
            samples.append(sample)
            tasks.append(asyncio.create_task(_one(wire, request, sample, started, timeout_s, open_)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    finally:
        await wire.close()
    lag = percentile([s.lag_s for s in samples], 99) or 0.0
    return Step(rate, samples, lag, max_lag_s, duration)
