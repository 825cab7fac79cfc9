"""Every supervisor's lease in Redis, and taking over the jobs of one whose lease lapsed.

A supervisor renews its lease on every tick; the lease's record names its host, pid, phases, the
version of pipeline.yaml it runs and its workers' RQ names. A lease not renewed for LEASE_TTL_S
lapses: the host is taken as lost, workers and all. Any live supervisor of the pipeline, on any
host, then claims the lapsed lease (once: the claim is one script on the server) and puts back at
the head of their queues the jobs that supervisor's workers held, each document recording the lost
host. A supervisor that was only cut off and comes back finds its lease taken over: it replaces
the workers whose jobs went elsewhere and takes a new lease. Whatever those workers still finish
is superseded (see levers.documents.ledger), so no document is handed on twice.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import redis

from levers import keys
from levers.observing.reports import LeaseRecord
from levers.supervisor.reconcile import Supervisor
from levers.worker.process import StrandedJobs, recover_jobs, worker_name

log = logging.getLogger("levers.supervisor.reconcile")

# A lease not renewed for this long lapses, and its supervisor's jobs go to another one.
LEASE_TTL_S = 5.0
# How often a supervisor looks for lapsed leases.
SCAN_S = 1.0
# A supervisor takes over others only once it has held its own lease this long without a break:
# after a Redis outage every lease has lapsed, and each supervisor gets this long to renew its own.
SETTLE_S = 10.0
# A claim not completed in this long (its claimer died mid-way) may be claimed again.
CLAIM_TTL_S = 60.0

_NOW_MS = (
    "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
)

# KEYS: the lease, the records, the renewal times, the lost set. ARGV: supervisor id, TTL in ms,
# the record's JSON ('' when unchanged), '1' to take a new lease. 0 when the lease was taken over.
_HOLD = (
    _NOW_MS
    + """
if ARGV[4] ~= '1' and (redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1
                       or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0) then
  return 0
end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) end
redis.call('HSET', KEYS[3], ARGV[1], now)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
)

