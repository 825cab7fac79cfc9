"""`levers advise`: each symptom of the seed's table, with its evidence and command."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from levers.observing.advice import advise
from levers.observing.status import PhaseStatus, PipelineStatus

HEALTHY = PhaseStatus(
    phase="chunking", queued=0, running=1, claimed_ahead=0, stranded=0, waiting_retry=0, done=100, failed=0,
    retried=0, workers_desired=3, workers_alive=3, workers_busy=2, state="ok", workers=3, semaphore=10,
    threads=0, oldest_wait_s=None, throughput=0.3, utilization=0.8, p50_s=9.0, p95_s=12.0,
    calls_per_job=20, cpu_percent=20.0, rss_mb=150.0,
)  # fmt: skip


def status(
    *phases: PhaseStatus, limits: list[dict[str, Any]] | None = None, memory: float = 50
) -> PipelineStatus:
    return PipelineStatus("p", list(phases), 1, None, limits or [], memory)


def only(found: list[Any]) -> Any:
    assert len(found) == 1, found
    return found[0]


def test_a_healthy_pipeline_has_no_finding() -> None:
    assert advise(status(HEALTHY)) == []


def test_backlog_asks_for_enough_workers_to_drain_in_five_minutes() -> None:
    backed_up = replace(
        HEALTHY, phase="extraction", queued=120, oldest_wait_s=600, p50_s=90.0, calls_per_job=0
    )
    finding = only(advise(status(backed_up)))
    assert finding.symptom == "queue backing up"
    assert "120 queued" in finding.evidence and "10 min" in finding.evidence
    assert finding.command == "levers set extraction.workers=12"  # 120 x 90 s / 300 s = 36, capped at 4x


def test_idle_workers_are_trimmed_to_a_target_utilization() -> None:
    idle = replace(HEALTHY, workers=6, workers_alive=6, workers_desired=6, utilization=0.2)
    finding = only(advise(status(idle)))
    assert finding.symptom == "workers idle"
    assert finding.command == "levers set chunking.workers=2"  # 6 x 0.2 / 0.7 = 1.7


def test_sequential_calls_ask_for_a_semaphore() -> None:
    sequential = replace(HEALTHY, phase="kg_ingest", semaphore=1, calls_per_job=20, p50_s=60.0)
    finding = only(advise(status(sequential)))
    assert finding.command == "levers set kg_ingest.semaphore=10"


def test_429s_lower_the_declared_rate() -> None:
    limit = {"name": "anthropic", "rate_limited": 7, "calls": 300, "requests_per_minute": 50}
    finding = only(advise(status(HEALTHY, limits=[limit])))
    assert finding.evidence == "7 of 300 calls answered 429/529"
    assert finding.command == "levers set limits.anthropic.requests_per_minute=40"


def test_429s_without_a_declared_rate_halve_the_semaphore() -> None:
    limit = {"name": "anthropic", "rate_limited": 3, "calls": 30, "requests_per_minute": None}
    finding = only(advise(status(HEALTHY, limits=[limit])))
    assert finding.command == "levers set chunking.semaphore=5"


def test_high_cpu_without_threads_asks_for_threads() -> None:
    finding = only(advise(status(replace(HEALTHY, cpu_percent=95.0))))
    assert finding.command == "levers set chunking.threads=2"


def test_memory_pressure_trims_the_heaviest_phase() -> None:
    heavy = replace(HEALTHY, phase="ingest_extract", workers=2, rss_mb=300.0)
    finding = only(advise(status(HEALTHY, heavy, memory=95)))
    assert finding.subject == "ingest_extract"
    assert finding.command == "levers set ingest_extract.workers=1"


def test_failures_are_not_a_scaling_problem() -> None:
    finding = only(advise(status(replace(HEALTHY, done=80, failed=20))))
    assert finding.command is None
    assert "not a scaling problem" in finding.action
