"""What `levers status` reads of a pipeline, in plain dataclasses: its name and Redis, how long
failed documents are kept, each phase's levers and autoscale bounds, and its limits.

A fresh `levers status` spends most of its start-up importing pydantic and building the model, for
a handful of numbers. The validated record of pipeline.yaml (levers.pipeline.validated) keeps this
outline beside the pipeline, so a status of an unchanged file reads it without the model; any other
load gets it from the validated ``Pipeline`` (``outline_of``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from levers.pipeline.model import Pipeline

T = TypeVar("T")


@dataclass(frozen=True)
class AutoscaleOutline:
    min: int
    max: int
    per_worker: int
    scale_down_after: float


@dataclass(frozen=True)
class PhaseOutline:
    workers: int
    semaphore: int
    threads: int
    fixed: tuple[str, ...]  # the levers `levers advise` leaves alone
    autoscale: AutoscaleOutline | None


@dataclass(frozen=True)
class LimitOutline:
    requests_per_minute: int | None
    concurrency: int | None
    window_seconds: float


@dataclass(frozen=True)
class PipelineOutline:
    name: str
    redis: str | None
    failed_ttl: float
    phases: dict[str, PhaseOutline]  # in the file's order
    limits: dict[str, LimitOutline]


def outline_of(spec: Pipeline) -> PipelineOutline:
    phases = {
        name: PhaseOutline(
            workers=phase.levers.workers,
            semaphore=phase.levers.semaphore,
            threads=phase.levers.threads,
            fixed=tuple(phase.fixed),
            autoscale=AutoscaleOutline(**phase.autoscale.model_dump()) if phase.autoscale else None,
        )
        for name, phase in spec.phases.items()
    }
    limits = {name: LimitOutline(**limit.model_dump()) for name, limit in spec.limits.items()}
    return PipelineOutline(spec.name, spec.redis, spec.failed_ttl, phases, limits)


def outline_json(outline: PipelineOutline) -> dict[str, Any]:
    return asdict(outline)


def outline_from_json(data: Any) -> PipelineOutline | None:
    """The outline ``outline_json`` wrote, or None for anything that is not one, field by field
    (levers' own record, checked all the same: a miss only costs a load through the model)."""
    try:
        phases = {name: _phase(phase) for name, phase in _mapping(data["phases"]).items()}
        limits = {name: _limit(limit) for name, limit in _mapping(data["limits"]).items()}
        return PipelineOutline(
            _typed(data["name"], str),
            _optional(data["redis"], str),
            _number(data["failed_ttl"]),
            phases,
            limits,
        )
    except (KeyError, TypeError):
        return None


def _phase(data: Any) -> PhaseOutline:
    autoscale = data["autoscale"]
    return PhaseOutline(
        workers=_typed(data["workers"], int),
        semaphore=_typed(data["semaphore"], int),
        threads=_typed(data["threads"], int),
        fixed=tuple(_typed(lever, str) for lever in _typed(data["fixed"], list)),
        autoscale=None if autoscale is None else _autoscale(autoscale),
    )


def _autoscale(data: Any) -> AutoscaleOutline:
    return AutoscaleOutline(
        min=_typed(data["min"], int),
        max=_typed(data["max"], int),
        per_worker=_typed(data["per_worker"], int),
        scale_down_after=_number(data["scale_down_after"]),
    )


def _limit(data: Any) -> LimitOutline:
    return LimitOutline(
        _optional(data["requests_per_minute"], int),
        _optional(data["concurrency"], int),
        _number(data["window_seconds"]),
    )


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise TypeError("not a mapping of names")
    return value


def _typed(value: Any, kind: type[T]) -> T:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"not a {kind.__name__}")
    return value


def _optional(value: Any, kind: type[T]) -> T | None:
    return None if value is None else _typed(value, kind)


def _number(value: Any) -> float:
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return _typed(value, float)
