"""Prometheus metrics served by `levers up --metrics-port`, scraped over HTTP."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import psutil
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from levers.observing.exporter import Share, share
from levers.observing.reports import SupervisorLease
from tests.conftest import (
    StartLevers,
    free_port,
    levers,
    make_project,
    parsed,
    scrape,
    scrape_text,
    stop,
    try_scrape,
    wait_until,
)

first, second = (("phase", "first"), ("pipeline", "toy")), (("phase", "second"), ("pipeline", "toy"))


def test_metrics_endpoint_reports_phases(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=2, docs=2)
    assert levers("run", "docs", cwd=root).returncode == 0
    port = free_port()
    supervisor = start_levers("up", "--metrics-port", str(port), cwd=root)
    try:
        wait_until(lambda: (m := try_scrape(port)) and m.get("levers_workers_alive", {}).get(first) == 2)
        metrics = scrape(port)
    finally:
        output = stop(supervisor)
    assert supervisor.returncode == 0, output
    assert metrics["levers_jobs_total"][(("outcome", "done"), *first)] == 2
    assert metrics["levers_queue_depth"][second] == 0
    assert metrics["levers_jobs_stranded"][first] == 0
    assert metrics["levers_workers_desired"][first] == 2
    assert metrics["levers_job_duration_seconds_count"][second] == 2
    # what Prometheus derives itself is not exported
    assert not {"levers_throughput_per_second", "levers_utilization_ratio"} & set(metrics)


def histograms(text: str) -> dict[tuple[str, str], list[Sample]]:
    """The samples of levers_job_duration_seconds, per (pipeline, phase), parsed by prometheus_client."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    family = families["levers_job_duration_seconds"]
    assert family.type == "histogram"
    found: dict[tuple[str, str], list[Sample]] = {}
    for sample in family.samples:
        found.setdefault((sample.labels["pipeline"], sample.labels["phase"]), []).append(sample)
    return found


def test_job_durations_are_a_cumulative_histogram(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=2, docs=3)
    (root / "docs" / "bad.txt").write_text("FAIL on purpose")
    assert levers("run", "docs", cwd=root).returncode == 1
    # every job runs again: stored results would stand in for the handlers, and time nothing
    assert levers("run", "docs", "--no-reuse", cwd=root).returncode == 1
    port = free_port()
    supervisor = start_levers("up", "--metrics-port", str(port), cwd=root)
    try:
        wait_until(lambda: (m := try_scrape(port)) and first in m.get("levers_queue_depth", {}))
        text = scrape_text(port)
    finally:
        stop(supervisor)

    found = histograms(text)
    assert set(found) == {("toy", "first"), ("toy", "second")}
    for samples in found.values():
        buckets = [s for s in samples if s.name.endswith("_bucket")]
        bounds = [float(s.labels["le"]) for s in buckets]
        counts = [s.value for s in buckets]
        (count,) = [s.value for s in samples if s.name.endswith("_count")]
        (total,) = [s.value for s in samples if s.name.endswith("_sum")]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf")
        assert counts == sorted(counts), "buckets are cumulative"
        assert counts[-1] == count and total > 0
    # every attempt of both runs counts, the failed and retried ones too
    attempts = sum(
        v for labels, v in parsed(text)["levers_jobs_total"].items() if ("phase", "first") in labels
    )
    assert [s.value for s in found["toy", "first"] if s.name.endswith("_count")] == [attempts]
    assert attempts > 8


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_metrics(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, docs=2)
    assert levers("run", "docs", cwd=root).returncode == 0
    port = free_port()
    supervisor = start_levers("up", "--metrics-port", str(port), cwd=root)
    try:
        wait_until(lambda: (m := try_scrape(port)) and "levers_job_duration_seconds_count" in m)
        text = scrape_text(port)
    finally:
        stop(supervisor)
    # promtool reads the text format, and exits non-zero on a malformed family and on lint findings
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def listening_address(port: int) -> str:
    found = [
        c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port
    ]
    return found[0] if found else ""


@pytest.mark.parametrize(
    ("flags", "address"), [((), "127.0.0.1"), (("--metrics-host", "0.0.0.0"), "0.0.0.0")]
)
def test_metrics_listen_on_the_loopback_unless_told(
    tmp_path: Path, redis_url: str, flags: tuple[str, ...], address: str, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, docs=0)
    port = free_port()
    supervisor = start_levers("up", "--metrics-port", str(port), *flags, cwd=root)
    try:
        wait_until(lambda: try_scrape(port) is not None)
        assert listening_address(port) == address
    finally:
        stop(supervisor)


def series(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> set[str]:
    return {dict(labels)["phase"] for labels in metrics.get(name, {})}


def test_two_supervisors_export_each_phase_once(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, docs=0)
    ports = [free_port(), free_port()]
    supervisors = [start_levers("up", "--metrics-port", str(port), cwd=root) for port in ports]
    try:

        def every_phase_once() -> bool:
            scraped = [try_scrape(port) for port in ports]
            if None in scraped:
                return False
            served = [series(m, "levers_queue_depth") for m in scraped if m is not None]
            return sorted(served, key=len) == [set(), {"first", "second"}]

        wait_until(every_phase_once)
        owner = 0 if series(scrape(ports[0]), "levers_queue_depth") else 1
        supervisors[owner].kill()  # its lease lapses; the other supervisor's exporter takes the phases
        supervisors[owner].communicate(timeout=30)
        survivor = ports[1 - owner]
        wait_until(
            lambda: series(scrape(survivor), "levers_job_duration_seconds_count") == {"first", "second"}
        )
    finally:
        for process in supervisors:
            if process.poll() is None:
                stop(process)


def lease(id: str, pid: int, phases: list[str], lapsed: bool = False) -> SupervisorLease:
    return SupervisorLease(id, "host", pid, phases, "v1", 1, 0.0, lapsed)


def test_each_phase_has_one_exporter() -> None:
    leases = [lease("a", 1, ["first"]), lease("b", 2, ["first", "second"]), lease("c", 3, ["second"])]
    phases = ["first", "second", "third"]

    # the lowest live id running a phase serves it; a phase nobody runs, the lowest of all
    assert share(leases, "host", 1, phases) == Share(frozenset({"first", "third"}), limits=True)
    assert share(leases, "host", 2, phases) == Share(frozenset({"second"}), limits=False)
    assert share(leases, "host", 3, phases) == Share(frozenset(), limits=False)
    # a lapsed supervisor serves nothing, and the next one takes its part
    leases[0] = lease("a", 1, ["first"], lapsed=True)
    assert share(leases, "host", 1, phases) == Share(frozenset(), limits=False)
    assert share(leases, "host", 2, phases) == Share(frozenset(phases), limits=True)
    # one whose supervisor holds no lease yet serves nothing rather than twice
    assert share(leases, "other", 2, phases) == Share(frozenset(), limits=False)


def test_a_taken_port_is_one_clear_line(tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path, docs=0)
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = levers("up", "--metrics-port", str(port), cwd=root)
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_address_not_of_this_host_is_one_clear_line(tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path, docs=0)
    result = levers("up", "--metrics-port", "9", "--metrics-host", "192.0.2.1", cwd=root)
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot serve metrics on 192.0.2.1:9")
    assert len(result.stderr.splitlines()) == 1
