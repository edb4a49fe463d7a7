"""The gateway's MPC job pacer (secure/pacing.py): in-flight cap, rate, and a bounded wait that fails fast."""
from __future__ import annotations

import asyncio
import time

import pytest

from secure.pacing import JobPacer
from secure.party.replies import PartiesUnavailable


def test_no_more_jobs_than_the_cap_are_in_flight_and_all_run():
    pacer = JobPacer(concurrency=2, rate_per_s=1000, burst=1000, max_wait_s=5)
    in_flight, peak, done = 0, 0, 0

    async def job() -> None:
        nonlocal in_flight, peak, done
        async with pacer.slot():
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1
            done += 1

    async def main() -> None:
        await asyncio.gather(*(job() for _ in range(7)))

    asyncio.run(main())
    assert (peak, done) == (2, 7)


def test_jobs_start_no_faster_than_the_rate_after_the_burst():
    pacer = JobPacer(concurrency=100, rate_per_s=20, burst=2, max_wait_s=5)
    starts: list[float] = []

    async def job() -> None:
        async with pacer.slot():
            starts.append(time.monotonic())

    async def main() -> None:
        await asyncio.gather(*(job() for _ in range(6)))

    asyncio.run(main())
    assert starts[-1] - starts[0] >= 4 / 20 - 0.01  # two at once, then one per 50 ms
    assert pacer.waited_s > 0


@pytest.mark.parametrize("limit", ["slots", "rate"])
def test_a_job_that_would_wait_past_the_deadline_is_refused_at_once_and_never_runs(limit):
    pacer = (JobPacer(concurrency=1, rate_per_s=1000, burst=1000, max_wait_s=0.2) if limit == "slots"
             else JobPacer(concurrency=10, rate_per_s=0.5, burst=1, max_wait_s=0.2))
    ran: list[str] = []

    async def job(name: str, hold: float) -> None:
        async with pacer.slot():
            ran.append(name)
            await asyncio.sleep(hold)

    async def main() -> float:
        first = asyncio.create_task(job("first", 1.0))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(PartiesUnavailable, match="queue for the parties is full") as exc:
            await job("second", 0)
        assert exc.value.status == 503
        took = time.monotonic() - started
        await first
        return took

    took = asyncio.run(main())
    assert ran == ["first"] and took < 0.5  # a rate wait longer than the deadline is refused without sleeping


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        JobPacer(concurrency=0, rate_per_s=1, burst=1, max_wait_s=1)
    with pytest.raises(ValueError):
        JobPacer(concurrency=1, rate_per_s=0, burst=1, max_wait_s=1)
