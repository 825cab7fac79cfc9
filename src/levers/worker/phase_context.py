"""What a phase handler receives and raises: the document it works on, the context of its phase,
and the error no retry can fix.

A handler is ``def handler(doc, ctx)`` or ``async def handler(doc, ctx)``. It returns the phase's
output (anything JSON can hold) and raises to fail the job. Its module may declare the phase's
options as ``class Options(PhaseOptions)`` (levers.pipeline.options): ``ctx.options`` is then
the validated model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from levers.documents.store import ArtifactStore
    from levers.documents.versions import DocumentVersion
    from levers.limits.shared import SharedLimit

T = TypeVar("T")
R = TypeVar("R")
OptionsT = TypeVar("OptionsT")


class Permanent(Exception):
    """Raise from a handler for input no retry can fix (a corrupt file, a document too large): the
    document fails at once with this message, without spending the phase's retries."""


@dataclass(frozen=True)
class Levers:
    """The three levers of one phase, as pipeline.yaml held them when the job started."""

    workers: int
    semaphore: int
    threads: int


@dataclass(frozen=True)
class Document:
    """One document as a phase sees it.

    ``content`` is a path for documents kept in the artifact store and bytes for documents that
    arrived in memory; ``read_bytes`` gives bytes either way. ``input`` is the previous phase's
    output (None for an entry phase). ``version``: which version of which name the document is
    (levers.documents.versions); a phase that keeps what documents say removes what older
    versions wrote unless ``version.keep``; None for a document submitted before versions were.
    """

    id: str
    name: str
    content: bytes | Path
    input: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    version: DocumentVersion | None = None

    @property
    def suffix(self) -> str:
        """The lower-cased file extension of the document's name, with its dot (".pdf")."""
        return Path(self.name).suffix.lower()

    @property
    def size(self) -> int:
        return len(self.content) if isinstance(self.content, bytes) else self.content.stat().st_size

    def read_bytes(self) -> bytes:
        return self.content if isinstance(self.content, bytes) else self.content.read_bytes()


class PhaseContext(Generic[OptionsT]):
    """The running phase's levers, options and concurrency helpers.

    ``options`` is the handler module's ``Options`` model, validated, when it declares one
    (annotate ``ctx: PhaseContext[Options]`` to have it typed), else the mapping as written.

    ``gather`` and ``map`` run coroutines concurrently, never more at once than the semaphore
    lever. ``run_in_thread`` runs blocking work on the process's thread pool, sized by the threads
    lever; with threads 0 it runs inline. One context serves one job and one event loop.
    ``store`` is the pipeline's artifact store (None outside a levers job): its ``cached`` and
    ``put_cached`` keep values that every worker sharing the store can reuse.
    """

    def __init__(
        self,
        phase: str,
        levers: Levers,
        options: OptionsT,
        state_dir: Path,
        executor: ThreadPoolExecutor | None,
        limits: Callable[[str], SharedLimit] | None = None,
        store: ArtifactStore | None = None,
    ) -> None:
        self.phase = phase
        self.levers = levers
        self.options = options
        self.state_dir = state_dir
        self.store = store
        self.log = logging.getLogger(f"levers.phase.{phase}")
        self._executor = executor
        self._limits = limits
        self._semaphore: asyncio.Semaphore | None = None
        # counted for the metrics: how many calls the job made through gather and map
        self.calls = 0

    def _bound(self) -> asyncio.Semaphore:
        # Created lazily so that it belongs to the event loop of the job that uses it.
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.levers.semaphore)
        return self._semaphore

    async def gather(self, *aws: Awaitable[T]) -> list[T]:
        """Await all, at most ``semaphore`` at a time, and return their results in order."""
        semaphore = self._bound()
        self.calls += len(aws)

        async def bounded(aw: Awaitable[T]) -> T:
            async with semaphore:
                return await aw

        return list(await asyncio.gather(*(bounded(aw) for aw in aws)))

    async def map(self, fn: Callable[[T], Awaitable[R]], items: Iterable[T]) -> list[R]:
        """``fn(item)`` for every item, at most ``semaphore`` at a time, results in order.

        Unlike ``gather``, the coroutines are created only when a slot is free.
        """
        semaphore = self._bound()
        items = list(items)
        self.calls += len(items)

        async def bounded(item: T) -> R:
            async with semaphore:
                return await fn(item)

        return list(await asyncio.gather(*(bounded(item) for item in items)))

    def limit(self, name: str) -> SharedLimit:
        """The limit ``name`` declared under ``limits:`` in pipeline.yaml, held across all workers and hosts.

        ``async with ctx.limit("anthropic"): ...`` holds a slot for the block; ``await
        ctx.limit("anthropic").call(fn, *args)`` also retries 429/529 answers. Async handlers only;
        an undeclared name raises UnknownLimit, which lists the declared ones.
        """
        if self._limits is None:
            raise RuntimeError("this context has no shared limits: it was not made by a levers job")
        return self._limits(name)

    async def run_in_thread(self, fn: Callable[..., R], *args: Any) -> R:
        """Run blocking ``fn(*args)`` on the phase's thread pool (inline when threads is 0)."""
        if self._executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


class Handler(Protocol):
    """A phase handler: sync or async, ``(doc, ctx) -> output``."""

    def __call__(self, doc: Document, ctx: PhaseContext[Any]) -> Any: ...


# The attribute ``batch_handler`` sets: levers calls such a handler with a list of documents.
BATCH_ATTRIBUTE = "__levers_batch__"
H = TypeVar("H", bound=Callable[..., Any])


def batch_handler(handler: H) -> H:
    """Mark ``handler`` as taking a batch: ``handler(docs, ctx)`` (sync or async) gets the list of
    documents a worker took together (the phase's ``batch: {size, wait_ms}``, one at a time
    without it) and returns one result per document, in order. A result that is an exception
    fails that document alone (``Permanent`` without its retries); raising fails every document
    of the batch, each retried per the phase's ``retries``."""
    setattr(handler, BATCH_ATTRIBUTE, True)
    return handler


def is_batch_handler(handler: Callable[..., Any]) -> bool:
    return bool(getattr(handler, BATCH_ATTRIBUTE, False))
