"""Shared limits against the real embedded server: across tasks, clients and processes.

Windows and leases are scaled down (a 1 s window, a 1 s lease) so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import pytest
import redis
import redis.asyncio

from levers import keys
from levers.limits.shared import JobLimits, RateLimited, SharedLimit, UnknownLimit
from levers.limits.status import limits_status
from levers.pipeline.model import LimitSettings, Phase, Pipeline
from levers.pipeline.outline import outline_of
from tests.conftest import wait_until
from tests.fake_anthropic import FakeAnthropic

PIPELINE = "limits-test"
WINDOW_S = 1.0
RATE = {"requests_per_minute": 10, "window_seconds": WINDOW_S}
# Starts are stamped by the callers after the server admitted them; this bounds that delay.
STAMP_TOLERANCE_S = 0.1
LEASE_TTL_S = 2.0
SPAWN = multiprocessing.get_context("spawn")


def spec(**limits: dict[str, Any]) -> Pipeline:
    return Pipeline(
        name=PIPELINE,
        phases={"only": Phase(handler="mod:fn", accepts=["*"])},
        limits={name: LimitSettings(**values) for name, values in limits.items()},
    )


def status(url: str, **settings: Any) -> dict[str, Any]:
    with redis.Redis.from_url(url) as connection:
        return limits_status(connection, outline_of(spec(api=settings)), "api")


async def with_limit(url: str, settings: dict[str, Any], body: Callable[[SharedLimit], Awaitable[Any]],
                     **options: Any) -> Any:  # fmt: skip
    """``body(limit)`` with a limit on a client of its own, closed afterwards."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        return await body(SharedLimit("api", LimitSettings(**settings), client, pipeline=PIPELINE, **options))
    finally:
        await client.aclose()


def in_processes(target: Callable[..., Awaitable[Any]], *per_process: tuple[Any, ...]) -> list[Any]:
    """``asyncio.run(target(*args))`` in one spawned process per args, started together; their results."""
    barrier = SPAWN.Barrier(len(per_process))
    results = SPAWN.Queue()
    processes = [SPAWN.Process(target=_child, args=(target, barrier, results, args)) for args in per_process]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=10)
    failures = [text for ok, text in outcomes if not ok]
    assert not failures, failures[0]
    return [result for _, result in outcomes]


def _child(target: Callable[..., Awaitable[Any]], barrier: Any, results: Any, args: tuple[Any, ...]) -> None:
    try:
        barrier.wait(timeout=60)
        results.put((True, asyncio.run(target(*args))))
    except BaseException:
        results.put((False, traceback.format_exc()))


async def _calls(url: str, settings: dict[str, Any], tasks: int, calls_each: int, seconds: float
                 ) -> list[tuple[float, float]]:  # fmt: skip
    """``tasks`` tasks making ``calls_each`` calls of ``seconds`` through the limit; (start, end) of each."""
    spans: list[tuple[float, float]] = []

    async def one() -> None:
        started = time.time()
        await asyncio.sleep(seconds)
        spans.append((started, time.time()))

    async def body(limit: SharedLimit) -> None:
        async def task() -> None:
            for _ in range(calls_each):
                await limit.call(one)

        await asyncio.gather(*(task() for _ in range(tasks)))

    await with_limit(url, settings, body)
    return spans


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant (an end at the same instant as a start closes first)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    open_now = peak = 0
    for _, change in events:
        open_now += change
        peak = max(peak, open_now)
    return peak


def test_rate_holds_across_tasks_and_processes(redis_url: str) -> None:
    # 3 processes of 4 tasks: 16 + 12 + 12 calls
    per_process = in_processes(_calls, *[(redis_url, RATE, 4, n, 0.01) for n in (4, 3, 3)])
    starts = sorted(start for spans in per_process for start, _ in spans)

    assert len(starts) == 40
    # no 11 starts within one window, checked for every window that begins at a start
    gaps = [eleventh - first for first, eleventh in zip(starts, starts[10:], strict=False)]
    assert min(gaps) >= WINDOW_S - STAMP_TOLERANCE_S
    assert status(redis_url, **RATE)["calls"] == 40


def test_concurrency_peaks_at_the_limit_across_processes(redis_url: str) -> None:
    settings = {"concurrency": 4}
    per_process = in_processes(_calls, *[(redis_url, settings, 5, 2, 0.15)] * 3)
    spans = [span for spans in per_process for span in spans]

    assert len(spans) == 30
    assert peak_overlap(spans) == 4
    after = status(redis_url, **settings)
    assert (after["peak_in_flight"], after["in_flight"], after["calls"]) == (4, 0, 30)