# KEYS: the lapsed lease, the records, the lost set, the claim. ARGV: the claimer's id, the claim's
# TTL in ms, the lapsed supervisor's id. Its record, once, to the one claimer; nil otherwise.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local record = redis.call('HGET', KEYS[2], ARGV[3])
if not record then return false end
if not redis.call('SET', KEYS[4], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
redis.call('SADD', KEYS[3], ARGV[3])
return record
"""


def new_id() -> str:
    """Host and pid, and a nonce: a restarted container has the same host name and pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class LeaseKeeper:
    """Holds a supervisor's lease and takes over lapsed ones: ``tick`` on every supervisor tick."""

    def __init__(
        self, connection: redis.Redis, supervisor: Supervisor, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.connection = connection
        self.supervisor = supervisor
        self.id = new_id()
        self._clock = clock
        self._held_since: float | None = None  # held without a break since then
        self._published: LeaseRecord | None = None  # the record as Redis holds it
        self._last_scan = float("-inf")
        self._stranded = StrandedJobs(connection)
        self._hold_script = connection.register_script(_HOLD)
        self._claim_script = connection.register_script(_CLAIM)

    @property
    def pipeline(self) -> str:
        return self.supervisor.watcher.current().spec.name

    def tick(self) -> None:
        try:
            if not self._hold():
                return
            self._stranded.requeue_due()
            now = self._clock()
            settled = self._held_since is not None and now - self._held_since >= SETTLE_S
            if settled and now - self._last_scan >= SCAN_S:
                self._last_scan = now
                self.take_over_lapsed()
        except redis.RedisError as exc:
            if self._held_since is not None:
                log.warning("cannot renew this supervisor's lease: %s", exc)
            self._held_since = None

    def release(self) -> None:
        """Give the lease up after a clean stop: none of its workers is left holding a job."""
        try:
            self._stranded.requeue_due(wait=True)
            with self.connection.pipeline() as pipe:
                pipe.delete(keys.lease(self.pipeline, self.id))
                pipe.hdel(keys.lease_records(self.pipeline), self.id)
                pipe.hdel(keys.lease_renewals(self.pipeline), self.id)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not give up this supervisor's lease (it lapses by itself): %s", exc)

    def _record(self) -> LeaseRecord:
        workers: dict[str, list[str]] = {}
        for slot in self.supervisor.slots:
            workers.setdefault(slot.phase, []).append(worker_name(slot.phase, slot.pid))
        return LeaseRecord(
            host=socket.gethostname(),
            pid=os.getpid(),
            phases=sorted(self.supervisor.desired()),
            version=self.supervisor.watcher.current().digest[:12],
            workers={phase: sorted(names) for phase, names in sorted(workers.items())},
        )

    def _hold(self) -> bool:
        """Renew the lease (take one if none is held); False when it was found taken over."""
        pipeline, record = self.pipeline, self._record()
        fresh = self._published is None
        held = self._hold_script(
            keys=[keys.lease(pipeline, self.id), keys.lease_records(pipeline),
                  keys.lease_renewals(pipeline), keys.lost_leases(pipeline)],
            args=[self.id, int(LEASE_TTL_S * 1000), record.to_json() if record != self._published else "",
                  "1" if fresh else "0"],
        )  # fmt: skip
        if not held:
            self._replace_taken_workers()
            return False
        if self._held_since is None:
            if not fresh:
                log.info("renewing this supervisor's lease again")
            self._held_since = self._clock()
        self._published = record
        return True

    def _replace_taken_workers(self) -> None:
        """The lease lapsed (this supervisor was cut off) and another supervisor took its workers'
        jobs: those workers go, new ones start, and a new lease is taken on the next tick."""
        taken = {name for names in (self._published or LeaseRecord("", 0, [], "")).workers.values()
                 for name in names}  # fmt: skip
        pids = {s.pid for s in self.supervisor.slots if worker_name(s.phase, s.pid) in taken}
        log.warning(
            "this supervisor's lease lapsed and another supervisor took over its jobs: "
            "replacing %d worker(s)", len(pids),
        )  # fmt: skip
        self.supervisor.replace_workers(pids)
        self.id, self._published, self._held_since = new_id(), None, None

    def take_over_lapsed(self) -> list[str]:
        """Claim every lapsed lease of the pipeline and put its workers' jobs back; the ids of the
        supervisors taken over (none when another supervisor claimed them first)."""
        pipeline = self.pipeline
        others = [i for i in _text_all(self.connection.hkeys(keys.lease_records(pipeline))) if i != self.id]
        if not others:
            return []
        with self.connection.pipeline(transaction=False) as pipe:
            for other in others:
                pipe.exists(keys.lease(pipeline, other))
            alive = pipe.execute()
        return [
            other for other, live in zip(others, alive, strict=True) if not live and self._take_over(other)
        ]

    def _take_over(self, other: str) -> bool:
        pipeline = self.pipeline
        raw = self._claim_script(
            keys=[keys.lease(pipeline, other), keys.lease_records(pipeline), keys.lost_leases(pipeline),
                  keys.takeover(pipeline, other)],
            args=[self.id, int(CLAIM_TTL_S * 1000), other],
        )  # fmt: skip
        if raw is None:
            return False  # renewed meanwhile, or another supervisor claimed it first
        record = LeaseRecord.from_json(raw)
        reason = f"host {record.host} lost (its supervisor, pid {record.pid}, stopped renewing its lease)"
        requeued = self._requeue(record, reason)
        with self.connection.pipeline() as pipe:
            pipe.hdel(keys.lease_records(pipeline), other)
            pipe.hdel(keys.lease_renewals(pipeline), other)
            pipe.srem(keys.lost_leases(pipeline), other)
            pipe.delete(keys.takeover(pipeline, other))
            pipe.hdel(keys.supervisors(pipeline), f"{record.host}:{record.pid}")
            pipe.execute()
        log.warning("took over from %s: requeued %d job(s)", reason, requeued)
        return True

    def _requeue(self, record: LeaseRecord, reason: str) -> int:
        """Put back the jobs the workers of ``record`` held: those registered now, and (after a
        second look) those they had taken off a queue but not registered yet."""
        spec = self.supervisor.watcher.current().spec
        requeued = 0
        for phase, names in record.workers.items():
            retries = spec.phases[phase].retries if phase in spec.phases else 0
            for name in names:
                try:
                    # which of its jobs a worker was running is known only on its own host: each
                    # counts as an attempt
                    found = recover_jobs(
                        self.connection, spec.name, name, retries, lambda job_id: True, reason
                    )
                    requeued += len(found)
                except redis.RedisError:
                    raise  # the claim lapses and is made again once Redis answers
                except Exception:
                    # a malformed job in Redis must not keep the others from running again
                    log.exception("could not put back the jobs of worker %s", name)
        for phase in {*record.phases, *record.workers}:
            for name in keys.lane_queues(spec.name, phase):
                self._stranded.note(name)
        return requeued


def _text_all(values: list[Any]) -> list[str]:
    return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in values]
