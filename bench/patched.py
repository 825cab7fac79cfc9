"""The per-job patches this benchmark proposed, switchable in a benchmark process by monkeypatching.

src/ may or may not contain them (bench/patches/*.diff; they were being merged while this was
written), so the benchmark measures the other side whichever side src is on:

- ``mode() == "apply"`` (src lacks them): ``apply()`` adds them, and "proposed patches" is measured
  beside levers as it is;
- ``mode() == "revert"`` (src has them): ``revert()`` restores RQ's own heartbeats and state writes
  and the separate ledger read and start record, and "before the patches" is measured beside it.

Nothing in src/ is changed. The patches:

- ``heartbeat-pipeline``: RQ's ``heartbeat()`` without a pipeline sends HSET, EXPIRE, EXPIRE as
  three round trips, and the work loop calls it three times per job: send them as one.
- ``heartbeat-throttle``: skip a default-TTL heartbeat within a second of the last one; a
  heartbeat that set a longer TTL (a job's) always lets the next default one through.
- ``idle-state``: do not write the worker's state again when it has not changed (RQ writes
  "idle" after every job and again before every dequeue).
- ``ledger-merge``: ``Ledger.get`` + ``Ledger.started`` as one round trip (a Lua script that
  marks the phase started and returns the record; nil for an unknown document).
- ``overlap``: the worker completes each job and claims the next one on a helper thread while the
  following handler runs, and async handlers share one event loop per worker. This one is a
  design (levers/worker/rq_worker.py), not a monkeypatch: it can only be switched off
  (``LeversWorker.overlap = False`` and ``asyncio.run`` per job), never applied.

``BENCH_PATCHES`` (comma-separated names) picks a subset to apply; by default all.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from dataclasses import replace
from typing import Any

import rq
from rq import SimpleWorker

from levers.documents.ledger import DocStatus, DocumentRecord, Ledger, PhaseRecord, _record
from levers.worker.rq_worker import LeversWorker
from levers.worker.runtime import WorkerRuntime

ALL = ("heartbeat-pipeline", "heartbeat-throttle", "idle-state", "ledger-merge", "overlap")
# A default-TTL heartbeat this soon after the last one is skipped (RQ sends several per job).
HEARTBEAT_MIN_INTERVAL_S = 1.0


def in_src() -> dict[str, bool]:
    """Which patches src/ already contains."""
    worker_methods = vars(LeversWorker)
    return {
        "heartbeat-pipeline": "heartbeat" in worker_methods,
        "heartbeat-throttle": "heartbeat" in worker_methods,
        "idle-state": "set_state" in worker_methods,
        "ledger-merge": hasattr(Ledger, "start"),
        "overlap": "execute_job" in worker_methods,
    }


def mode() -> str:
    """ "revert" when src has every patch (measure "before"), else "apply" (measure "proposed")."""
    return "revert" if all(in_src().values()) else "apply"


# --- the patches, as proposed for src/levers/worker/process.py and src/levers/documents/ledger.py


def _make_heartbeat(pipelined: bool, throttle: bool) -> Any:
    """LeversWorker.heartbeat; the proposal for src is ``pipelined=True, throttle=True``."""

    def heartbeat(self: Any, timeout: int | None = None, pipeline: Any = None) -> None:
        if timeout is not None and timeout > self.worker_ttl + 60:
            # a job's longer TTL: the next default heartbeat must go out to shorten it again
            self._last_default_beat = float("-inf")
            SimpleWorker.heartbeat(self, timeout, pipeline)
            return
        now = time.monotonic()
        if throttle and pipeline is None and now - self._last_default_beat < HEARTBEAT_MIN_INTERVAL_S:
            return
        self._last_default_beat = now
        if pipeline is not None or not pipelined:
            SimpleWorker.heartbeat(self, timeout, pipeline)
            return
        with self.connection.pipeline(transaction=False) as pipe:
            SimpleWorker.heartbeat(self, timeout, pipe)
            pipe.execute()

    return heartbeat


def _set_state(self: Any, state: str, pipeline: Any = None) -> None:
    if pipeline is None and state == self._state:
        return
    SimpleWorker.set_state(self, state, pipeline)


# KEYS: the document. ARGV: phase, time, status. Marks the phase started; returns the record, nil if unknown.
_START = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HINCRBY', KEYS[1], ARGV[1] .. ':attempts', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'phase', ARGV[1], ARGV[1] .. ':started', ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""
_scripts: dict[int, Any] = {}


def ledger_start(self: Ledger, doc_id: str, phase: str) -> DocumentRecord | None:
    """Mark ``phase`` started and return the document's record, in one round trip; None if unknown."""
    script = _scripts.get(id(self.connection))
    if script is None:
        script = _scripts[id(self.connection)] = self.connection.register_script(_START)
    flat = script(keys=[self._key(doc_id)], args=[phase, repr(time.time()), str(DocStatus.RUNNING)])
    if not flat:
        return None
    return _record(doc_id, dict(zip(flat[::2], flat[1::2], strict=True)))


