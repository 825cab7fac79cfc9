"""`levers plan --check`: the plan's throughput per phase against what the pipeline measured over
the same window. Pure.

What the plan predicts for a phase is the documents/s that go through it. A phase its documents
kept busy (most of its workers busy over the window) does its capacity. One that was not does
what reached it, at most its capacity: for an entry phase that is what was submitted, which no
plan predicts (the check shows it, and leaves its error out); for a phase after it, what the
phases feeding it passed on, as the plan has them. So a phase downstream of a slow one is not
blamed for the slow one's pace, and one starved by too few submissions is not called slow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from levers.pipeline.model import Pipeline
from levers.planning.capacity import Plan
from levers.planning.measured import Measured

# A path whose busiest phase kept at least this share of its workers busy ran at its capacity.
LOADED_SHARE = 0.8


@dataclass(frozen=True)
class PhaseCheck:
    phase: str
    predicted: float | None  # documents/s through the phase, as the plan has it
    measured: float | None  # documents/s it finished over the window; None when it ran nothing
    loaded: bool  # most of its workers were busy: it ran at its capacity
    arrival: bool = False  # an entry phase not kept busy: it did what was submitted, not predicted

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured; None when either is missing, or for an arrival."""
        if self.arrival or self.predicted is None or not self.measured:
            return None
        return (self.predicted - self.measured) / self.measured


def check(plan: Plan, spec: Pipeline, measured: Measured) -> list[PhaseCheck]:
    """One row per phase that ran jobs in the window, in the plan's order."""
    rows: dict[str, PhaseCheck] = {}

    def flow(name: str) -> float | None:
        if name not in rows:
            rows[name] = _row(plan, spec, measured, name, flow)
        return rows[name].predicted

    for name in plan.phases:
        if name in measured.phases:
            flow(name)
    return [rows[name] for name in plan.phases if name in rows and name in measured.phases]


def _row(
    plan: Plan, spec: Pipeline, measured: Measured, name: str, flow: Callable[[str], float | None]
) -> PhaseCheck:
    figures = measured.phases.get(name)
    capacity = plan.phases[name].docs_per_second
    done = figures.docs_per_second if figures is not None else None
    workers = plan.phases[name].workers
    loaded = figures is not None and workers > 0 and figures.busy_workers >= LOADED_SHARE * workers
    if loaded or figures is None:
        return PhaseCheck(name, capacity, done, loaded)
    feeders = [f for f in spec.feeders(name) if f in measured.phases]
    if not feeders:
        return PhaseCheck(name, done, done, loaded, arrival=True)
    inflows = [flow(f) for f in feeders]
    if any(i is None for i in inflows):
        return PhaseCheck(name, None, done, loaded)
    inflow = sum(i or 0.0 for i in inflows)
    return PhaseCheck(name, inflow if capacity is None else min(inflow, capacity), done, loaded)
