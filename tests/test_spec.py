"""The pipeline model's bounds: every number has an upper bound, booleans are not numbers, and
checks across phases take time linear in the number of phases.

Problems are checked through ``parse_pipeline``, so each is also located at FILE:LINE:COL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from levers.errors import SpecError, SpecProblem
from levers.pipeline import model
from levers.pipeline.loading import parse_pipeline
from levers.pipeline.model import Phase, Pipeline, cross_checks
from levers.pipeline.schema import pipeline_schema

SHOWN = "pipeline.yaml"


def problems(text: str) -> list[SpecProblem]:
    with pytest.raises(SpecError) as caught:
        parse_pipeline(text.encode(), Path(SHOWN))
    return caught.value.problems


def phase_with(line: str) -> str:
    """A one-phase pipeline with ``line`` (YAML at the phase's level) added."""
    return f"phases:\n  a:\n    handler: json:loads\n    accepts: [pdf]\n    {line}\n"


def located_at(text: str, problem: SpecProblem, target: str) -> bool:
    """Whether ``problem`` points at the first ``target`` on its line of ``text``."""
    line = text.splitlines()[problem.line - 1]
    return target in line and problem.column == line.index(target) + 1


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


# --- upper bounds -------------------------------------------------------------------------------

BOUNDED = [
    ("levers: {workers: %s}", "phases.a.levers.workers", model.MAX_WORKERS),
    ("levers: {semaphore: %s}", "phases.a.levers.semaphore", model.MAX_SEMAPHORE),
    ("levers: {threads: %s}", "phases.a.levers.threads", model.MAX_THREADS),
    ("timeout: %s", "phases.a.timeout", model.MAX_TIMEOUT_S),
    ("retries: %s", "phases.a.retries", model.MAX_RETRIES),
    ("retry_delay: %s", "phases.a.retry_delay", model.MAX_RETRY_DELAY_S),
    ("expect: {seconds: %s}", "phases.a.expect.seconds", model.MAX_TIMEOUT_S),
    ("expect: {calls: %s, call_seconds: 1}", "phases.a.expect.calls", model.MAX_CALLS_PER_JOB),
    ("expect: {calls: 1, call_seconds: %s}", "phases.a.expect.call_seconds", model.MAX_TIMEOUT_S),
    (
        "expect: {calls: 1, call_seconds: 1, fixed_seconds: %s}",
        "phases.a.expect.fixed_seconds",
        model.MAX_TIMEOUT_S,
    ),
    ("resources: {cpu: %s}", "phases.a.resources.cpu", model.MAX_CPU),
    ("resources: {ram_mb: %s}", "phases.a.resources.ram_mb", model.MAX_RAM_MB),
]


@pytest.mark.parametrize(("line", "key", "bound"), BOUNDED)
def test_a_phase_number_at_its_bound_loads_and_one_past_it_is_refused_with_the_bound(
    line: str, key: str, bound: int
) -> None:
    parse_pipeline(phase_with(line % bound).encode(), Path(SHOWN))
    text = phase_with(line % (bound + 1))

    [found] = problems(text)

    assert found.message == f"{key}: {bound + 1} is above the bound of {bound}; set at most {bound}"
    assert located_at(text, found, str(bound + 1))


@pytest.mark.parametrize(
    ("key", "bound"),
    [
        ("requests_per_minute", model.MAX_RATE),
        ("concurrency", model.MAX_CONCURRENCY),
        ("window_seconds", model.MAX_WINDOW_S),
    ],
)
def test_a_limit_number_past_its_bound_is_refused(key: str, bound: int) -> None:
    text = phase_with(f"timeout: 60\nlimits:\n  api: {{{key}: {bound * 10}}}")

    [found] = problems(text)

    assert (
        found.message == f"limits.api.{key}: {bound * 10} is above the bound of {bound}; set at most {bound}"
    )


@pytest.mark.parametrize("value", ["2147483648", "18446744073709551616", str(10**30)])
def test_the_numbers_that_broke_workers_alarms_and_expiry_are_refused(value: str) -> None:
    for line in ("levers: {workers: %s}", "timeout: %s", "retries: %s"):
        [found] = problems(phase_with(line % value))
        assert f"{value} is above the bound of" in found.message


def test_every_number_in_the_schema_has_an_upper_bound() -> None:
    unbounded = [path for path, node in _schema_numbers(pipeline_schema()) if "maximum" not in node]
    assert unbounded == []


def _schema_numbers(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if node.get("type") in ("integer", "number"):
            yield path, node
        for key, child in node.items():
            yield from _schema_numbers(child, f"{path}/{key}")
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _schema_numbers(child, f"{path}/{index}")


# --- booleans and other impostors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "written", "expected"),
    [
        ("levers: {workers: true}", "phases.a.levers.workers", "true", "a whole number"),
        ("levers: {workers: &on true}", "phases.a.levers.workers", "true", "a whole number"),
        ("levers: {semaphore: 3.0}", "phases.a.levers.semaphore", "3.0", "a whole number"),
        ("timeout: '60'", "phases.a.timeout", "'60'", "a whole number"),
        ("expect: {seconds: false}", "phases.a.expect.seconds", "false", "a number"),
        ("expect: {seconds: .inf}", "phases.a.expect.seconds", "inf", "a finite number"),
        ("resources: {cpu: .nan}", "phases.a.resources.cpu", "nan", "a finite number"),
    ],
)
def test_a_number_written_as_something_else_is_refused_saying_what_was_written(
    line: str, key: str, written: str, expected: str
) -> None:
    [found] = problems(phase_with(line))
    assert found.message == f"{key}: expected {expected}, not {written}"


def test_requests_per_minute_true_is_not_one() -> None:
    text = phase_with("timeout: 60\nlimits:\n  api: {requests_per_minute: true}")

    [found] = problems(text)

    assert found.message == "limits.api.requests_per_minute: expected a whole number, not true"
    assert located_at(text, found, "true")


def test_a_whole_number_is_taken_where_a_number_is_expected() -> None:
    text = phase_with("expect: {calls: 20, call_seconds: 3, fixed_seconds: 3}\n    resources: {cpu: 1}")
    phase = parse_pipeline(text.encode(), Path(SHOWN)).spec.phases["a"]
    assert phase.expect is not None and phase.expect.call_seconds == 3.0
    assert phase.resources is not None and phase.resources.cpu == 1.0


# --- counts across phases -------------------------------------------------------------------------


def chain(count: int, workers: int = 1) -> str:
    lines = ["phases:"]
    for index in range(count):
        lines += [f"  p{index}:", "    handler: json:loads", f"    levers: {{workers: {workers}}}"]
        lines += ["    accepts: [pdf]"] if index == 0 else []
        lines += [f"    next: p{index + 1}"] if index < count - 1 else []
    return "\n".join(lines) + "\n"


def test_workers_in_all_phases_are_bounded_for_one_machine() -> None:
    per_phase = model.MAX_WORKERS
    count = model.MAX_WORKERS_TOTAL // per_phase
    parse_pipeline(chain(count, per_phase).encode(), Path(SHOWN))

    [found] = problems(chain(count + 1, per_phase))

    total = (count + 1) * per_phase
    assert found.message == (
        f"phases: {total} workers in all is above the bound of {model.MAX_WORKERS_TOTAL} "
        "(one `levers up` runs them all on one machine); lower some phases' workers (or autoscale max)"
    )
    assert (found.line, found.column) == (1, 1)


def test_the_number_of_phases_is_bounded() -> None:
    parse_pipeline(chain(model.MAX_PHASES).encode(), Path(SHOWN))

    [found] = problems(chain(model.MAX_PHASES + 1))

    assert found.message == (
        f"phases: {model.MAX_PHASES + 1} entries is above the bound of {model.MAX_PHASES}; "
        f"keep at most {model.MAX_PHASES}"
    )


class CountingPhases(dict[str, Phase]):
    """A phases mapping that counts how often it is looked into."""

    lookups = 0

    def __getitem__(self, key: str) -> Phase:
        CountingPhases.lookups += 1
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        CountingPhases.lookups += 1
        return super().__contains__(key)


@pytest.mark.parametrize("closing", [None, "p0", "p500"])
def test_cross_checks_look_at_each_phase_a_bounded_number_of_times(closing: str | None) -> None:
    count = 1000  # past the bound on phases: the checks must not depend on it to stay fast
    phases = CountingPhases(
        (f"p{i}", Phase(handler="m:f", next=f"p{i + 1}" if i < count - 1 else closing)) for i in range(count)
    )
    CountingPhases.lookups = 0

    found = cross_checks(Pipeline.model_construct(phases=phases))

    assert CountingPhases.lookups < 10 * count
    if closing is not None:
        [(where, message)] = found
        assert where == ("phases", closing, "next")  # the loop's first phase in file order
        assert message.startswith(f"phases form a cycle: {closing} -> p{int(closing[1:]) + 1} -> ")
        assert message.endswith(f"p{count - 1} -> {closing}")
