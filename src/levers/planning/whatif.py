"""What `levers plan` works on: the file, a what-if of it (``--set``) and a base to compare with.

Nothing here writes: a what-if is applied to the file's round-trip tree in memory and validated
with the same model as every load, so the file stays byte-identical. Handlers are not imported;
a plan needs the numbers, not the code.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from levers.errors import LeversError, SpecError, UsageError
from levers.observing.reports import live_reports
from levers.pipeline.editing import edit_text
from levers.pipeline.loading import LoadedPipeline, load_pipeline, parse_pipeline
from levers.pipeline.model import Pipeline
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
from levers.planning.check import PhaseCheck, check
from levers.planning.hosts import Host, hosts_from_reports, local_host
from levers.planning.measured import Measured, read_measured
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
    measured: Measured | None = None
    checked: tuple[PhaseCheck, ...] | None = None  # with --check: the file's plan against the window

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
                "window": None if self.measured is None else _window_json(self.measured),
                "hosts": [_host_json(host) for host in self.plan.hosts],
                "check": None if self.checked is None else [_check_json(c) for c in self.checked],
            }
        )


def _window_json(measured: Measured) -> dict[str, Any]:
    window = measured.window
    return {"minutes": window.minutes, "half_life_min": window.half_life_min, "end": window.now,
            "jobs": {name: figures.jobs for name, figures in measured.phases.items()}}  # fmt: skip


def _host_json(host: Host) -> dict[str, Any]:
    return {"name": host.name, "cores": host.cores, "others_cores": round(host.others, 2),
            "memory_mb": host.memory_mb, "local": host.local}  # fmt: skip


def _check_json(row: PhaseCheck) -> dict[str, Any]:
    return {"phase": row.phase, "predicted": row.predicted, "measured": row.measured, "error": row.error,
            "loaded": row.loaded, "arrival": row.arrival}  # fmt: skip


def plan_report(
    path: Path,
    assignments: Sequence[str] = (),
    base_path: Path | None = None,
    burst: int | None = None,
    rate: Rate | None = None,
    measured: Measured | None = None,
    hosts: Sequence[Host] = (),
    checking: bool = False,
) -> PlanReport:
    """The report `levers plan` shows. ``measured`` (figures from Redis) and ``hosts`` apply to
    both sides of a comparison; ``checking`` compares the file's plan as written with them."""
    current = load_pipeline(path)
    changes: tuple[WhatIf, ...] = ()
    after = current
    if assignments:
        after, applied = what_if(current, path.read_text(), assignments)
        changes = tuple(applied)

    def planned(spec: Pipeline) -> Plan:
        if measured is None:
            return build_plan(spec, hosts=hosts)
        return build_plan(spec, measured.job_seconds, measured.cpu_seconds, hosts)

    base, label = None, None
    if base_path is not None:
        if not base_path.is_file():
            raise UsageError(f"--base {base_path}: no such file", fix="name a pipeline file to compare with")
        base, label = planned(load_pipeline(base_path).spec), str(base_path)
    elif assignments:
        base, label = planned(current.spec), f"{path.name} as written"
    checked = None
    if checking:
        if measured is None or not measured.phases:
            raise LeversError(f"{path.name}: no job finished in {_window_text(measured)}",
                              fix="run the pipeline (levers up), then check while it works")  # fmt: skip
        checked = tuple(check(planned(current.spec), current.spec, measured))
    plan = planned(after.spec)
    return PlanReport(path, plan, base, label, changes, burst, rate, measured, checked)


def observe(path: Path, measuring: bool = True) -> tuple[Measured | None, tuple[Host, ...]]:
    """What the pipeline's Redis knows, if it answers: the recent window's figures (with
    ``measuring``) and the hosts its live supervisors report; else the local machine alone."""
    loaded = load_pipeline(path)
    connection = connect_if_running(loaded)
    if connection is None:
        return None, (local_host(),)
    spec = loaded.spec
    hosts = hosts_from_reports(live_reports(connection, spec.name)) or (local_host(),)
    if not measuring:
        return None, hosts
    return read_measured(connection, spec.name, list(spec.phases), time.time()), hosts


def _window_text(measured: Measured | None) -> str:
    return "the window" if measured is None else measured.window.describe()


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
