"""The admission bound in time: the wait estimate from the queue and the measured service time, and the refusal."""

from __future__ import annotations

import asyncio

import pytest

from engines.admission import Admission
from engines.errors import QueueFull


async def occupy(admission: Admission, count: int) -> tuple[asyncio.Event, list[asyncio.Task]]:
    """``count`` requests that take their slot (or wait for one) and hold it until the event is set."""
    hold = asyncio.Event()

    async def user():
        async with admission.slot():
            await hold.wait()

    tasks = [asyncio.create_task(user()) for _ in range(count)]
    await asyncio.sleep(0.01)
    return hold, tasks


def test_the_wait_is_estimated_from_the_queue_and_the_service_time():
    async def main():
        admission = Admission(max_running=2, max_waiting=10)
        assert admission.estimated_wait_s() == 0.0  # a slot is free
        hold, tasks = await occupy(admission, 3)
        assert admission.running == 2 and admission.waiting == 1
        assert admission.estimated_wait_s() == 0.0  # nothing measured yet: no guess
        admission.record_service(4.0)
        # Slots free at 2 per 4 s; the newcomer is behind one waiting request: (1 + 1) * 4 / 2.
        assert admission.estimated_wait_s() == pytest.approx(4.0)
        hold.set()
        await asyncio.gather(*tasks)
        return admission

    admission = asyncio.run(main())
    # Three slots released in about no time pull the running mean well below the 4 s recorded.
    assert admission.service_s < 4.0 * 0.8


def test_a_request_that_would_wait_past_the_bound_is_refused_at_once_with_a_hint():
    async def main():
        admission = Admission(max_running=1, max_waiting=64, max_wait_s=1.0)
        admission.record_service(3.0)
        hold, (first,) = await occupy(admission, 1)
        with pytest.raises(QueueFull, match=r"about 3\.0 s.*bound of 1 s; retry in about 2 s") as refused:
            async with admission.slot():
                pass
        assert refused.value.retry_after_s == pytest.approx(2.0)  # the wait past the bound
        assert admission.waiting == 0 and admission.running == 1  # the refusal held nothing
        hold.set()
        await first
        async with admission.slot():  # free again: admitted
            assert admission.running == 1

    asyncio.run(main())


def test_a_full_queue_hints_one_service_time_once_one_is_measured():
    async def main():
        admission = Admission(max_running=2, max_waiting=1)
        hold, tasks = await occupy(admission, 3)
        with pytest.raises(QueueFull, match="queue bound 1") as unmeasured:
            async with admission.slot():
                pass
        assert unmeasured.value.retry_after_s is None  # nothing measured: no guess
        admission.record_service(3.0)
        with pytest.raises(QueueFull) as measured:
            async with admission.slot():
                pass
        # Two slots each held about 3 s: one frees, and the queue moves up, in about 1.5 s.
        assert measured.value.retry_after_s == pytest.approx(1.5)
        hold.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_within_the_bound_a_request_waits_its_turn():
    async def main():
        admission = Admission(max_running=2, max_waiting=64, max_wait_s=1.0)
        admission.record_service(0.05)
        order = []

        async def user(name):
            async with admission.slot():
                order.append(name)
                await asyncio.sleep(0.05)

        await asyncio.gather(*(user(n) for n in range(5)))
        return order

    assert sorted(asyncio.run(main())) == list(range(5))


def test_the_bound_must_be_positive():
    with pytest.raises(ValueError, match="max_wait_s"):
        Admission(1, 1, max_wait_s=0)


def test_the_server_flag_reaches_the_engine_config():
    from server.cli import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["--engine", "hf-kv", "--max-queue-wait", "1.5"]))
    assert config.max_queue_wait_s == 1.5
    assert config_from_args(build_parser().parse_args([])).max_queue_wait_s is None
    with pytest.raises(SystemExit):
        config_from_args(build_parser().parse_args(["--max-queue-wait", "-1"]))
