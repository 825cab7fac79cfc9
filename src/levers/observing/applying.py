"""After `levers set`: wait until every running supervisor has taken up the new pipeline.yaml."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from levers.observing.reports import SupervisorReport, live_reports
from levers.pipeline.loading import LoadedPipeline
from levers.server.connection import connect_if_running

# Supervisors tick four times a second; this leaves room for a busy machine.
APPLY_TIMEOUT_S = 5.0
POLL_S = 0.1


@dataclass(frozen=True)
class Applied:
    supervisors: int  # live supervisors found
    applied: int  # of which run the new version
    workers: dict[str, tuple[int, int]]  # phase -> (alive, desired), summed over supervisors
    refused: list[str]  # why supervisors refused the new version (its handlers' options, say)


def await_supervisors(
    updated: LoadedPipeline, connection: redis.Redis | None = None, timeout_s: float = APPLY_TIMEOUT_S
) -> Applied | None:
    """Wait for live supervisors to report the new version's digest (on ``connection``, default:
    the pipeline's Redis if it runs); None when no server is reachable."""
    connection = connection or connect_if_running(updated)
    if connection is None:
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        reports = live_reports(connection, updated.spec.name)
        current = [r for r in reports if r.digest == updated.digest and _settled(r)]
        # a supervisor that refused the version names it, by its digest's first characters
        refused = [r.config_error for r in reports if r.digest != updated.digest and r.config_error
                   and updated.digest[:8] in r.config_error]  # fmt: skip
        if len(current) + len(refused) == len(reports) or time.monotonic() >= deadline:
            return Applied(len(reports), len(current), _workers(reports), refused)
        time.sleep(POLL_S)


def _settled(report: SupervisorReport) -> bool:
    return all(p.settled for p in report.phases.values())


def _workers(reports: list[SupervisorReport]) -> dict[str, tuple[int, int]]:
    totals: dict[str, tuple[int, int]] = {}
    for report in reports:
        for name, phase in report.phases.items():
            alive, desired = totals.get(name, (0, 0))
            totals[name] = (alive + phase.alive, desired + phase.desired)
    return totals
