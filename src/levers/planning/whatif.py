"""What `levers plan` works on: the file, a what-if of it (``--set``) and a base to compare with.

Nothing here writes: a what-if is applied to the file's round-trip tree in memory and validated
with the same model as every load, so the file stays byte-identical. Handlers are not imported;
a plan needs the numbers, not the code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from levers.errors import SpecError, UsageError
from levers.metrics import measured_job_seconds
from levers.pipeline.editing import edit_text
from levers.pipeline.loading import LoadedPipeline, load_pipeline, parse_pipeline
from levers.planning.capacity import (
    PathChange,
    PathPlan,
    PhaseChange,
    PhasePlan,
    Plan,
    PlanDiff,
    Rate,
    build_plan,
    diff_plans,
    drain_seconds,
    keeps_up,
)
from levers.server.connection import connect_if_running


@dataclass(frozen=True)
class WhatIf:
    """One ``--set``: the key as the user wrote it, the value in force before (defaults count)."""

    key: str
    before: Any
    after: Any


@dataclass(frozen=True)
class PlanReport:
    """A plan and what it is compared with.

    ``base`` is the ``--base`` file's plan, else (with ``--set``) the file's plan as written, else
    None. ``plan`` is the file's plan with every ``--set`` applied.
    """

    file: Path
    plan: Plan
    base: Plan | None = None
    base_label: str | None = None
    changes: tuple[WhatIf, ...] = ()
    burst: int | None = None
    rate: Rate | None = None

    @property
    def diff(self) -> PlanDiff | None:
        return None if self.base is None else diff_plans(self.base, self.plan)

    def as_json(self) -> dict[str, Any]:
        """Stable keys: each is always present, null when not asked for or not known."""
        diff = self.diff
        return _tidy(
            {
                "file": str(self.file),
                "changes": [{"key": c.key, "before": c.before, "after": c.after} for c in self.changes],
                "burst": self.burst,
                "rate": None
                if self.rate is None
                else {"text": self.rate.text, "docs_per_second": self.rate.per_second},
                "plan": plan_json(self.plan, self.burst, self.rate),
                "base": None if self.base is None else plan_json(self.base, self.burst, self.rate),
                "base_label": self.base_label,
                "diff": None if diff is None else diff_json(diff),
            }
        )


def plan_report(
    path: Path,
    assignments: Sequence[str] = (),
    base_path: Path | None = None,
    burst: int | None = None,
    rate: Rate | None = None,
    measured: Mapping[str, float] | None = None,
) -> PlanReport:
    """The report `levers plan` shows. ``measured`` (phase -> job seconds) is the seam for
    durations measured in Redis; it applies to both sides of a comparison."""
    current = load_pipeline(path)
    changes: tuple[WhatIf, ...] = ()
    after = current
    if assignments:
        after, applied = what_if(current, path.read_text(), assignments)
        changes = tuple(applied)
    base, label = None, None
    if base_path is not None:
        base, label = build_plan(load_pipeline(base_path).spec, measured), str(base_path)
    elif assignments:
        base, label = build_plan(current.spec, measured), f"{path.name} as written"
    plan = build_plan(after.spec, measured)
    return PlanReport(path, plan, base, label, changes, burst, rate)


def measured_times(path: Path) -> dict[str, float] | None:
    """Mean job times measured in the last hour, if the pipeline's Redis answers (never started)."""
    loaded = load_pipeline(path)
    connection = connect_if_running(loaded)
    if connection is None:
        return None
    return measured_job_seconds(connection, loaded.spec.name, list(loaded.spec.phases)) or None


