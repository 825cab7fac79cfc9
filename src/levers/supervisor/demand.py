"""What autoscaling reads each tick: the demand on a phase's queue over every host, the shared
limits its jobs call, the other supervisors running it, and this host's available memory."""

from __future__ import annotations

import psutil
import redis
from rq import Queue
from rq.registry import StartedJobRegistry

from levers import keys
from levers.limits.status import learned_concurrency
from levers.observing.reports import live_reports
from levers.pipeline.model import Pipeline
from levers.pipeline.outline import outline_of
from levers.supervisor.scaling import Load, Observed, Peer


def observe(connection: redis.Redis, spec: Pipeline, phases: list[str], me: str) -> Observed:
    """What autoscaled ``phases`` are decided from: their queued and running jobs (list and
    registry lengths, on every host), the shared limits their jobs called lately and the
    concurrency those learned from refusals, the other live supervisors running them
    autoscaled, and this host's available memory."""
    per_phase = 2 * len(keys.LANES) + 1
    with connection.pipeline(transaction=False) as pipe:
        for phase in phases:
            for lane in keys.LANES:  # a phase's demand is that of all its priority lanes
                queue = keys.queue_name(spec.name, phase, lane)
                pipe.llen(Queue.redis_queue_namespace_prefix + queue)
                pipe.zcard(StartedJobRegistry(queue, connection=connection).key)
            pipe.smembers(keys.phase_limits(spec.name, phase))
        answers = pipe.execute()
    loads, used = {}, {}
    for index, phase in enumerate(phases):
        *counts, limits = answers[per_phase * index : per_phase * (index + 1)]
        loads[phase] = Load(sum(int(c) for c in counts[0::2]), sum(int(c) for c in counts[1::2]))
        used[phase] = frozenset(name.decode(errors="replace") for name in limits)
    peers: dict[str, list[Peer]] = {phase: [] for phase in phases}
    for report in live_reports(connection, spec.name):
        for phase, figures in report.phases.items():
            if f"{report.host}:{report.pid}" != me and phase in peers and figures.autoscale is not None:
                peers[phase].append(Peer(f"{report.host}:{report.pid}", figures.autoscale.ceiling))
    memory = psutil.virtual_memory()
    learned = learned_concurrency(connection, outline_of(spec), sorted(set().union(*used.values())))
    return Observed(loads, used, {phase: tuple(found) for phase, found in peers.items()},
                    memory.available / 2**20, memory.total / 2**20, learned)  # fmt: skip
