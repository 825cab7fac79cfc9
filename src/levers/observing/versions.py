"""Which version of the pipeline runs where: the newest published one, each supervisor's, and how
the local pipeline.yaml differs from the live version (a `levers set` made elsewhere, not yet in
this copy of the file)."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from levers.errors import LeversError
from levers.observing.reports import SupervisorReport
from levers.pipeline.loading import LoadedPipeline
from levers.pipeline.outline import PipelineOutline, outline_of
from levers.pipeline.published import differences, loaded_from, read_published


@dataclass(frozen=True)
class VersionStatus:
    live: str | None  # the newest published version ("v3 8a1b2c3d"); None: none is published
    published_by: str | None
    supervisors: dict[str, str] = field(default_factory=dict)  # supervisor id -> the version it runs
    drift: list[str] = field(default_factory=list)  # one line per supervisor or setting that differs
    live_outline: PipelineOutline | None = field(default=None, repr=False, compare=False)

    def as_json(self) -> dict[str, object]:
        return {"live": self.live, "published_by": self.published_by, "supervisors": self.supervisors,
                "drift": self.drift}  # fmt: skip


def version_status(
    connection: redis.Redis, file: LoadedPipeline, reports: list[SupervisorReport]
) -> VersionStatus:
    """The versions ``reports``' supervisors run against the newest published one, and what
    ``file`` (the local pipeline.yaml) holds differently from it. What Redis holds is validated
    with the model before it is shown (not its handlers: this host may not run them)."""
    published = read_published(connection, file.outline.name)
    running = {f"{r.host}:{r.pid}": _label(r) for r in reports}
    if published is None:
        return VersionStatus(None, None, running)
    live = published.version
    drift = [f"{supervisor} runs {label}, not the live {live.label}"
             for supervisor, label in running.items() if label != live.label]  # fmt: skip
    if file.digest == live.digest:  # the same bytes as the file, which validated
        return VersionStatus(live.label, published.by, running, drift, file.outline)
    try:
        spec = loaded_from(published, file.path, file.outline.name, check_imports=False).spec
    except LeversError as exc:
        drift.append(f"the live version is invalid: {str(exc).splitlines()[0]}")
        return VersionStatus(live.label, published.by, running, drift)
    drift += differences(file.spec, spec)
    return VersionStatus(live.label, published.by, running, drift, outline_of(spec))


def _label(report: SupervisorReport) -> str:
    if report.version is None:
        return f"unpublished {report.digest[:8]}"
    return f"v{report.version} {report.digest[:8]}"
