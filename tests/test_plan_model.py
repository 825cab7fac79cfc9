"""What `levers plan` adds to the arithmetic: a recent weighted window of measurements, the hosts'
cores shared by every phase, what-ifs through the same model, and the check against a run."""

from __future__ import annotations

from typing import Any

import pytest

from levers.metrics import BUCKET_S
from levers.observing.reports import PhaseReport, SupervisorReport
from levers.pipeline.model import Pipeline
from levers.planning.capacity import build_plan, diff_plans
from levers.planning.cells import secs
from levers.planning.check import check
from levers.planning.hosts import Host, hosts_from_reports
from levers.planning.measured import Measured, PhaseWindow, Window, weigh
from levers.planning.views import diff_lines

NOW = 1_800_000_030.0  # 30 s into a minute
MINUTE = int(NOW // BUCKET_S)
TWO_CORES = (Host("h1", 2, 4096, local=True),)


def pipeline(**phases: dict[str, Any]) -> Pipeline:
    fed = {p.get("next") for p in phases.values()}
    built = {
        name: {"handler": "m:f", **({} if name in fed else {"accepts": ["*"]}), **body}
        for name, body in phases.items()
    }
    return Pipeline.model_validate({"phases": built})


def bucket(done: float, busy_s: float, cpu_s: float = 0.0) -> dict[str, float]:
    return {"done": done, "busy_s": busy_s, "cpu_s": cpu_s}


def test_job_times_follow_a_change_within_minutes() -> None:
    # ten minutes at 0.4 s a job, then four at 0.8 s: an even mean over the window lags behind
    buckets = {MINUTE - age: bucket(100, 40) for age in range(5, 15)}
    buckets |= {MINUTE - age: bucket(100, 80) for age in range(1, 5)}
    figures = weigh(buckets, Window(NOW))
    assert figures is not None
    even = (10 * 40 + 4 * 80) / 1400
    assert figures.job_seconds is not None and figures.job_seconds > even + 0.05
    assert figures.jobs == 1400


def test_throughput_leaves_out_the_minute_a_run_began_in() -> None:
    # the run began 50 s into MINUTE - 3: its first bucket holds 10 s of work, not a whole minute's
    buckets = {MINUTE - 3: bucket(20, 20), MINUTE - 2: bucket(120, 120), MINUTE - 1: bucket(120, 120)}
    buckets[MINUTE] = bucket(60, 60)  # the 30 s of this minute so far
    figures = weigh(buckets, Window(NOW))
    assert figures is not None
    assert figures.docs_per_second == pytest.approx(2.0)
    assert figures.busy_workers == pytest.approx(2.0)


def test_cpu_per_job_is_the_done_jobs_cpu() -> None:
    figures = weigh({MINUTE - 1: bucket(50, 20, cpu_s=10)}, Window(NOW))
    assert figures is not None and figures.cpu_seconds == pytest.approx(0.2)
    assert weigh({MINUTE - 1: bucket(50, 20)}, Window(NOW)).cpu_seconds is None  # type: ignore[union-attr]
    assert weigh({MINUTE - 20: bucket(50, 20)}, Window(NOW)) is None  # older than the window


def test_a_job_s_time_counts_what_taking_and_settling_it_cost_its_worker() -> None:
    # one worker, jobs of 20 ms in the handler and 15 ms between them: 28.6 docs/s, not 50
    minute = {"done": 1714, "busy_s": 34.3, "gap_s": 25.7, "gaps": 1714}
    buckets = {MINUTE - 2: minute, MINUTE - 1: minute, MINUTE: {f: v / 2 for f, v in minute.items()}}
    figures = weigh(buckets, Window(NOW))
    assert figures is not None and figures.gap_seconds == pytest.approx(0.015, rel=0.01)
    assert figures.job_seconds == pytest.approx(0.035, rel=0.01)
    assert figures.busy_workers == pytest.approx(1.0)  # busy the whole minute, kept busy by its queue
    plan = build_plan(pipeline(p={"levers": {"workers": 1}}), {"p": figures.job_seconds}, {}, TWO_CORES)
    assert plan.phases["p"].docs_per_second == pytest.approx(1714 / 60, rel=0.01)
    # a worker that measured no gap (an older levers): the handler's time alone
    older = weigh({MINUTE - 1: {"done": 1714, "busy_s": 34.3}}, Window(NOW))
    assert older is not None and older.gap_seconds is None
    assert older.job_seconds == pytest.approx(0.02, rel=0.01)


def burning(workers: int) -> Pipeline:
    return pipeline(p={"levers": {"workers": workers}})


def test_more_workers_of_a_cpu_bound_phase_on_a_saturated_host_gain_nothing() -> None:
    # the issue's run: 0.2 s of CPU a job, 4 workers on 2 cores, jobs taking 0.41 s: 9.7 docs/s
    measured, cpu = {"p": 0.41}, {"p": 0.2}
    before = build_plan(burning(4), measured, cpu, TWO_CORES)
    after = build_plan(burning(8), measured, cpu, TWO_CORES)
    assert before.paths[0].docs_per_second == pytest.approx(4 / 0.41)
    assert after.paths[0].docs_per_second == pytest.approx(10.0)  # 2 cores / 0.2 s, not 8 / 0.41
    assert after.phases["p"].cpu_bound
    why = [line for line in diff_lines(diff_plans(before, after)) if "more workers" in line]
    assert why == ["p: more workers add little or nothing: its jobs cost 0.2 s of CPU each and the "
                   "cores are all used (h1 has 2)"]  # fmt: skip


def test_more_workers_of_an_io_bound_phase_gain_up_to_the_cores() -> None:
    measured, cpu = {"p": 1.0}, {"p": 0.01}
    assert build_plan(burning(8), measured, cpu, TWO_CORES).paths[0].docs_per_second == pytest.approx(8.0)
    # 250 workers would want 2.5 cores: the 2 there are cap them
    assert build_plan(burning(250), measured, cpu, TWO_CORES).paths[0].docs_per_second == pytest.approx(200)


def test_the_phases_of_a_path_share_their_hosts_cores() -> None:
    spec = pipeline(a={"next": "b", "levers": {"workers": 4}}, b={"levers": {"workers": 4}})
    # each phase alone could do 2 / 0.1 = 20 docs/s; together they need 0.2 s of CPU a document
    plan = build_plan(spec, {"a": 0.1, "b": 0.1}, {"a": 0.1, "b": 0.1}, TWO_CORES)
    assert plan.phases["a"].docs_per_second == pytest.approx(20.0)
    path = plan.paths[0]
    assert path.docs_per_second == pytest.approx(10.0)
    assert path.cpu_host == "h1" and path.limited_by == ("cores of h1",)
    assert (
        "needs 4.0 vCPU; this host has 2: a and b will run at about 50 % of the shown rate" in plan.warnings()
    )


def test_cores_on_two_hosts_count_where_the_workers_run() -> None:
    spec = pipeline(a={"next": "b", "levers": {"workers": 4}}, b={"levers": {"workers": 4}})
    hosts = (Host("x", 2, None, {"a": 4}), Host("y", 1, None, {"b": 4}))
    plan = build_plan(spec, {"a": 0.1, "b": 0.1}, {"a": 0.1, "b": 0.1}, hosts)
    assert plan.paths[0].docs_per_second == pytest.approx(10.0)  # y's one core, for b alone
    assert plan.phases["a"].docs_per_second == pytest.approx(20.0)  # x's two, for a alone
    assert plan.phases["b"].cpu_bound and plan.paths[0].bottleneck == ("b",)


def test_declared_demand_beyond_the_host_warns_without_changing_the_rates() -> None:
    spec = pipeline(p={"levers": {"workers": 10}, "expect": {"seconds": 2},
                       "resources": {"cpu": 0.41, "ram_mb": 600}})  # fmt: skip
    plan = build_plan(spec, hosts=TWO_CORES)
    assert plan.paths[0].docs_per_second == pytest.approx(5.0)
    assert plan.warnings() == [
        "needs 4.1 vCPU (declared resources.cpu); this host has 2: p will run at about 49 % of the shown "
        "rate",
        "the workers need 6000 MB RAM; this host has 4096 MB: not all of them fit at once",
    ]


def test_hosts_come_from_the_supervisors_reports() -> None:
    def report(host: str, pid: int, cores: int | None, **alive: int) -> SupervisorReport:
        phases = {
            p: PhaseReport(desired=n, alive=n, retiring=0, state="ok", restarts=0, pids=[])
            for p, n in alive.items()
        }
        return SupervisorReport(host, pid, NOW, "d", None, 50.0, phases, cores=cores, memory_mb=8192.0)

    hosts = hosts_from_reports(
        [report("a", 1, 8, x=2), report("a", 2, 8, y=3), report("b", 3, None, x=1, y=2)]
    )
    assert [(h.name, h.cores, dict(h.workers or {})) for h in hosts] == [
        ("a", 8, {"x": 2, "y": 3}),  # two supervisors on one machine share its cores
        ("b", 3, {"x": 1, "y": 2}),  # an older report without cores: one per worker it runs
    ]


def test_the_cores_other_programs_keep_busy_are_not_the_workers() -> None:
    def report(pid: int, busy: float | None, own: float | None, **alive: int) -> SupervisorReport:
        phases = {p: PhaseReport(desired=n, alive=n, retiring=0, state="ok", restarts=0, pids=[])
                  for p, n in alive.items()}  # fmt: skip
        return SupervisorReport("h1", pid, NOW, "d", None, 50.0, phases, cores=2,
                                busy_cores=busy, own_cores=own)  # fmt: skip

    # two supervisors on one 2-core host: it was 1.9 cores busy, 0.4 of them their own processes
    (host,) = hosts_from_reports([report(1, 1.9, 0.3, p=4), report(2, 1.8, 0.1, q=1)])
    assert host.others == pytest.approx(1.5) and host.free_cores == pytest.approx(0.5)
    # a supervisor that does not say what its processes took: nothing is taken off
    assert hosts_from_reports([report(1, 1.9, 0.3, p=4), report(2, None, None, q=1)])[0].others == 0

    # 4 workers, 0.2 s of CPU a job: the 2 cores would give 10 docs/s, the 0.5 left give 2.5
    plan = build_plan(burning(4), {"p": 0.41}, {"p": 0.2}, (host,))
    assert plan.paths[0].docs_per_second == pytest.approx(2.5)
    more = build_plan(burning(8), {"p": 0.41}, {"p": 0.2}, (host,))
    assert more.paths[0].docs_per_second == pytest.approx(2.5)
    why = [line for line in diff_lines(diff_plans(plan, more)) if "more workers" in line]
    assert why == ["p: more workers add little or nothing: its jobs cost 0.2 s of CPU each and the cores "
                   "are all used (h1 has 2 (1.5 busy with other programs))"]  # fmt: skip
    # a busy host that is busy with levers' own workers keeps its cores for them
    (own,) = hosts_from_reports([report(1, 2.0, 1.95, p=4)])
    assert own.free_cores == 2


def window(**phases: tuple[float, float, float]) -> Measured:
    """Phase -> (job seconds, documents/s, busy workers)."""
    return Measured(Window(NOW), {name: PhaseWindow(600, job_s, None, rate, busy)
                                  for name, (job_s, rate, busy) in phases.items()})  # fmt: skip


def test_check_predicts_each_phase_from_its_capacity_or_what_reached_it() -> None:
    spec = pipeline(a={"next": "b", "levers": {"workers": 2}}, b={"next": "c", "levers": {"workers": 2}},
                    c={"levers": {"workers": 4}})  # fmt: skip
    # a gets 6 docs/s submitted (it could do 200); b, busy, does 2 / 0.5; c does what b passes on
    measured = window(a=(0.01, 6.0, 0.06), b=(0.5, 3.9, 1.95), c=(0.1, 3.8, 0.4))
    plan = build_plan(spec, measured.job_seconds, measured.cpu_seconds, TWO_CORES)
    rows = {row.phase: row for row in check(plan, spec, measured)}
    assert rows["a"].arrival and rows["a"].error is None
    assert rows["b"].loaded and rows["b"].predicted == pytest.approx(4.0)
    assert rows["b"].error == pytest.approx(4.0 / 3.9 - 1)
    assert not rows["c"].loaded and rows["c"].predicted == pytest.approx(4.0)  # not its 40 docs/s


def test_check_holds_a_busy_cpu_bound_phase_to_its_cores() -> None:
    spec = burning(8)
    measured = Measured(Window(NOW), {"p": PhaseWindow(600, 0.8, 0.2, 9.7, 7.8)})
    plan = build_plan(spec, measured.job_seconds, measured.cpu_seconds, TWO_CORES)
    [row] = check(plan, spec, measured)
    assert row.predicted == pytest.approx(10.0)  # 2 cores / 0.2 s; workers / job s says 10 too
    [row] = check(
        build_plan(spec, measured.job_seconds, measured.cpu_seconds, (Host("h", 1),)), spec, measured
    )
    assert row.predicted == pytest.approx(5.0)


@pytest.mark.parametrize(("seconds", "shown"), [(0.0024, "0.0024"), (0.49, "0.49"), (0.774, "0.774"),
                                                (9, "9"), (90, "90"), (1234.5, "1234")])  # fmt: skip
def test_job_times_keep_their_precision(seconds: float, shown: str) -> None:
    assert secs(seconds) == shown
