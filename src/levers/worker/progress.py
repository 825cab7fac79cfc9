"""What a worker tells its supervisor through memory they share: how many jobs it has started,
and the job whose handler runs now.

The supervisor reads it once the worker is dead, whatever killed it. A worker that started jobs
was killed (out of memory, kill -9, or by its job), not crashing at start: it is replaced at
once. Of the jobs the worker held, only the one whose handler ran can have killed it; the one it
had taken ahead goes back unmarked. Shared memory costs the job path nothing: no round trip,
no system call.
"""

from __future__ import annotations

import ctypes
import multiprocessing

# Bytes of a job id kept; longer ids (RQ's own are 36) are compared by this prefix.
JOB_ID_BYTES = 256


class _Fields(ctypes.Structure):
    _fields_ = [("started", ctypes.c_uint64), ("running", ctypes.c_char * JOB_ID_BYTES)]


class WorkerProgress:
    """Made by the supervisor before it forks the worker; written only by the worker."""

    def __init__(self) -> None:
        # lock-free: one writer, and the reader looks only after the writer is dead
        self._fields = multiprocessing.get_context("fork").RawValue(_Fields)

    def started(self, job_id: str) -> None:
        """The handler of ``job_id`` is about to run."""
        self._fields.running = job_id.encode()[:JOB_ID_BYTES]
        self._fields.started += 1

    def ended(self) -> None:
        """The running handler returned, raised, or was cut short by a stop."""
        self._fields.running = b""

    @property
    def jobs_started(self) -> int:
        return int(self._fields.started)

    def running(self, job_id: str) -> bool:
        """Whether ``job_id``'s handler was running (when the worker died, read after its death)."""
        return bool(self._fields.running) and self._fields.running == job_id.encode()[:JOB_ID_BYTES]