def apply(names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Apply the named patches src lacks (default: $BENCH_PATCHES, else all); returns those applied."""
    if names is None:
        chosen = os.environ.get("BENCH_PATCHES", ",".join(ALL))
        names = tuple(n for n in chosen.split(",") if n)
    unknown = set(names) - set(ALL)
    if unknown:
        raise ValueError(f"unknown patches: {sorted(unknown)}")
    present = in_src()
    names = tuple(n for n in names if not present[n])
    worker_cls: Any = LeversWorker
    if "heartbeat-pipeline" in names or "heartbeat-throttle" in names:
        worker_cls._last_default_beat = float("-inf")
        worker_cls.heartbeat = _make_heartbeat("heartbeat-pipeline" in names, "heartbeat-throttle" in names)
    if "idle-state" in names:
        worker_cls.set_state = _set_state
    if "ledger-merge" in names:
        # run_phase calls ``get`` then ``started`` here: ``get`` makes the merged call, ``started``
        # costs nothing; the same commands as run_phase calling ``Ledger.start`` would send
        def get(self: Ledger, doc_id: str) -> DocumentRecord | None:
            job = rq.get_current_job()
            if job is None:  # not in a job: the plain read
                raw = self.connection.hgetall(self._key(doc_id))
                return _record(doc_id, raw) if raw else None
            return ledger_start(self, doc_id, str(job.args[0]))

        def started(self: Ledger, doc_id: str, phase: str) -> int:
            return 0

        worker_ledger: Any = Ledger
        worker_ledger.get = get
        worker_ledger.started = started
    return names


# --- the way it was: RQ's own heartbeats and state writes, a read and a start record -------------


def _start_in_two_round_trips(self: Ledger, doc_id: str, phase: str) -> DocumentRecord | None:
    """``Ledger.get`` then ``Ledger.started`` as they were before the merge (HGETALL, MULTI/EXEC).

    The record returned counts the attempt just started, as ``Ledger.start``'s does: the hand-off
    commits only for the attempt the ledger holds.
    """
    record = self.get(doc_id)
    if record is None:
        return None
    key = self._key(doc_id)
    with self.connection.pipeline() as pipe:
        pipe.hincrby(key, f"{phase}:attempts", 1)
        pipe.hset(key, mapping={"status": DocStatus.RUNNING, "phase": phase, f"{phase}:started": time.time()})
        pipe.execute()
    run = record.phases.get(phase, PhaseRecord(None, None, 0, None))
    return replace(record, phases={**record.phases, phase: replace(run, attempts=run.attempts + 1)})


def revert() -> tuple[str, ...]:
    """Undo the patches src has; returns those reverted."""
    present = in_src()
    worker_cls: Any = LeversWorker
    if "heartbeat" in vars(LeversWorker):
        worker_cls.heartbeat = SimpleWorker.heartbeat
    if "set_state" in vars(LeversWorker):
        worker_cls.set_state = SimpleWorker.set_state
    if present["ledger-merge"]:
        ledger_cls: Any = Ledger
        ledger_cls.start = _start_in_two_round_trips
    if present["overlap"]:
        worker_cls.overlap = False
        runtime_cls: Any = WorkerRuntime
        runtime_cls.run_async = lambda self, job: asyncio.run(job)
    return tuple(n for n in ALL if present[n])


def from_env() -> str:
    """Set this process up as $BENCH_MODE says ("apply", "revert" or "none"; $BENCH_NO_FREEZE=1 also
    turns gc.freeze into a no-op); returns a description."""
    chosen = os.environ.get("BENCH_MODE", "none")
    done = ""
    if chosen == "apply":
        done = "applied " + (", ".join(apply()) or "nothing")
    elif chosen == "revert":
        done = "reverted " + (", ".join(revert()) or "nothing")
    if os.environ.get("BENCH_NO_FREEZE") == "1":
        gc.freeze = lambda: None
        done += "; gc.freeze disabled"
    return done or "levers as it is"
