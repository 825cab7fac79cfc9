"""`levers advise`: each symptom of the seed's table, with its evidence and command."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from levers.errors import LeversError
from levers.observing.advice import advise
from levers.observing.status import AutoscaleStatus, PhaseStatus, PipelineStatus
from levers.pipeline.loading import load_pipeline

HEALTHY = PhaseStatus(
    phase="chunking", queued=0, running=1, claimed_ahead=0, stranded=0, waiting_retry=0, done=100, failed=0,
    failed_attempts=0, retried=0, workers_desired=3, workers_alive=3, workers_busy=2, state="ok", workers=3,
    semaphore=10, threads=0, oldest_wait_s=None, throughput=0.3, utilization=0.8, p50_s=9.0, p95_s=12.0,
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


def test_learned_figures_are_proposed_for_pipeline_yaml() -> None:
    limit = {
        "name": "anthropic", "rate_limited": 9, "calls": 300, "requests_per_minute": 60, "concurrency": 8,
        "effective_requests_per_minute": 20, "effective_concurrency": 2, "provider_requests_per_minute": 20.0,
        "rate_limited_last_minute": 1,
    }  # fmt: skip
    finding = only(advise(status(HEALTHY, limits=[limit])))
    assert (
        finding.command == "levers set limits.anthropic.requests_per_minute=20 limits.anthropic.concurrency=2"
    )
    assert "requests_per_minute 20 of 60 declared, concurrency 2 of 8 declared" in finding.evidence
    assert "rate-limit headers" in finding.evidence
    # only what was lowered: a concurrency at its declared figure is left as it is
    unchanged = only(advise(status(HEALTHY, limits=[limit | {"effective_concurrency": 8}])))
    assert unchanged.command == "levers set limits.anthropic.requests_per_minute=20"


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


def autoscaled(
    reason: str = "demand 6 (24 jobs / 4 per worker)", low: int = 1, high: int = 6
) -> AutoscaleStatus:
    return AutoscaleStatus(min=low, max=high, per_worker=4, scale_down_after=60, needed=6, reason=reason)


# 500 queued at 9 s a job: 15 workers drain them in 5 min; the autoscaler runs 6 (its max)
AUTOSCALED_BACKLOG = replace(
    HEALTHY,
    queued=500,
    oldest_wait_s=600,
    workers=2,
    workers_desired=6,
    workers_alive=6,
    autoscale=autoscaled(),
)


def test_an_autoscaled_backlog_past_the_max_asks_for_a_higher_max_not_workers() -> None:
    finding = only(advise(status(AUTOSCALED_BACKLOG)))
    assert finding.command == "levers set chunking.autoscale.max=15"
    assert "autoscale 1..6" in finding.evidence


def test_an_autoscaled_backlog_held_by_a_cap_proposes_no_bound() -> None:
    reason = "demand 126 (501 jobs / 4 per worker); limit cap 2 (api: 10 at once / semaphore 5)"
    finding = only(advise(status(replace(AUTOSCALED_BACKLOG, autoscale=autoscaled(reason)))))
    assert finding.command is None
    assert "held back by its limit cap" in finding.action


def test_an_autoscaled_backlog_within_the_bounds_asks_for_fewer_jobs_per_worker() -> None:
    slow = replace(AUTOSCALED_BACKLOG, queued=100, p50_s=30.0, autoscale=autoscaled(high=20))
    # 100 x 30 s / 300 s = 10 workers wanted, 101 jobs / 4 per worker asks for 26: on its way
    assert advise(status(slow)) == []
    lazy = replace(slow, autoscale=replace(autoscaled(high=20), per_worker=50))
    assert only(advise(status(lazy))).command == "levers set chunking.autoscale.per_worker=10"


def test_idle_autoscaled_workers_are_left_to_the_autoscaler_above_its_min() -> None:
    idle = replace(HEALTHY, workers=6, workers_alive=6, workers_desired=6, utilization=0.2)
    assert advise(status(replace(idle, autoscale=autoscaled(low=2)))) == []
    finding = only(advise(status(replace(idle, autoscale=autoscaled(low=4)))))
    assert finding.command == "levers set chunking.autoscale.min=2"


def test_memory_pressure_caps_an_autoscaled_phase_s_max() -> None:
    heavy = replace(HEALTHY, phase="ingest_extract", workers=3, rss_mb=300.0, autoscale=autoscaled())
    finding = only(advise(status(HEALTHY, heavy, memory=95)))
    assert finding.command == "levers set ingest_extract.autoscale.max=2"


def test_failures_are_not_a_scaling_problem() -> None:
    finding = only(advise(status(replace(HEALTHY, done=80, failed=20))))
    assert finding.command is None
    assert "not a scaling problem" in finding.action


# `levers status --json` of real runs, recorded under tests/data/advice/. Of the toy pipeline
# (tests/test_e2e.py): 37 documents of 10 s each queued with no worker, then with one worker; four
# workers with nothing submitted, then after 12 documents of 0.2 s. By record.py there (one phase
# on a real `levers up`, calls through the real SDK to the stand-in API): 6 calls of 0.3 s per
# job one at a time (sequential) and six at a time (concurrent); 0.5 s of CPU per job on a host
# whose 2 cores other work kept busy (cpu_bound); a declared 600 calls a minute while the
# stand-in refused one request every 0.6 s (rate_limited); two workers holding 10 GB each on a
# 24 GB host (memory_pressure).
RECORDED = Path(__file__).parent / "data" / "advice"


def recorded(name: str, **fixed: list[str]) -> PipelineStatus:
    data = json.loads((RECORDED / f"{name}.json").read_text())
    fields = {f.name for f in dataclasses.fields(PhaseStatus)}
    phases = [
        PhaseStatus(
            **{k: v for k, v in p.items() if k in fields - {"fixed", "failed_attempts"}},
            # recorded before the counter had a field of its own; no recorded run purged anything
            failed_attempts=p.get("failed_attempts", p["failed"]),
            fixed=tuple(fixed.get(p["phase"], ())),
        )
        for p in data["phases"]
    ]
    return PipelineStatus(
        data["pipeline"], phases, [], None, data["limits"], data["memory_percent"], data.get("cpu_percent")
    )


def test_a_recorded_backlog_asks_for_workers_to_drain_it() -> None:
    findings = advise(recorded("backlog"))
    first = next(f for f in findings if f.subject == "first")
    assert first.symptom == "queue backing up"  # 34 queued: under the 100 of a queue warning
    assert "34 queued" in first.evidence and "about 10 min to drain" in first.evidence
    assert first.command == "levers set first.workers=2"  # 34 x 17.5 s / 300 s
    second = next(f for f in findings if f.subject == "second")
    assert second.symptom == "backlog with no worker alive" and second.command is None


def test_a_recorded_backlog_with_no_worker_says_so() -> None:
    finding = only(advise(recorded("no_worker")))
    assert (finding.subject, finding.symptom) == ("first", "backlog with no worker alive")
    assert "37 queued" in finding.evidence


def test_recorded_idle_workers_with_nothing_to_do_are_no_finding() -> None:
    assert advise(recorded("idle_no_traffic")) == []


def test_recorded_idle_workers_with_traffic_are_trimmed_truthfully() -> None:
    finding = only(advise(recorded("idle_with_traffic")))
    assert finding.symptom == "workers idle" and finding.command == "levers set first.workers=1"
    # 4 workers 2% busy: one would have been busy 8%, not "about 70%"
    assert "1 would have been busy 8% of the time" in finding.action
    assert "70%" not in finding.action


def test_recorded_sequential_calls_ask_for_a_semaphore() -> None:
    finding = only(advise(recorded("sequential")))
    assert finding.symptom == "slow jobs making calls one at a time"
    assert "6.0 calls per job" in finding.evidence and "p50 3.44 s" in finding.evidence
    assert finding.command == "levers set work.semaphore=6"


def test_recorded_concurrent_calls_are_no_finding() -> None:
    assert advise(recorded("concurrent")) == []


def test_a_recorded_cpu_bound_phase_on_a_busy_host_is_told_workers_will_not_help() -> None:
    finding = only(advise(recorded("cpu_bound")))
    assert finding.symptom == "host CPU saturated" and finding.subject == "work"
    assert finding.evidence.startswith("host CPU 100% over the last minute; work has 2 workers")
    # no calls to overlap: threads would not help, and more workers only share the same cores
    assert finding.command is None and "more workers will not go faster" in finding.action


def test_recorded_429s_lower_the_declared_rate() -> None:
    finding = only(advise(recorded("rate_limited")))
    assert (finding.subject, finding.symptom) == ("anthropic", "rate limited by the provider")
    assert finding.evidence == "48 of 128 calls answered 429/529"
    assert finding.command == "levers set limits.anthropic.requests_per_minute=480"


def test_recorded_memory_pressure_trims_the_phase_holding_it() -> None:
    finding = only(advise(recorded("memory_pressure")))
    assert finding.symptom == "memory pressure"
    assert finding.evidence == "host memory 91% used; work workers use 10125 MB each x 2"
    assert finding.command == "levers set work.workers=1"


def test_a_fixed_lever_is_never_proposed() -> None:
    sequential = replace(HEALTHY, phase="kg_ingest", semaphore=1, calls_per_job=20, p50_s=60.0)
    assert advise(status(replace(sequential, fixed=("semaphore",)))) == []
    assert (
        only(advise(status(replace(sequential, fixed=("workers",))))).command
        == "levers set kg_ingest.semaphore=10"
    )

    # a backlog is still reported with its lever fixed, without the command
    first = next(f for f in advise(recorded("backlog", first=["workers"])) if f.subject == "first")
    assert first.symptom == "queue backing up" and first.command is None
    assert "first.workers is declared fixed" in first.action
    # 429s with the busiest caller's semaphore fixed: the declared rate is what is left to say
    limit = {"name": "anthropic", "rate_limited": 3, "calls": 30, "requests_per_minute": None}
    finding = only(advise(status(replace(HEALTHY, fixed=("semaphore",)), limits=[limit])))
    assert finding.command is None and "declare the provider's rate" in finding.action


def test_fixed_names_levers_only(tmp_path: Path) -> None:
    (tmp_path / "pipeline.yaml").write_text(
        "name: p\nphases:\n  a:\n    handler: m:f\n    fixed: [semaphore, speed]\n"
    )
    with pytest.raises(LeversError) as raised:
        load_pipeline(tmp_path / "pipeline.yaml")
    assert "fixed" in str(raised.value)


def test_the_bundled_pipeline_keeps_kg_ingest_one_at_a_time() -> None:
    spec = load_pipeline(Path(__file__).parent.parent / "pipeline.yaml").spec
    assert spec.phases["kg_ingest"].fixed == ["semaphore"]


@pytest.mark.parametrize(
    ("phase", "limit", "memory"),
    [
        (replace(HEALTHY, cpu_percent=79.0), None, 50),  # CPU under the threshold
        (replace(HEALTHY, cpu_percent=95.0, threads=2), None, 50),  # CPU-bound, already on threads
        (replace(HEALTHY, semaphore=2, calls_per_job=20), None, 50),  # calls already concurrent
        (replace(HEALTHY, calls_per_job=1.5, semaphore=1), None, 50),  # one call per job: nothing to overlap
        (HEALTHY, {"name": "anthropic", "rate_limited": 0, "calls": 500, "requests_per_minute": 50}, 50),
        (replace(HEALTHY, rss_mb=900.0), None, 89),  # memory under pressure's threshold
        (replace(HEALTHY, queued=40, p50_s=2.0), None, 50),  # a queue that drains in 27 s
        (replace(HEALTHY, cpu_percent=100.0, calls_per_job=0), None, 50),  # CPU-bound, no calls held back
    ],
)
def test_no_finding_below_each_symptom(
    phase: PhaseStatus, limit: dict[str, Any] | None, memory: float
) -> None:
    assert advise(status(phase, limits=[limit] if limit else [], memory=memory)) == []
