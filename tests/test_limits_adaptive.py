"""A shared limit learning its provider's figures: refusals, retry-after, quiet periods, the
provider's rate-limit headers, and hostile values in its Redis state. Against the real embedded
server, with windows scaled down so that a quiet period passes in a fraction of a second."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
import redis.asyncio

from levers import keys
from levers.limits.adaptive import LIMIT_HEADER, REMAINING_HEADER, RESET_HEADER, Outcome, asked_wait, stated
from levers.limits.shared import Lease, RateLimited, SharedLimit, retry_delay
from levers.limits.status import learned_concurrency, limits_status
from levers.pipeline.model import LimitSettings, Phase, Pipeline
from levers.pipeline.outline import outline_of

PIPELINE = "adaptive-test"
DECLARED = {"requests_per_minute": 30, "concurrency": 6, "window_seconds": 1.0}
# Long enough that no test waits for it by accident.
PATIENCE_S = 20.0


def status(url: str, settings: dict[str, Any]) -> dict[str, Any]:
    spec = Pipeline(
        name=PIPELINE,
        phases={"only": Phase(handler="mod:fn", accepts=["*"])},
        limits={"api": LimitSettings(**settings)},
    )
    with redis.Redis.from_url(url) as connection:
        return limits_status(connection, outline_of(spec), "api")


def run(url: str, settings: dict[str, Any], body: Callable[..., Awaitable[Any]], clients: int = 1) -> Any:
    """``body(*limits)``, one limit per client (as on separate hosts), each closed afterwards."""

    async def main() -> Any:
        made = [redis.asyncio.Redis.from_url(url) for _ in range(clients)]
        try:
            limits = [SharedLimit("api", LimitSettings(**settings), c, pipeline=PIPELINE) for c in made]
            async with asyncio.timeout(PATIENCE_S * 3):
                return await body(*limits)
        finally:
            for client in made:
                await client.aclose()

    return asyncio.run(main())


async def refuse(limit: SharedLimit, leases: list[Lease], retry_after: float | None = None) -> None:
    for lease in leases:
        await limit.release(lease, rate_limited=True, answer=RateLimited(retry_after))


async def server_ms(limit: SharedLimit) -> int:
    seconds, micros = await limit.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class Answer:
    """A raw response: what ``client.messages.with_raw_response.create`` returns."""

    def __init__(self, **headers: str) -> None:
        self.headers = {name.replace("_", "-"): value for name, value in headers.items()}


def rate_headers(per_minute: int, remaining: int, reset_in_s: float = 30.0) -> dict[str, str]:
    reset = datetime.fromtimestamp(datetime.now(UTC).timestamp() + reset_in_s, UTC).isoformat()
    return {
        LIMIT_HEADER.replace("-", "_"): str(per_minute),
        REMAINING_HEADER.replace("-", "_"): str(remaining),
        RESET_HEADER.replace("-", "_"): reset,
    }


def test_a_burst_of_refusals_is_one_cut_and_its_retry_after_pauses_every_host(redis_url: str) -> None:
    async def body(here: SharedLimit, elsewhere: SharedLimit) -> tuple[int, int]:
        burst = [await here.acquire() for _ in range(4)]
        await refuse(here, burst, retry_after=0.5)
        paused_until = int(await here.client.hget(keys.limit_adaptive(PIPELINE, "api"), "paused_until"))
        lease = await elsewhere.acquire()  # another host, which was never refused itself
        admitted = await server_ms(elsewhere)
        await elsewhere.release(lease)
        return paused_until, admitted

    paused_until, admitted = run(redis_url, DECLARED, body, clients=2)

    assert admitted >= paused_until
    after = status(redis_url, DECLARED)
    # four refusals of calls sent at the same figures: one cut of the rate to 0.7 of it, not four;
    # the provider refused four of the six calls sent at once, so two remain
    assert (after["effective_concurrency"], after["effective_requests_per_minute"]) == (2, 21)
    assert (after["rate_limited"], after["rate_limited_last_minute"]) == (4, 4)


def test_a_call_sent_after_a_cut_and_refused_cuts_again(redis_url: str) -> None:
    async def body(limit: SharedLimit) -> None:
        before_cut = await limit.acquire()
        await refuse(limit, [await limit.acquire()])
        after_cut = await limit.acquire()
        await refuse(limit, [before_cut])  # sent at the old figures: no second cut for it
        assert status(redis_url, DECLARED)["effective_concurrency"] == 4
        await refuse(limit, [after_cut])

    run(redis_url, DECLARED, body)

    after = status(redis_url, DECLARED)
    assert (after["effective_concurrency"], after["effective_requests_per_minute"]) == (
        2,
        14,
    )  # 6*.7*.7, 30*.7*.7


def test_a_cut_figure_rises_after_quiet_periods_while_it_binds_and_never_above_the_declared(
    redis_url: str,
) -> None:
    settings = {"concurrency": 6, "window_seconds": 0.2}  # a quiet period is one window
    seen: set[int] = set()

    async def call() -> None:
        seen.add(status(redis_url, settings)["in_flight"])
        await asyncio.sleep(0.02)

    async def body(limit: SharedLimit) -> None:
        await refuse(limit, [await limit.acquire()])
        await refuse(limit, [await limit.acquire()])  # 6 -> 4.2 -> 2.94
        assert status(redis_url, settings)["effective_concurrency"] == 2
        # one call at a time never waits for a slot: the figure does not bind and stays
        stop = asyncio.get_running_loop().time() + 5 * 0.2
        while asyncio.get_running_loop().time() < stop:
            await limit.call(call)
        assert status(redis_url, settings)["effective_concurrency"] == 2

        # twelve at a time wait for slots: it rises, window after window, up to the declared
        async def worker() -> None:
            while status(redis_url, settings)["effective_concurrency"] < 6:
                await limit.call(call)
            for _ in range(20):
                await limit.call(call)

        await asyncio.gather(*(worker() for _ in range(12)))

    run(redis_url, settings, body)

    assert max(seen) <= 6
    assert status(redis_url, settings)["effective_concurrency"] == 6


def test_the_provider_s_stated_rate_is_followed_and_refusals_then_cut_only_concurrency(
    redis_url: str,
) -> None:
    async def answered(**headers: str) -> Answer:
        return Answer(**headers)

    async def body(limit: SharedLimit) -> int:
        # 600 a minute is 10 per window of 1 s
        await limit.call(answered, **rate_headers(per_minute=600, remaining=400))
        assert status(redis_url, DECLARED)["effective_requests_per_minute"] == 10
        await refuse(limit, [await limit.acquire()])
        after = status(redis_url, DECLARED)
        assert (after["effective_requests_per_minute"], after["effective_concurrency"]) == (10, 4)
        # none remaining: every caller waits until one is back (a tenth of a second at 600 a minute)
        await limit.call(answered, **rate_headers(per_minute=600, remaining=0))
        return status(redis_url, DECLARED)["paused_s"]

    paused = run(redis_url, DECLARED, body)

    assert 0 < paused <= 0.1
    assert status(redis_url, DECLARED)["provider_requests_per_minute"] == 10


def test_a_refusal_s_own_headers_teach_the_rate_through_async_with(redis_url: str) -> None:
    class Refused(Exception):
        status_code = 429

        def __init__(self) -> None:
            super().__init__("too many requests")
            self.headers = {
                "Retry-After": "0.3",
                **Answer(**rate_headers(per_minute=120, remaining=3)).headers,
            }

    async def body(limit: SharedLimit) -> None:
        with pytest.raises(Refused):
            async with limit:
                raise Refused

    run(redis_url, DECLARED, body)

    after = status(redis_url, DECLARED)
    # 120 a minute is 2 per window of 1 s; the retry-after pauses everyone
    assert (after["effective_requests_per_minute"], after["effective_concurrency"]) == (2, 4)
    assert 0 < after["paused_s"] <= 0.3
    assert after["rate_limited_last_minute"] == 1


HOSTILE = {
    "rate": "nan", "concurrency": "1e309", "provider_rate": "-inf", "paused_until": "99999999999999999",
    "generation": "not a number", "quiet": "-5", "changed_at": "1e300", "raised": "\x00",
    "concurrency_bound_at": "{}",
}  # fmt: skip


def test_hostile_values_in_the_learned_state_are_bounded(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as connection:
        connection.hset(keys.limit_adaptive(PIPELINE, "api"), mapping=HOSTILE)
    shown = status(redis_url, DECLARED)
    assert (shown["effective_concurrency"], shown["effective_requests_per_minute"], shown["paused_s"]) == (
        6,
        30,
        0,
    )
    assert shown["provider_requests_per_minute"] is None

    async def body(limit: SharedLimit) -> None:
        # not paused for ever, not above the declared figures
        await asyncio.gather(*(limit.call(asyncio.sleep, 0.05) for _ in range(12)))
        await refuse(limit, [await limit.acquire()])  # a refusal still cuts, from the declared figures

    run(redis_url, DECLARED, body)

    after = status(redis_url, DECLARED)
    assert after["peak_in_flight"] == 6 and after["calls"] == 13
    assert (after["effective_concurrency"], after["effective_requests_per_minute"]) == (4, 21)
    with redis.Redis.from_url(redis_url) as connection:
        connection.hset(keys.limit_adaptive(PIPELINE, "api"), mapping={"rate": "0.001", "concurrency": "-3"})
    lowered = status(redis_url, DECLARED)
    # a value below one call counts as not learned: never a limit that admits nothing
    assert (lowered["effective_concurrency"], lowered["effective_requests_per_minute"]) == (6, 30)


def test_the_concurrency_a_limit_learned_is_what_autoscaling_reads(redis_url: str) -> None:
    spec = outline_of(
        Pipeline(
            name=PIPELINE,
            phases={"only": Phase(handler="mod:fn", accepts=["*"])},
            limits={"api": LimitSettings(**DECLARED), "open": LimitSettings(requests_per_minute=30)},
        )
    )
    with redis.Redis.from_url(redis_url) as connection:
        # nothing learned yet, a limit without concurrency, a name not declared: no cap but the declared
        assert learned_concurrency(connection, spec, ["api", "open", "gone"]) == {}

        async def body(limit: SharedLimit) -> None:
            await refuse(limit, [await limit.acquire()])

        run(redis_url, DECLARED, body)
        assert learned_concurrency(connection, spec, ["api", "open"]) == {"api": 4}  # 6 cut to 70 %
        connection.hset(keys.limit_adaptive(PIPELINE, "api"), "concurrency", "1e9")
        assert learned_concurrency(connection, spec, ["api"]) == {}  # hostile: never above the declared


def at(seconds_from_now: float) -> str:
    return datetime.fromtimestamp(1_000_000 + seconds_from_now, UTC).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("headers", "window_s", "expected"),
    [
        ({}, 60.0, Outcome()),
        (
            {LIMIT_HEADER: "50", REMAINING_HEADER: "49", RESET_HEADER: at(1.2)},
            60.0,
            Outcome(provider_rate=50),
        ),
        # the per-minute figure, scaled to the limit's window
        ({LIMIT_HEADER: "600", REMAINING_HEADER: "3"}, 2.0, Outcome(provider_rate=20)),
        # none remaining: until one request is back (60 s / 50), or the reset when that comes first
        ({LIMIT_HEADER: "50", REMAINING_HEADER: "0", RESET_HEADER: at(30)}, 60.0, Outcome(1.2, 50)),
        ({LIMIT_HEADER: "50", REMAINING_HEADER: "0", RESET_HEADER: at(0.5)}, 60.0, Outcome(0.5, 50)),
        ({"Anthropic-RateLimit-Requests-Remaining": "0", RESET_HEADER: at(-3)}, 60.0, Outcome(pause_s=0.0)),
        ({REMAINING_HEADER: "0", RESET_HEADER: at(1e6)}, 60.0, Outcome(pause_s=600)),
        # malformed or hostile: says nothing
        ({LIMIT_HEADER: "-5", REMAINING_HEADER: "lots", RESET_HEADER: "tomorrow"}, 60.0, Outcome()),
        ({LIMIT_HEADER: "nan", REMAINING_HEADER: "inf"}, 60.0, Outcome()),
        (
            {LIMIT_HEADER: "1e300", REMAINING_HEADER: "0", RESET_HEADER: "2026-01-01T00:00:00"},
            60.0,
            Outcome(0.0),
        ),
    ],
)
def test_the_provider_s_rate_limit_headers_read(
    headers: dict[str, str], window_s: float, expected: Outcome
) -> None:
    told = stated(headers, window_s, now=1_000_000)
    assert told.provider_rate == pytest.approx(expected.provider_rate)
    assert told.pause_s == pytest.approx(expected.pause_s, abs=1e-6)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2.5"}, 2.5),
        ({"Retry-After-Ms": "300", "retry-after": "9"}, 0.3),
        ({"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "-1"}, None),
    ],
)
def test_a_refusal_s_retry_after_read(headers: dict[str, str], expected: float | None) -> None:
    assert asked_wait(headers) == expected


def test_a_retry_after_longer_than_the_longest_pause_falls_back_to_backoff() -> None:
    refused = RateLimited(retry_after=1e12)
    assert retry_delay(refused, attempt=0, backoff_s=1.0) <= 1.0