async def _hold_until_killed(url: str, held: Any) -> None:
    async def body(limit: SharedLimit) -> None:
        async with limit:
            held.set()
            await asyncio.Event().wait()

    await with_limit(url, {"concurrency": 1}, body, lease_ttl=LEASE_TTL_S)


def _holder(url: str, held: Any) -> None:
    asyncio.run(_hold_until_killed(url, held))


async def _seconds_to_acquire(url: str, timeout_s: float) -> float | None:
    """Seconds until this process got the only slot, or None when it did not within ``timeout_s``."""

    async def body(limit: SharedLimit) -> float | None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s), limit:
                return time.monotonic() - started
        except TimeoutError:
            return None

    return await with_limit(url, {"concurrency": 1}, body, lease_ttl=LEASE_TTL_S)


def test_a_killed_holder_s_slot_comes_back_within_the_lease_ttl(redis_url: str) -> None:
    held = SPAWN.Event()
    holder = SPAWN.Process(target=_holder, args=(redis_url, held))
    holder.start()
    try:
        assert held.wait(timeout=60)
        # while the holder lives it renews its lease: longer than the ttl, nobody else gets the slot
        assert asyncio.run(_seconds_to_acquire(redis_url, timeout_s=1.5 * LEASE_TTL_S)) is None
        assert status(redis_url, concurrency=1)["in_flight"] == 1
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=10)

    waited = asyncio.run(_seconds_to_acquire(redis_url, timeout_s=3 * LEASE_TTL_S))

    # the slot is free once the lease expires; the slack is for a loaded machine, not for the design
    assert waited is not None and waited <= LEASE_TTL_S + 1.0
    assert status(redis_url, concurrency=1)["in_flight"] == 0


@pytest.fixture(scope="module")
def anthropic() -> ModuleType:
    """The SDK, imported only for the tests that use it: the processes the other tests spawn import
    this module, and the SDK alone takes over a second to import."""
    import anthropic

    return anthropic


def ask(anthropic: ModuleType, fake: FakeAnthropic, url: str, **options: Any) -> Any:
    """One message through ``limit.call`` (concurrency 2) with the real SDK, its own retries off."""

    async def body(limit: SharedLimit) -> Any:
        sdk = anthropic.AsyncAnthropic(base_url=fake.url, api_key="test", max_retries=0)
        messages = [{"role": "user", "content": "what does the contract say"}]
        return await limit.call(sdk.messages.create, model="claude-fake", max_tokens=32, messages=messages)

    return asyncio.run(with_limit(url, {"concurrency": 2}, body, **options))


@pytest.mark.parametrize("status_code", [429, 529])
def test_call_retries_a_rate_limit_honouring_retry_after(
    redis_url: str, anthropic: ModuleType, status_code: int
) -> None:
    with FakeAnthropic() as fake:
        fake.fail_next(2, status=status_code, retry_after=0.3)
        started = time.monotonic()
        message = ask(anthropic, fake, redis_url)

    assert message.content[0].text == "Context for: what does the contract say"
    assert len(fake.requests) == 3
    assert time.monotonic() - started >= 0.6
    after = status(redis_url, concurrency=2)
    assert (after["calls"], after["rate_limited"], after["in_flight"]) == (3, 2, 0)


def test_call_backs_off_without_retry_after_and_gives_up_after_max_retries(
    redis_url: str, anthropic: ModuleType
) -> None:
    with FakeAnthropic() as fake:
        fake.fail_next(1, status=529, retry_after=None)
        assert ask(anthropic, fake, redis_url, backoff_s=0.05).content[0].type == "text"
        fake.fail_next(5, status=429, retry_after=0.01)
        with pytest.raises(anthropic.RateLimitError):
            ask(anthropic, fake, redis_url, max_rate_retries=2)

    assert len(fake.requests) == 2 + 3
    assert status(redis_url, concurrency=2)["rate_limited"] == 1 + 3


def test_other_errors_propagate_at_once_and_release_the_slot(redis_url: str, anthropic: ModuleType) -> None:
    with FakeAnthropic() as fake:
        fake.fail_next(1, status=400, retry_after=None)
        with pytest.raises(anthropic.BadRequestError):
            ask(anthropic, fake, redis_url)

    assert len(fake.requests) == 1
    after = status(redis_url, concurrency=2)
    assert (after["calls"], after["rate_limited"], after["in_flight"]) == (1, 0, 0)


