"""A recorded run of the bundled pipeline, replayed: the metrics buckets and supervisor reports a
real run left in Redis (tests/data/plan/README.md says how they were recorded) go back into a real
server, and plan, reading them as `levers plan --check` does, must agree with what that run did."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from levers import keys
from levers.observing.reports import SupervisorReport
from levers.pipeline.loading import load_pipeline
from levers.planning.hosts import hosts_from_reports
from levers.planning.measured import read_measured
from levers.planning.whatif import plan_report

DATA = Path(__file__).resolve().parent / "data" / "plan"
TARGET = 0.15


def test_plan_matches_the_recorded_run_within_15_percent_per_phase(connection: redis.Redis) -> None:
    run = json.loads((DATA / "bundled-run.json").read_text())
    with connection.pipeline(transaction=False) as pipe:
        for phase, minutes in run["buckets"].items():
            for minute, fields in minutes.items():
                pipe.hset(keys.phase_metrics(run["pipeline"], phase, int(minute)), mapping=fields)
        pipe.execute()
    spec_file = DATA / "pipeline.yaml"
    spec = load_pipeline(spec_file).spec
    reports = [r for r in map(SupervisorReport.from_json, run["reports"]) if r is not None]

    measured = read_measured(connection, spec.name, list(spec.phases), run["now"])
    report = plan_report(spec_file, measured=measured, hosts=hosts_from_reports(reports), checking=True)

    assert report.checked is not None
    rows = {row.phase: row for row in report.checked}
    assert set(rows) == {"extraction", "chunking", "kg_ingest"}
    assert rows["kg_ingest"].loaded  # the run's bottleneck: its capacity is what the plan predicts
    errors = {name: row.error for name, row in rows.items() if row.error is not None}
    assert set(errors) == {"chunking", "kg_ingest"}  # extraction did what was submitted
    assert all(abs(error) <= TARGET for error in errors.values()), errors
