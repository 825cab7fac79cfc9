"""What the jobs of one worker process share: the live pipeline, Redis, the store, handlers, pools
and one event loop. The worker holds it and hands it to each step of a job."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import redis

from levers.documents.store import ArtifactStore, open_store
from levers.pipeline.loading import ensure_importable_from, import_handler, state_dir_of
from levers.pipeline.model import Phase, Pipeline
from levers.pipeline.options import phase_options
from levers.pipeline.watching import PipelineWatcher
from levers.server.connection import resolve

T = TypeVar("T")


class WorkerRuntime:
    """What the jobs of one worker process share: the live pipeline, Redis, store and pools."""

    def __init__(self, watcher: PipelineWatcher, connection: redis.Redis, url: str) -> None:
        self.watcher = watcher
        self.connection = connection
        # each job makes its own async client for ctx.limit from this, on the worker's event loop
        self.url = url
        self._executors: dict[int, ThreadPoolExecutor] = {}
        self._handlers: dict[str, Callable[..., Any]] = {}
        # per phase: the options as the file holds them, and what its handler gets for them
        self._options: dict[str, tuple[dict[str, Any], Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stores: dict[str, ArtifactStore] = {}
        # resolved once: resolving the path costs a stat per directory level, on every job
        self.state_dir = state_dir_of(watcher.path)
        ensure_importable_from(watcher.path.parent)

    def store(self, spec: Pipeline) -> ArtifactStore:
        """The store ``spec`` names, made once per location (a remote one holds a client)."""
        made = self._stores.get(spec.store)
        if made is None:
            made = self._stores[spec.store] = open_store(spec.store, self.watcher.path.parent, self.state_dir)
        return made

    def executor(self, threads: int) -> ThreadPoolExecutor | None:
        """The process's thread pool for a threads lever; a changed lever gets a new pool."""
        if threads == 0:
            return None
        if threads not in self._executors:
            for stale in self._executors.values():
                stale.shutdown(wait=False)
            self._executors = {threads: ThreadPoolExecutor(threads, thread_name_prefix="levers")}
        return self._executors[threads]

    def run_async(self, job: Coroutine[Any, Any, T]) -> T:
        """Run a job's coroutine on the process's event loop, then cancel what it left running.

        One loop serves all the jobs of a process (a new loop per job costs about half a
        millisecond, and clients a handler keeps between jobs stay usable). A job that leaves the
        loop abnormally (its timeout's signal, say, can strike inside the loop's own code) takes
        the loop with it: the next job gets a new one.
        """
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        loop = self._loop
        try:
            result = loop.run_until_complete(job)
        except BaseException:
            self._loop = None
            _close(loop)
            raise
        _cancel_leftovers(loop)
        return result

    def handler(self, dotted: str) -> Callable[..., Any]:
        if dotted not in self._handlers:
            self._handlers[dotted] = import_handler(dotted)
        return self._handlers[dotted]

    def options(self, phase: str, settings: Phase) -> Any:
        """``ctx.options`` of a job of ``phase``: validated once per version of the file (the
        watcher checked them already, so this does not fail for a file it handed out)."""
        held = self._options.get(phase)
        if held is None or held[0] is not settings.options:
            held = self._options[phase] = (settings.options, phase_options(settings))
        return held[1]


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks a job left on the loop, as asyncio.run would, and let them finish."""
    leftovers = asyncio.all_tasks(loop)
    for task in leftovers:
        task.cancel()
    if leftovers:
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))


def _close(loop: asyncio.AbstractEventLoop) -> None:
    try:
        _cancel_leftovers(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def runtime_from_environment(connection: redis.Redis) -> WorkerRuntime:
    """The runtime of a worker not started by ``levers up``: on ``connection``, for the pipeline
    in LEVERS_FILE or ./pipeline.yaml."""
    watcher = PipelineWatcher.open(Path(os.environ.get("LEVERS_FILE", "pipeline.yaml")))
    return WorkerRuntime(watcher, connection, resolve(watcher.current(), start=False).url)