def test_call_retries_server_errors_without_counting_them_as_rate_limited(
    redis_url: str, anthropic: ModuleType
) -> None:
    with FakeAnthropic() as fake:
        fake.fail_next(1, status=500, retry_after=None)
        fake.fail_next(1, status=503, retry_after=0.3)
        started = time.monotonic()
        message = ask(anthropic, fake, redis_url, backoff_s=0.05)

    assert message.content[0].type == "text" and len(fake.requests) == 3
    assert time.monotonic() - started >= 0.3
    after = status(redis_url, concurrency=2)
    assert (after["calls"], after["rate_limited"], after["in_flight"]) == (3, 0, 0)


class ProviderError(Exception):
    """As Deepgram's SDK raises them: the status and the response's headers on the error itself."""

    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        super().__init__(f"status {status_code}")
        self.status_code = status_code
        self.headers = headers


def test_call_honours_retry_after_in_an_error_s_own_headers_and_gives_up(redis_url: str) -> None:
    attempts: list[float] = []

    async def flaky(failures: list[ProviderError]) -> str:
        attempts.append(time.monotonic())
        if failures:
            raise failures.pop(0)
        return "transcript"

    async def body(limit: SharedLimit) -> tuple[str, BaseException | None]:
        first = await limit.call(flaky, [ProviderError(503, {"Retry-After": "0.4"})])
        try:
            await limit.call(flaky, [ProviderError(502, {}) for _ in range(3)])
        except ProviderError as exc:
            return first, exc
        return first, None

    first, gave_up = asyncio.run(
        with_limit(redis_url, {"concurrency": 1}, body, backoff_s=0.01, max_rate_retries=2)
    )

    assert first == "transcript" and attempts[1] - attempts[0] >= 0.4
    assert isinstance(gave_up, ProviderError) and gave_up.status_code == 502
    assert len(attempts) == 2 + 3  # the second call: the first try and 2 retries


def test_a_retry_wait_does_not_hold_the_slot(redis_url: str) -> None:
    order: list[str] = []

    async def body(limit: SharedLimit) -> None:
        refused = asyncio.Event()

        async def first() -> None:
            order.append("first")
            if not refused.is_set():
                refused.set()
                # no retry-after, so only this caller backs off (a provider's retry-after pauses
                # every caller of the limit: tests/test_limits_adaptive.py)
                raise RateLimited()

        async def second() -> None:
            await refused.wait()
            await limit.call(asyncio.sleep, 0)
            order.append("second")

        await asyncio.gather(limit.call(first), second())

    asyncio.run(with_limit(redis_url, {"concurrency": 1}, body))

    assert order == ["first", "second", "first"]


def test_scripts_do_not_over_admit_under_contention(redis_url: str) -> None:
    async def rate_burst() -> int:
        # a long window: the refused would wait for it, so only first attempts fall in the timeout
        settings = {"requests_per_minute": 25, "window_seconds": 60.0}

        async def attempt(limit: SharedLimit) -> bool:
            try:
                await asyncio.wait_for(limit.call(asyncio.sleep, 0), timeout=5.0)
            except TimeoutError:
                return False
            return True

        async def body(limit: SharedLimit) -> int:
            return sum(await asyncio.gather(*(attempt(limit) for _ in range(25))))

        return sum(await asyncio.gather(*(with_limit(redis_url, settings, body) for _ in range(4))))

    assert asyncio.run(rate_burst()) == 25
    with redis.Redis.from_url(redis_url) as connection:
        assert connection.zcard(keys.limit_window(PIPELINE, "api")) == 25


def test_a_waiter_stops_when_cancelled_even_if_the_redis_client_loses_the_cancel(redis_url: str) -> None:
    async def scenario(limit: SharedLimit) -> tuple[bool, bool]:
        await limit.call(asyncio.sleep, 0)  # the window (one call a minute) is full from here on
        in_command, lost = asyncio.Event(), asyncio.Event()
        real_rate = limit._scripts.rate

        async def rate_losing_the_cancel(**kwargs: Any) -> Any:
            # what redis-py's asyncio client does now and then: a cancel that strikes mid-command is lost
            if not lost.is_set():
                in_command.set()
                try:
                    await asyncio.sleep(10)  # a command that answers only after the cancel
                except asyncio.CancelledError:
                    lost.set()
            return await real_rate(**kwargs)

        limit._scripts = dataclasses.replace(limit._scripts, rate=rate_losing_the_cancel)
        waiter = asyncio.ensure_future(limit.call(asyncio.sleep, 0))
        await in_command.wait()
        waiter.cancel()
        await asyncio.wait([waiter], timeout=2.0)
        return lost.is_set(), waiter.cancelled()

    settings = {"requests_per_minute": 1, "window_seconds": 60.0}
    assert asyncio.run(with_limit(redis_url, settings, scenario)) == (True, True)
    with redis.Redis.from_url(redis_url) as connection:
        assert connection.zcard(keys.limit_window(PIPELINE, "api")) == 1  # the cancelled call left no trace


