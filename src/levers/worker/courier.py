"""The worker's helper thread, which settles the last job and takes the next while a handler runs."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

log = logging.getLogger("levers.worker.process")

# The courier's niceness above its worker's: on busy cores a handler's wake-up goes before
# bookkeeping that can wait (Linux, where a thread has a niceness of its own).
COURIER_NICENESS = 5


class Courier:
    """The worker's helper thread: it runs the steps it is handed, in order.

    A step handed with ``ask`` sends its result (or its exception) back to ``answer``; one asked
    step at a time. Plain queues, not an executor: the hand-over lies on the path between two
    handlers, where every line of code touched costs.
    """

    def __init__(self) -> None:
        self._inbox: SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], bool] | None] = SimpleQueue()
        self._answers: SimpleQueue[tuple[Any, Exception | None]] = SimpleQueue()
        # a daemon so that a worker dying without teardown() does not hang on it at exit
        self._thread = threading.Thread(target=self._serve, name="levers-courier", daemon=True)
        self._thread.start()

    def send(self, step: Callable[..., Any], *args: Any) -> None:
        self._inbox.put((step, args, False))

    def ask(self, step: Callable[..., Any], *args: Any) -> None:
        self._inbox.put((step, args, True))

    def answer(self) -> Any:
        """The asked step's result once it ran; what it raised is raised here."""
        result, error = self._answers.get()
        if error is not None:
            raise error
        return result

    def stop(self) -> None:
        """Once every step handed over has run."""
        self._inbox.put(None)
        self._thread.join()

    def _serve(self) -> None:
        if sys.platform == "linux":
            with contextlib.suppress(OSError):
                niceness = os.getpriority(os.PRIO_PROCESS, 0) + COURIER_NICENESS
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        while (item := self._inbox.get()) is not None:
            step, args, asked = item
            try:
                result = step(*args)
            except Exception as exc:
                if asked:
                    self._answers.put((None, exc))
                else:
                    log.exception("the worker's courier failed at %s", getattr(step, "__name__", step))
                continue
            if asked:
                self._answers.put((result, None))
