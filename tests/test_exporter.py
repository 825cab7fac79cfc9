"""Prometheus metrics served by `levers up --metrics-port`, scraped over HTTP."""

from __future__ import annotations

import socket
from pathlib import Path

import redis

from tests.conftest import StartLevers, free_port, levers, make_project, scrape, stop, try_scrape, wait_until


def test_metrics_endpoint_reports_phases(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=2, docs=2)
    assert levers("run", "docs", cwd=root).returncode == 0
    port = free_port()
    supervisor = start_levers("up", "--metrics-port", str(port), cwd=root)
    try:
        wait_until(lambda: (m := try_scrape(port)) and m["levers_workers_alive"][(("phase", "first"),)] == 2)
        metrics = scrape(port)
    finally:
        output = stop(supervisor)
    assert supervisor.returncode == 0, output
    assert metrics["levers_jobs_total"][(("outcome", "done"), ("phase", "first"))] == 2
    assert metrics["levers_queue_depth"][(("phase", "second"),)] == 0
    assert metrics["levers_jobs_stranded"][(("phase", "first"),)] == 0
    assert metrics["levers_workers_desired"][(("phase", "first"),)] == 2
    assert metrics["levers_job_duration_seconds_gcount"][(("phase", "second"),)] == 2


def test_a_taken_port_is_one_clear_line(tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path, docs=0)
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        result = levers("up", "--metrics-port", str(taken.getsockname()[1]), cwd=root)
    assert result.returncode == 2
    assert "cannot serve metrics on port" in result.stderr
    assert "Traceback" not in result.stderr
