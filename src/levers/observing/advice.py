"""`levers advise`: the symptom table of running an RQ pipeline, checked against live figures.

Each rule reads one symptom from a ``PipelineStatus`` and, when it holds, says which lever to
move, with the figures that show it and the exact `levers set` command. A lever a phase declares
fixed (``fixed: [semaphore]``) is never proposed: a finding about that lever alone is dropped, and
one with other ways out (a backlog, memory, a provider's 429s) keeps its evidence without the
command. A phase with ``autoscale:`` sets its own worker count, so what is proposed for it is
the bound that lets the autoscaler reach the count (``autoscale.max``, ``autoscale.min``,
``autoscale.per_worker``), or nothing where it gets there by itself. Pure: no I/O here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from levers.observing.status import (
    FAILED_SHARE_WARNING,
    QUEUE_EMERGENCY,
    QUEUE_WARNING,
    AutoscaleStatus,
    PhaseStatus,
    PipelineStatus,
)

# A job waiting longer than this means the queue is backing up (the seed's five minutes).
WAIT_WARNING_S = 300
# A backlog should drain within this; more workers are advised until it would.
DRAIN_TARGET_S = 300
# Idle more than half the time: fewer workers would do (the seed's threshold) ...
IDLE_UTILIZATION = 0.5
# ... and the advised count aims at this utilization, leaving headroom for bursts.
TARGET_UTILIZATION = 0.7
# Never advise more than this many times the current workers in one step.
MAX_GROWTH = 4
# Per-worker CPU above this (% of one core) is high, as is host CPU over the last minute (the
# seed's "consistently above 80 %: need more vCPUs"); host memory above this is pressure.
HIGH_CPU_PERCENT = 80
HOST_CPU_SATURATED_PERCENT = 80
MEMORY_PRESSURE_PERCENT = 90
# A job that makes this many calls one at a time is worth a semaphore.
SEQUENTIAL_CALLS = 2
# Without a measured provider limit, a semaphore in the seed's safe range for Claude Haiku.
DEFAULT_SEMAPHORE = 10


@dataclass(frozen=True)
class Finding:
    subject: str  # a phase or a limit
    symptom: str
    evidence: str
    action: str
    command: str | None  # the `levers set` that applies it, when one does


def advise(status: PipelineStatus) -> list[Finding]:
    findings: list[Finding] = []
    for phase in status.phases:
        for rule in (_backing_up, _idle, _sequential_calls, _high_cpu, _failing):
            finding = rule(phase)
            if finding is not None:
                findings.append(finding)
    findings.extend(_rate_limited(status))
    for host_rule in (_host_cpu_saturated, _memory_pressure):
        finding = host_rule(status)
        if finding is not None:
            findings.append(finding)
    fixed = {(p.phase, lever) for p in status.phases for lever in p.fixed}
    return [kept for finding in findings if (kept := _respecting(finding, fixed)) is not None]


# Symptoms whose only remedy is their lever: with that lever fixed, nothing is left to advise.
ONLY_THAT_LEVER = frozenset(
    {"workers idle", "slow jobs making calls one at a time", "high CPU in blocking work"}
)


def _respecting(finding: Finding, fixed: set[tuple[str, str]]) -> Finding | None:
    """``finding`` without a command that changes a fixed lever (None when that was its point)."""
    target = finding.command.removeprefix("levers set ").split("=")[0] if finding.command else ""
    phase, _, lever = target.partition(".")
    if (phase, lever) not in fixed:
        return finding
    if finding.symptom in ONLY_THAT_LEVER:
        return None
    return replace(
        finding, command=None, action=f"{finding.action} ({target} is declared fixed: not proposed)"
    )


def _set(phase: str, lever: str, value: int) -> str:
    return f"levers set {phase}.{lever}={value}"


def _backing_up(p: PhaseStatus) -> Finding | None:
    waiting_long = p.oldest_wait_s is not None and p.oldest_wait_s > WAIT_WARNING_S
    slow_to_drain = p.drain_s is not None and p.drain_s > DRAIN_TARGET_S
    stuck = p.queued > 0 and p.workers_alive == 0
    if p.queued <= QUEUE_WARNING and not waiting_long and not slow_to_drain and not stuck:
        return None
    current = max(p.workers if p.autoscale is None else p.workers_desired, 1)
    if p.p50_s:
        needed = math.ceil(p.queued * p.p50_s / DRAIN_TARGET_S)
        target = max(current + 1, min(needed, current * MAX_GROWTH))
    else:
        target = current * 2
    wait = f", oldest waiting {p.oldest_wait_s / 60:.0f} min" if p.oldest_wait_s else ""
    pace = f", p50 {p.p50_s:.2f} s" if p.p50_s else ""
    drain = f", about {p.drain_s / 60:.0f} min to drain" if p.drain_s else ""
    urgency = "now: " if p.queued > QUEUE_EMERGENCY else ""
    evidence = f"{p.queued} queued{wait}{pace}{drain}, workers {p.workers_alive}/{p.workers_desired}"
    if stuck and p.workers_desired:
        action = "start the phase's workers (`levers up`) and look at why they are not running"
        return Finding(p.phase, "backlog with no worker alive", evidence, action, None)
    action = f"{urgency}more workers (lever 1), to drain the backlog in about {DRAIN_TARGET_S // 60} min"
    if p.autoscale is None:
        return Finding(p.phase, "queue backing up", evidence, action, _set(p.phase, "workers", target))
    return _autoscaled_backlog(p, p.autoscale, evidence, action, target)


def _autoscaled_backlog(
    p: PhaseStatus, scaling: AutoscaleStatus, evidence: str, action: str, target: int
) -> Finding | None:
    """A backlog the autoscaler does not drain in time: held by a cap, no bound helps; past its
    max, it needs a higher max; within its bounds, a smaller ``per_worker`` makes the demand ask
    for ``target`` workers."""
    evidence = f"{evidence}, autoscale {scaling.min}..{scaling.max}: {scaling.reason}"
    capped = " and ".join(cap for cap in ("limit cap", "memory cap") if cap in scaling.reason)
    if capped:
        action = f"{action}: held back by its {capped}, which no autoscale bound lifts"
        return Finding(p.phase, "queue backing up", evidence, action, None)
    if target > scaling.max:
        return Finding(p.phase, "queue backing up", evidence, f"{action}: raise the autoscaler's max",
                       _set(p.phase, "autoscale.max", target))  # fmt: skip
    per_worker = max(1, (p.queued + p.running) // target)
    if per_worker >= scaling.per_worker:
        return None  # the autoscaler already asks for that many: it is on its way
    return Finding(p.phase, "queue backing up", evidence,
                   f"{action}: let the autoscaler count fewer jobs per worker",
                   _set(p.phase, "autoscale.per_worker", per_worker))  # fmt: skip


def _idle(p: PhaseStatus) -> Finding | None:
    """Workers busy less than half the time while jobs come: fewer would do. A phase that ran no
    job lately is waiting for documents, not oversized: its figures say nothing about its size."""
    if p.queued or p.workers_alive <= 1 or p.utilization >= IDLE_UTILIZATION:
        return None
    if not p.throughput and not p.running:
        return None
    target = max(1, math.ceil(p.workers_alive * p.utilization / TARGET_UTILIZATION))
    if target >= p.workers:
        return None
    if p.autoscale is not None and target >= p.autoscale.min:
        return None  # the autoscaler takes the idle workers away itself, after its window
    lever = "workers" if p.autoscale is None else "autoscale.min"
    busy = p.workers_alive * p.utilization / target
    return Finding(
        p.phase,
        "workers idle",
        f"utilization {p.utilization:.0%} over the last 2 minutes, queue empty, {p.workers_alive} workers, "
        f"{p.throughput * 60:.1f} documents/min",
        f"fewer workers (lever 1) free their memory; {target} would have been busy "
        f"{f'{busy:.0%}' if busy >= 0.01 else 'under 1%'} of the time",
        _set(p.phase, lever, target),
    )


def _sequential_calls(p: PhaseStatus) -> Finding | None:
    if p.semaphore > 1 or p.calls_per_job < SEQUENTIAL_CALLS or not p.p50_s:
        return None
    target = min(math.ceil(p.calls_per_job), DEFAULT_SEMAPHORE)
    return Finding(
        p.phase,
        "slow jobs making calls one at a time",
        f"{p.calls_per_job:.1f} calls per job through ctx.gather/map with semaphore 1, p50 {p.p50_s:.2f} s",
        "let a job make its calls concurrently (lever 2); watch for 429s afterwards",
        _set(p.phase, "semaphore", target),
    )


def _high_cpu(p: PhaseStatus) -> Finding | None:
    """Blocking work in a job that also makes concurrent calls holds its calls back; a phase that
    makes no calls is simply CPU-bound, and threads would not make it faster."""
    if p.cpu_percent is None or p.cpu_percent < HIGH_CPU_PERCENT or p.threads > 0 or not p.calls_per_job:
        return None
    return Finding(
        p.phase,
        "high CPU in blocking work",
        f"workers at {p.cpu_percent:.0f}% of a core with threads 0, {p.calls_per_job:.1f} calls per job",
        "run blocking work on a thread pool (lever 3) through ctx.run_in_thread: the calls go on meanwhile",
        _set(p.phase, "threads", 2),
    )


def _host_cpu_saturated(status: PipelineStatus) -> Finding | None:
    """A host whose cores are busy gains nothing from more workers: each one only takes CPU time
    from the others. The phase whose workers use the most CPU is the one to move or trim."""
    if status.cpu_percent is None or status.cpu_percent < HOST_CPU_SATURATED_PERCENT:
        return None
    busy = [p for p in status.phases if p.cpu_percent and p.workers_alive]
    if not busy:
        return None
    heaviest = max(busy, key=lambda p: (p.cpu_percent or 0) * p.workers_alive)
    return Finding(
        heaviest.phase,
        "host CPU saturated",
        f"host CPU {status.cpu_percent:.0f}% over the last minute; {heaviest.phase} has "
        f"{heaviest.workers_alive} workers at {heaviest.cpu_percent:.0f}% of a core each",
        f"more workers will not go faster on this host: give it more vCPUs, or run {heaviest.phase} "
        f"on another host (`levers up --phase {heaviest.phase}`)",
        None,
    )


def _failing(p: PhaseStatus) -> Finding | None:
    if p.failed_share <= FAILED_SHARE_WARNING:
        return None
    return Finding(
        p.phase,
        "many jobs failing",
        f"{p.failed} of {p.done + p.failed} failed ({p.failed_share:.0%})",
        "look at the errors (`levers failed`, then `levers retry`): this is not a scaling problem",
        None,
    )


def _rate_limited(status: PipelineStatus) -> list[Finding]:
    findings = []
    callers = [p for p in status.phases if p.calls_per_job > 0 and p.semaphore > 1]
    for limit in status.limits:
        learned = _learned(limit)
        if learned is not None:
            findings.append(learned)
            continue
        if not limit["rate_limited"]:
            continue
        evidence = f"{limit['rate_limited']} of {limit['calls']} calls answered 429/529"
        rpm = limit["requests_per_minute"]
        if rpm:
            lowered = max(1, math.floor(rpm * 0.8))
            command = f"levers set limits.{limit['name']}.requests_per_minute={lowered}"
            action = "the provider allows less than the declared rate: lower it"
        elif callers:
            busiest = max(callers, key=lambda p: p.workers * p.semaphore)
            command = _set(busiest.phase, "semaphore", max(1, busiest.semaphore // 2))
            action = (
                f"fewer concurrent calls (lever 2), or declare the provider's rate under "
                f"limits.{limit['name']}.requests_per_minute"
            )
        else:
            command, action = None, f"declare the provider's rate under limits.{limit['name']}"
        findings.append(
            Finding(str(limit["name"]), "rate limited by the provider", evidence, action, command)
        )
    return findings


def _learned(limit: dict[str, Any]) -> Finding | None:
    """A limit that learned its provider allows less than declared: write what it learned into
    pipeline.yaml, so that it starts there instead of learning it again through refusals."""
    name = limit["name"]
    lowered = [
        (key, declared, effective)
        for key, declared, effective in (
            ("requests_per_minute", limit["requests_per_minute"], limit.get("effective_requests_per_minute")),
            ("concurrency", limit.get("concurrency"), limit.get("effective_concurrency")),
        )
        if declared is not None and effective is not None and effective < declared
    ]
    if not lowered:
        return None
    figures = ", ".join(f"{key} {effective} of {declared} declared" for key, declared, effective in lowered)
    stated = limit.get("provider_requests_per_minute")
    source = "the provider's rate-limit headers" if stated is not None else "its refusals"
    evidence = (
        f"effective {figures} (learned from {source}); {limit['rate_limited']} of {limit['calls']} calls "
        f"answered 429/529, {limit.get('rate_limited_last_minute', 0)} in the last minute"
    )
    command = "levers set " + " ".join(f"limits.{name}.{key}={effective}" for key, _, effective in lowered)
    action = (
        "write the learned figures into pipeline.yaml: the limit starts there instead of learning them again"
    )
    return Finding(str(name), "the provider allows less than declared", evidence, action, command)


def _memory_pressure(status: PipelineStatus) -> Finding | None:
    if status.memory_percent is None or status.memory_percent < MEMORY_PRESSURE_PERCENT:
        return None
    measured = [p for p in status.phases if p.rss_mb and p.workers > 1]
    if not measured:
        return None
    heaviest = max(measured, key=lambda p: (p.rss_mb or 0) * p.workers)
    return Finding(
        heaviest.phase,
        "memory pressure",
        f"host memory {status.memory_percent:.0f}% used; {heaviest.phase} workers use "
        f"{heaviest.rss_mb:.0f} MB each x {heaviest.workers}",
        "fewer workers of the heaviest phase (lever 1), or more memory",
        _set(
            heaviest.phase, "workers" if heaviest.autoscale is None else "autoscale.max", heaviest.workers - 1
        ),
    )
