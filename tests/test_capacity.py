"""The capacity model: the seed write-up's figures exactly, and every edge it has to be honest about."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from levers.errors import UsageError
from levers.pipeline.loading import load_pipeline
from levers.pipeline.model import Phase, Pipeline
from levers.planning.capacity import (
    Plan,
    build_plan,
    diff_plans,
    drain_seconds,
    job_seconds,
    keeps_up,
    parse_rate,
)

SEED = Path(__file__).resolve().parents[1] / "examples" / "seed-pipeline.yaml"


def seed_plan(measured: dict[str, float] | None = None) -> Plan:
    return build_plan(load_pipeline(SEED).spec, measured)


def pipeline(**phases: dict[str, Any]) -> Pipeline:
    """A pipeline of phases given as dicts; each is an entry phase unless another names it in next."""
    fed = {p.get("next") for p in phases.values()}
    built = {
        name: {"handler": "m:f", **({} if name in fed else {"accepts": ["*"]}), **body}
        for name, body in phases.items()
    }
    return Pipeline.model_validate({"phases": built})


def test_seed_throughput_per_phase() -> None:
    plan = seed_plan()
    rates = {name: p.docs_per_second for name, p in plan.phases.items()}
    assert rates == {
        "extraction": pytest.approx(3 / 90),
        "ingest_extract": pytest.approx(2 / 120),
        "chunking": pytest.approx(3 / 9),
        "kg_ingest": pytest.approx(2 / 60),
    }
    assert plan.phases["chunking"].job_seconds == 9
    assert plan.phases["extraction"].docs_per_hour == pytest.approx(120)


def test_seed_paths_bottlenecks_latency_and_burst() -> None:
    extraction, ingest = seed_plan().paths
    assert extraction.phases == ("extraction", "chunking", "kg_ingest")
    # 3/90 and 2/60 tie: both are the bottleneck of the extraction path
    assert extraction.bottleneck == ("extraction", "kg_ingest")
    assert extraction.latency_seconds == 159
    assert drain_seconds(extraction, 100) == pytest.approx(3000)
    assert ingest.bottleneck == ("ingest_extract",)
    assert ingest.latency_seconds == 189
    assert drain_seconds(ingest, 100) == pytest.approx(6000)


def test_seed_overall_bottleneck_and_marks() -> None:
    plan = seed_plan()
    assert plan.bottleneck == ("ingest_extract",)
    assert plan.path_bottlenecks == {"extraction", "kg_ingest", "ingest_extract"}
    assert plan.share("chunking") == pytest.approx(0.1)
    assert plan.share("kg_ingest") == pytest.approx(1.0)


def test_seed_totals() -> None:
    totals = seed_plan().totals()
    assert totals.workers == 10
    assert totals.cpu == pytest.approx(4.1)
    assert totals.ram_mb == pytest.approx(2050)
    assert totals.missing_cpu == totals.missing_ram == ()


def test_seed_keeps_up_with_ten_an_hour() -> None:
    rate = parse_rate("10/hour")
    assert rate.per_second == pytest.approx(0.0028, abs=1e-4)
    assert all(keeps_up(path, rate) for path in seed_plan().paths)
    extraction, ingest = seed_plan().paths
    between = parse_rate("0.02/s")  # above ingest_extract's 0.017, below extraction's 0.033
    assert keeps_up(extraction, between) is True
    assert keeps_up(ingest, between) is False


@pytest.mark.parametrize(("semaphore", "expected"), [(1, 63), (7, 12), (10, 9), (20, 6), (50, 6)])
def test_calls_through_the_semaphore(semaphore: int, expected: float) -> None:
    phase = Phase.model_validate(
        {"handler": "m:f", "levers": {"semaphore": semaphore},
         "expect": {"calls": 20, "call_seconds": 3, "fixed_seconds": 3}}
    )  # fmt: skip
    assert job_seconds(phase) == (expected, "expect")


def test_fixed_seconds_default_to_zero() -> None:
    phase = Phase.model_validate({"handler": "m:f", "expect": {"calls": 5, "call_seconds": 2}})
    assert job_seconds(phase) == (10, "expect")


@pytest.mark.parametrize(
    "expect",
    [
        {"seconds": 9, "calls": 20},
        {"seconds": 9, "fixed_seconds": 1},
        {"calls": 20},
        {"call_seconds": 3},
        {},
    ],
)
def test_expect_takes_exactly_one_form(expect: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="seconds, or calls with call_seconds"):
        Phase.model_validate({"handler": "m:f", "expect": expect})


def test_measured_durations_win_over_expect() -> None:
    plan = seed_plan(measured={"kg_ingest": 30.0})
    assert plan.phases["kg_ingest"].source == "measured"
    assert plan.phases["kg_ingest"].docs_per_second == pytest.approx(2 / 30)
    assert plan.paths[0].bottleneck == ("extraction",)
    assert plan.paths[0].latency_seconds == 129


def test_a_phase_without_expect_is_unknown_not_invented() -> None:
    spec = pipeline(a={"next": "b", "levers": {"workers": 2}, "expect": {"seconds": 10}}, b={})
    plan = build_plan(spec)
    assert plan.phases["b"].job_seconds is None
    assert plan.phases["b"].source == "unknown"
    assert plan.phases["b"].docs_per_second is None
    (path,) = plan.paths
    assert not path.complete
    assert path.unknown == ("b",)
    assert path.latency_seconds is None
    assert drain_seconds(path, 100) is None
    # the known phase bounds the path: a rate above it is too much whatever b does
    assert path.docs_per_second == pytest.approx(0.2)
    assert keeps_up(path, parse_rate("1/s")) is False
    assert keeps_up(path, parse_rate("1/hour")) is None
    assert any("no job time for b" in w for w in plan.warnings())


def test_measurements_make_an_unknown_phase_known() -> None:
    spec = pipeline(a={"expect": {"seconds": 10}})
    assert build_plan(spec, measured={"a": 5}).phases["a"].job_seconds == 5
    assert build_plan(pipeline(a={}), measured={"a": 5}).paths[0].complete


def test_zero_workers_is_zero_capacity_and_flagged() -> None:
    spec = pipeline(
        a={"next": "b", "expect": {"seconds": 10}},
        b={"levers": {"workers": 0}, "expect": {"seconds": 5}, "resources": {"cpu": 1, "ram_mb": 100}},
    )
    plan = build_plan(spec)
    assert plan.phases["b"].docs_per_second == 0
    (path,) = plan.paths
    assert path.bottleneck == ("b",)
    assert path.stalled == ("b",)
    assert path.latency_seconds is None
    assert drain_seconds(path, 10) is None
    assert keeps_up(path, parse_rate("1/day")) is False
    assert plan.totals().cpu == 0  # no worker, no CPU
    assert any("b has 0 workers" in w for w in plan.warnings())


def test_resources_missing_are_listed_not_guessed() -> None:
    spec = pipeline(a={"expect": {"seconds": 1}, "resources": {"cpu": 0.5}, "levers": {"workers": 4}})
    totals = build_plan(spec).totals()
    assert totals.cpu == 2
    assert totals.ram_mb == 0
    assert totals.missing_ram == ("a",)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("10/hour", 10 / 3600),
        ("0.5/s", 0.5),
        ("30/min", 0.5),
        ("2 per day", 2 / 86400),
        ("10 / hours", 10 / 3600),
        ("6/h", 6 / 3600),
        (".5/sec", 0.5),
        ("120/Minutes", 2.0),
    ],
)
def test_rates_parse(text: str, per_second: float) -> None:
    assert parse_rate(text).per_second == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["10", "ten/hour", "10/ms", "10/fortnight", "-1/s", "/hour", ""])
def test_unreadable_rates_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="cannot read the rate"):
        parse_rate(text)


def test_diff_moves_the_bottleneck_when_extraction_doubles() -> None:
    before = seed_plan()
    spec = load_pipeline(SEED).spec
    doubled = spec.model_copy(
        update={"phases": {**spec.phases, "extraction": spec.phases["extraction"].model_copy(
            update={"levers": spec.phases["extraction"].levers.model_copy(update={"workers": 6})})}}
    )  # fmt: skip
    diff = diff_plans(before, build_plan(doubled))
    assert [c.status for c in diff.phases] == ["changed", "same", "same", "same"]
    extraction_path = diff.paths[0]
    assert extraction_path.moved
    assert extraction_path.after is not None and extraction_path.after.bottleneck == ("kg_ingest",)
    assert not diff.bottleneck_moved  # ingest_extract is still the slowest phase overall
    assert diff.moved


def test_diff_of_equal_plans_moves_nothing() -> None:
    diff = diff_plans(seed_plan(), seed_plan())
    assert not diff.moved
    assert {c.status for c in diff.phases} == {"same"}


def test_diff_lists_added_and_removed_phases() -> None:
    before = build_plan(pipeline(a={"expect": {"seconds": 1}}, old={"expect": {"seconds": 1}}))
    after = build_plan(pipeline(a={"expect": {"seconds": 1}}, new={"expect": {"seconds": 2}}))
    diff = diff_plans(before, after)
    assert [(c.name, c.status) for c in diff.phases] == [("a", "same"), ("new", "added"), ("old", "removed")]
    assert [(p.entry, p.before is None, p.after is None) for p in diff.paths] == [
        ("a", False, False), ("new", True, False), ("old", False, True),
    ]  # fmt: skip