def what_if(
    current: LoadedPipeline, text: str, assignments: Sequence[str]
) -> tuple[LoadedPipeline, list[WhatIf]]:
    """``current`` (whose file holds ``text``) with ``KEY=VALUE`` assignments applied, in memory only.

    An invalid result is one UsageError line (exit 2) naming every problem.
    """
    new_text, edits = edit_text(current.path, text, list(current.spec.phases), assignments)
    effective = current.spec.model_dump(mode="json")
    # the value in force before (a default counts), not just what the file spelt out
    changes = [
        WhatIf(key, _lookup(effective, edit.path, edit.old), edit.new)
        for key, edit in zip((a.partition("=")[0].strip() for a in assignments), edits, strict=True)
    ]
    try:
        updated = parse_pipeline(new_text.encode(), current.path)
    except SpecError as exc:
        problems = "; ".join(p.message for p in exc.problems)
        raise UsageError(
            f"--set {' '.join(assignments)}: {problems}", fix=f"{current.path.name} is unchanged"
        ) from None
    return updated, [c for c in changes if c.before != c.after]


def _tidy(data: Any) -> Any:
    """``data`` with float noise rounded off (3 × 0.2 is 0.6000000000000001), to 12 significant digits."""
    if isinstance(data, float):
        return float(f"{data:.12g}")
    if isinstance(data, dict):
        return {key: _tidy(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_tidy(value) for value in data]
    return data


def _lookup(tree: Any, path: Sequence[str], fallback: Any) -> Any:
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return fallback
        tree = tree[part]
    return tree


def plan_json(plan: Plan, burst: int | None, rate: Rate | None) -> dict[str, Any]:
    totals = plan.totals()
    return {
        "phases": [_phase_json(plan, phase) for phase in plan.phases.values()],
        "paths": [_path_json(path, burst, rate) for path in plan.paths],
        "bottleneck": list(plan.bottleneck),
        "totals": {
            "workers": totals.workers,
            "cpu": totals.cpu,
            "ram_mb": totals.ram_mb,
            "missing_cpu": list(totals.missing_cpu),
            "missing_ram": list(totals.missing_ram),
        },
        "warnings": plan.warnings(),
    }


def _phase_json(plan: Plan, phase: PhasePlan) -> dict[str, Any]:
    return {
        "phase": phase.name,
        "workers": phase.workers,
        "semaphore": phase.semaphore,
        "threads": phase.threads,
        "job_seconds": phase.job_seconds,
        "source": phase.source,
        "docs_per_second": phase.docs_per_second,
        "docs_per_hour": phase.docs_per_hour,
        "cpu": phase.cpu,
        "ram_mb": phase.ram_mb,
        "bottleneck_share": plan.share(phase.name),
        "bottleneck": phase.name in plan.path_bottlenecks,
    }


def _path_json(path: PathPlan, burst: int | None, rate: Rate | None) -> dict[str, Any]:
    return {
        "entry": path.entry,
        "phases": list(path.phases),
        "bottleneck": list(path.bottleneck),
        "docs_per_second": path.docs_per_second,
        "complete": path.complete,
        "unknown": list(path.unknown),
        "stalled": list(path.stalled),
        "latency_seconds": path.latency_seconds,
        "drain_seconds": None if burst is None else drain_seconds(path, burst),
        "keeps_up": None if rate is None else keeps_up(path, rate),
    }


def diff_json(diff: PlanDiff) -> dict[str, Any]:
    old, new = diff.before.totals(), diff.after.totals()
    return {
        "moved": diff.moved,
        "bottleneck": {
            "before": list(diff.before.bottleneck),
            "after": list(diff.after.bottleneck),
            "moved": diff.bottleneck_moved,
        },
        "phases": [
            {"phase": c.name, "status": c.status}
            | {key: _sides(c, key) for key in ("workers", "semaphore", "job_seconds", "docs_per_second")}
            for c in diff.phases
        ],
        "paths": [
            {"entry": c.entry, "moved": c.moved}
            | {key: _sides(c, key) for key in ("bottleneck", "docs_per_second", "latency_seconds")}
            for c in diff.paths
        ],
        "totals": {
            key: {"before": getattr(old, key), "after": getattr(new, key)}
            for key in ("workers", "cpu", "ram_mb")
        },
    }


def _sides(change: PhaseChange | PathChange, key: str) -> dict[str, Any]:
    """``key`` of both sides of a change; a side the change lacks gives None."""
    sides = {"before": getattr(change.before, key, None), "after": getattr(change.after, key, None)}
    return {side: list(value) if isinstance(value, tuple) else value for side, value in sides.items()}
