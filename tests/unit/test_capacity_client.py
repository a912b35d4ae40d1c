"""The open-loop sender against a real in-process OpenAI-style streaming server, and its lag guard."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from loadtest.capacity import client, sweep, trace, workloads


class SlotServer:
    """An OpenAI-compatible streaming /v1/completions with ``slots`` slots, each request holding one for
    ``service_s`` while it streams ``max_tokens`` chunks; past ``max_waiting`` waiting, 429.
    Its capacity is known: slots / service_s requests per second."""

    def __init__(self, slots: int, service_s: float, max_waiting: int = 10_000) -> None:
        self.slots, self.service_s, self.max_waiting = slots, service_s, max_waiting
        self.waiting = 0
        self.bodies: list[dict] = []

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self._free.locked() and self.waiting >= self.max_waiting:
            return web.Response(status=429, text="full")
        self.waiting += 1
        async with self._free:
            self.waiting -= 1
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            tokens = body["max_tokens"]
            for number in range(tokens):
                await asyncio.sleep(self.service_s / tokens)
                chunk = {"choices": [{"text": "x"}], "usage": {"completion_tokens": number + 1}}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            return response

    async def __aenter__(self) -> str:
        self._free = asyncio.Semaphore(self.slots)
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *_) -> None:
        await self.runner.cleanup()


def fixed_trace(count: int, tokens: int = 4, arrival: str = "constant") -> trace.Trace:
    return trace.build(workloads.Speed(workloads.Lengths("fixed", (tokens,))), count, arrival, seed=0)


def test_requests_are_measured_and_sent_as_asked():
    async def main():
        server = SlotServer(slots=8, service_s=0.1)
        async with server as url:
            wire = client.HttpWire(url, "m", ignore_eos=True)
            return await client.run_step(wire, fixed_trace(6).at(20.0), 20.0, max_lag_s=0.2, timeout_s=10), server

    step, server = asyncio.run(main())
    assert step.valid and len(step.samples) == 6
    for sample in step.samples:
        assert sample.status == client.OK and sample.tokens == 4
        assert 0 < sample.ttft_s <= sample.e2e_s
        assert len(sample.itls_s) == 3
        assert sample.tpot_s == pytest.approx((sample.e2e_s - sample.ttft_s) / 3)
    body = server.bodies[0]
    assert body["ignore_eos"] is True and body["stream"] is True and body["max_tokens"] == 4
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_an_open_loop_does_not_wait_for_earlier_requests():
    """One slot, each request 0.3 s: a closed loop would send the fourth after 0.9 s; an open loop at 20/s
    sends all four within about 0.15 s, and the later ones wait at the server instead."""

    async def main():
        async with SlotServer(slots=1, service_s=0.3) as url:
            return await client.run_step(client.HttpWire(url, "m"), fixed_trace(4).at(20.0), 20.0, 0.2, 10)

    step = asyncio.run(main())
    assert max(s.sent_s for s in step.samples) < 0.3
    ttfts = sorted(s.ttft_s for s in step.samples)
    assert ttfts[-1] > ttfts[0] + 0.5  # the queue shows in TTFT
    assert max(s.in_flight_at_send for s in step.samples) >= 2


def test_refusals_are_counted_apart_from_errors():
    async def main():
        async with SlotServer(slots=1, service_s=0.3, max_waiting=0) as url:
            return await client.run_step(client.HttpWire(url, "m"), fixed_trace(3).at(50.0), 50.0, 0.2, 10)

    step = asyncio.run(main())
    statuses = sorted(s.status for s in step.samples)
    assert statuses.count(client.REFUSED) >= 1 and client.ERROR not in statuses
    assert all("429" in s.error for s in step.samples if s.status == client.REFUSED)


def test_a_dead_server_is_an_error_per_request_not_a_crash():
    async def main():
        return await client.run_step(client.HttpWire("http://127.0.0.1:9", "m"), fixed_trace(2).at(10.0), 10.0, 1, 5)

    step = asyncio.run(main())
    assert [s.status for s in step.samples] == [client.ERROR, client.ERROR]
    row = sweep.summarize(step, sweep.parse_slo(sweep.DEFAULT_SLO))
    assert row["errors"] == 2 and not row["meets"] and row["goodput_rps"] == 0


class BlockingWire:
    """A wire that blocks the event loop for ``block_s`` per request (as a client doing too much work
    would): later requests cannot leave on time."""

    def __init__(self, block_s: float) -> None:
        self.block_s = block_s

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def stream(self, request):
        time.sleep(self.block_s)
        yield 1
        await asyncio.sleep(0)
        yield 1


class PoliteWire(BlockingWire):
    async def stream(self, request):
        await asyncio.sleep(self.block_s)
        yield 1
        yield 1


def test_the_lag_guard_marks_a_step_the_client_could_not_keep_up_with():
    schedule = fixed_trace(20).at(100.0)  # one request every 10 ms
    blocked = asyncio.run(client.run_step(BlockingWire(0.05), schedule, 100.0, max_lag_s=0.1, timeout_s=10))
    assert blocked.lag_p99_s > 0.1 and not blocked.valid
    # The same trace with a client that keeps up: valid.
    kept = asyncio.run(client.run_step(PoliteWire(0.05), schedule, 100.0, max_lag_s=0.1, timeout_s=10))
    assert kept.valid
    row = sweep.summarize(blocked, sweep.parse_slo(sweep.DEFAULT_SLO))
    assert row["valid"] is False


def test_a_stream_past_its_timeout_is_cut_and_counted():
    async def main():
        async with SlotServer(slots=1, service_s=2.0) as url:
            return await client.run_step(client.HttpWire(url, "m"), fixed_trace(1).at(1.0), 1.0, 0.2, timeout_s=0.3)

    step = asyncio.run(main())
    assert step.samples[0].status == client.TIMEOUT and step.duration_s < 1.5