def test_a_release_ends_the_renewal_even_if_the_redis_client_loses_the_cancel(redis_url: str) -> None:
    async def scenario(limit: SharedLimit) -> tuple[bool, bool]:
        renewing, lost = asyncio.Event(), asyncio.Event()
        real_renew = limit._scripts.renew

        async def renew_losing_the_cancel(**kwargs: Any) -> Any:
            if not lost.is_set():
                renewing.set()
                try:
                    await asyncio.sleep(1.0)
                except asyncio.CancelledError:
                    lost.set()  # and carry on, as redis-py's client now and then does
            return await real_renew(**kwargs)

        limit._scripts = dataclasses.replace(limit._scripts, renew=renew_losing_the_cancel)
        held = asyncio.ensure_future(limit.call(renewing.wait))  # released while its lease renews
        done, _ = await asyncio.wait([held], timeout=3.0)
        return lost.is_set(), held in done

    assert asyncio.run(with_limit(redis_url, {"concurrency": 1}, scenario, lease_ttl=0.6)) == (True, True)
    assert status(redis_url, concurrency=1)["in_flight"] == 0


def test_leases_do_not_over_admit_under_contention(redis_url: str) -> None:
    inside = peak = done = 0

    async def hold() -> None:
        nonlocal inside, peak, done
        inside += 1
        peak = max(peak, inside)
        await asyncio.sleep(0.05)
        inside -= 1
        done += 1

    async def body(limit: SharedLimit) -> None:
        await asyncio.gather(*(limit.call(hold) for _ in range(15)))

    async def burst() -> None:
        await asyncio.gather(*(with_limit(redis_url, {"concurrency": 7}, body) for _ in range(4)))

    asyncio.run(burst())

    assert (peak, done) == (7, 60)
    assert status(redis_url, concurrency=7)["peak_in_flight"] == 7


def test_nested_and_concurrent_async_with_release_their_own_leases(redis_url: str) -> None:
    leases_key = keys.limit_leases(PIPELINE, "api")

    async def body(limit: SharedLimit) -> tuple[set[str], set[str], int]:
        both_in, first_out = asyncio.Barrier(2), asyncio.Event()

        async def leaves_first() -> None:
            async with limit, limit:
                await both_in.wait()
            first_out.set()

        async def stays() -> tuple[set[str], set[str]]:
            async with limit as outer, limit as inner:
                await both_in.wait()
                await first_out.wait()
                left = {member.decode() for member in await limit.client.zrange(leases_key, 0, -1)}
                return left, {outer.id, inner.id}

        _, (left, mine) = await asyncio.gather(leaves_first(), stays())
        return left, mine, await limit.client.zcard(leases_key)

    left, mine, after = asyncio.run(with_limit(redis_url, {"concurrency": 4}, body))

    assert left == mine and after == 0


def test_job_limits_know_only_declared_limits_and_only_in_a_loop(redis_url: str) -> None:
    pipeline = spec(anthropic=RATE, embeddings={"concurrency": 3})
    limits = JobLimits(pipeline, redis_url)

    async def use() -> None:
        anthropic = limits("anthropic")
        assert limits("anthropic") is anthropic
        await anthropic.call(asyncio.sleep, 0)
        assert limits("embeddings").settings.concurrency == 3
        with pytest.raises(UnknownLimit, match="declared: anthropic, embeddings"):
            limits("antropic")
        await limits.aclose()

    asyncio.run(use())

    with pytest.raises(RuntimeError, match="async handlers"):
        JobLimits(pipeline, redis_url)("anthropic")
    with redis.Redis.from_url(redis_url) as connection:
        assert limits_status(connection, outline_of(pipeline), "anthropic")["calls"] == 1


def test_status_counts_calls_in_the_current_window(redis_url: str) -> None:
    settings = {"requests_per_minute": 10, "window_seconds": 0.3}

    async def body(limit: SharedLimit) -> None:
        for _ in range(3):
            await limit.call(asyncio.sleep, 0)

    asyncio.run(with_limit(redis_url, settings, body))

    assert status(redis_url, **settings)["calls_in_window"] == 3
    wait_until(lambda: status(redis_url, **settings)["calls_in_window"] == 0, timeout_s=3.0)
    assert status(redis_url, **settings)["calls"] == 3
