"""Temporary levers projects the benchmarks run: a pipeline.yaml and its handler modules."""

from __future__ import annotations

import os
import time
from pathlib import Path

NOOP_HANDLER = '''"""The no-op phase of the overhead benchmark."""


def noop(doc, ctx):
    return {}
'''

CALLS_HANDLER = '''"""The lever-efficiency phase: CALLS simulated calls of CALL_S s each, via ctx.gather."""

import asyncio

CALLS = {calls}
CALL_S = {call_s}


async def calls(doc, ctx):
    await ctx.gather(*(asyncio.sleep(CALL_S) for _ in range(CALLS)))
    return {{}}
'''


def write_file(path: Path, text: str) -> None:
    """Write atomically and date the file 10 s back.

    levers' PipelineWatcher re-reads and hashes pipeline.yaml on every job while its mtime is
    under 2 s old (coarse-timestamp safety); dating it back keeps that out of the measurements.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    past = time.time() - 10
    os.utime(tmp, (past, past))
    tmp.replace(path)


def noop_project(root: Path) -> Path:
    """A one-phase pipeline whose phase does nothing; returns its pipeline.yaml."""
    write_file(root / "noop_phase.py", NOOP_HANDLER)
    pipeline = root / "pipeline.yaml"
    write_file(
        pipeline,
        "name: overhead\nphases:\n  noop:\n    handler: noop_phase:noop\n    accepts: [.txt]\n",
    )
    return pipeline


def calls_pipeline(root: Path, workers: int, semaphore: int) -> Path:
    """The lever-efficiency pipeline with the given levers (rewritten in place between cells)."""
    pipeline = root / "pipeline.yaml"
    write_file(
        pipeline,
        "name: efficiency\n"
        "phases:\n"
        "  calls:\n"
        "    handler: calls_phase:calls\n"
        "    accepts: [.txt]\n"
        "    retries: 0\n"
        "    levers:\n"
        f"      workers: {workers}\n"
        f"      semaphore: {semaphore}\n"
        "      threads: 0\n",
    )
    return pipeline


def calls_project(root: Path, workers: int, semaphore: int, calls: int, call_s: float) -> Path:
    write_file(root / "calls_phase.py", CALLS_HANDLER.format(calls=calls, call_s=call_s))
    return calls_pipeline(root, workers, semaphore)
