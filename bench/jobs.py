"""Job functions the plain-RQ benchmark workers run (imported by name, as RQ does)."""

from __future__ import annotations

import asyncio


def noop() -> None:
    """A trivial job: nothing to do, so what is measured is the worker's own cost per job."""


def calls(semaphore: int, count: int = 20, call_s: float = 0.02) -> None:
    """The lever-efficiency workload as a plain RQ job: ``count`` sleeps, ``semaphore`` at a time.

    The same as the levers phase's ``ctx.gather`` (a semaphore around asyncio.gather), in a fresh
    event loop per job as levers runs async handlers.
    """

    async def run() -> None:
        bound = asyncio.Semaphore(semaphore)

        async def one() -> None:
            async with bound:
                await asyncio.sleep(call_s)

        await asyncio.gather(*(one() for _ in range(count)))

    asyncio.run(run())
