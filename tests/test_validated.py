"""The validated pipeline kept beside its file: the same bytes load from it without a parse, and
a record that does not match the file, the model or its owner, or breaks the model's bounds, is
never used."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from levers.errors import SpecError
from levers.pipeline import loading, validated
from levers.pipeline.loading import load_pipeline
from levers.pipeline.outline import outline_of
from levers.pipeline.validated import record_path
from tests.conftest import TOY_PIPELINE

Tamper = Callable[[dict[str, Any]], None]


@pytest.fixture
def pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A valid pipeline.yaml (first phase: 2 workers) beside an existing state dir."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".levers").mkdir()
    path = tmp_path / "pipeline.yaml"
    path.write_text(TOY_PIPELINE.format(workers=2, seconds=0))
    return path


def record_of(pipeline: Path) -> Path:
    return record_path(pipeline.parent / ".levers", pipeline)


def workers(pipeline: Path) -> int:
    return load_pipeline(pipeline).spec.phases["first"].levers.workers


def unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, parsing the file fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was parsed")

    monkeypatch.setattr(loading, "parse_pipeline", refuse)


def unvalidated(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, validating a record with the model fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the record was validated")

    monkeypatch.setattr(validated, "spec_of", refuse)


def tamper(pipeline: Path, change: Tamper, mode: int = 0o600) -> None:
    """Change the kept record as ``change`` says, the file's digest left as it is."""
    path = record_of(pipeline)
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    path.chmod(mode)


def five_workers(record: dict[str, Any]) -> None:
    record["spec"]["phases"]["first"]["levers"]["workers"] = 5


def test_the_same_bytes_load_again_without_a_parse(pipeline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_pipeline(pipeline)
    assert record_of(pipeline).stat().st_mode & 0o777 == 0o600
    unparsed(monkeypatch)

    again = load_pipeline(pipeline)

    assert again == first


def test_new_bytes_are_parsed_though_size_and_mtime_are_the_same(pipeline: Path) -> None:
    assert workers(pipeline) == 2
    before = pipeline.stat()
    pipeline.write_text(pipeline.read_text().replace("workers: 2", "workers: 7"))
    os.utime(pipeline, ns=(before.st_atime_ns, before.st_mtime_ns))

    assert workers(pipeline) == 7


def test_a_broken_edit_is_reported_at_its_line(pipeline: Path) -> None:
    load_pipeline(pipeline)
    text = pipeline.read_text().replace("workers: 2", "workers: -2")
    pipeline.write_text(text)
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "workers: -2" in row)

    with pytest.raises(SpecError) as caught:
        load_pipeline(pipeline)

    assert [(p.line, "workers" in p.message) for p in caught.value.problems] == [(line, True)]


def test_a_load_creates_no_state_dir(pipeline: Path) -> None:
    (pipeline.parent / ".levers").rmdir()

    load_pipeline(pipeline)

    assert not (pipeline.parent / ".levers").exists()


@pytest.mark.parametrize(
    ("change", "mode"),
    [
        (lambda r: r["spec"]["phases"]["first"]["levers"].update(workers=10**6), 0o600),  # past the bound
        (lambda r: r["spec"]["phases"]["second"].update(next="first"), 0o600),  # a cycle
        (lambda r: r.update(spec=[]), 0o600),
        (lambda r: r.update(model="0" * 64), 0o600),  # kept under another model
        (five_workers, 0o620),  # others may write it
        (five_workers, 0o602),
    ],
    ids=["unbounded", "cycle", "not a pipeline", "another model", "group-writable", "world-writable"],
)
def test_a_record_that_is_not_sound_is_not_used(pipeline: Path, change: Tamper, mode: int) -> None:
    load_pipeline(pipeline)
    record = record_of(pipeline).read_text()
    if change is not five_workers:
        five_workers_record = json.loads(record)
        five_workers(five_workers_record)  # were it used, the load would say 5
        record_of(pipeline).write_text(json.dumps(five_workers_record))
    tamper(pipeline, change, mode)

    assert workers(pipeline) == 2


def test_a_record_that_is_a_link_is_not_used(pipeline: Path) -> None:
    load_pipeline(pipeline)
    elsewhere = pipeline.parent / "elsewhere.json"
    record_of(pipeline).rename(elsewhere)
    record = json.loads(elsewhere.read_text())
    five_workers(record)
    elsewhere.write_text(json.dumps(record))
    record_of(pipeline).symlink_to(elsewhere)

    assert workers(pipeline) == 2


@pytest.mark.parametrize("text", ["", "not json", "[]", "{}", "[" * 100_000])
def test_a_record_that_is_not_json_of_one_is_a_miss(pipeline: Path, text: str) -> None:
    load_pipeline(pipeline)
    record_of(pipeline).write_text(text)

    assert workers(pipeline) == 2
    assert json.loads(record_of(pipeline).read_text())["spec"]["name"] == "toy"  # kept again


def test_a_pipeline_read_back_counts_as_given_only_what_the_file_gave(
    pipeline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """expect: with seconds alone is valid; the defaults of its other form, written out, would not be."""
    text = pipeline.read_text()
    pipeline.write_text(text.replace("    retries: 1\n", "    retries: 1\n    expect: {seconds: 4}\n"))
    first = load_pipeline(pipeline)
    unparsed(monkeypatch)

    assert load_pipeline(pipeline) == first


def test_options_json_cannot_hold_as_they_are_are_parsed_each_time(
    pipeline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = pipeline.read_text()
    pipeline.write_text(text.replace("options: {seconds: 0}", "options: {seconds: 0, since: 2026-12-02}"))
    first = load_pipeline(pipeline)
    assert first.spec.phases["first"].options["since"] == datetime.date(2026, 12, 2)
    assert not record_of(pipeline).exists()

    assert load_pipeline(pipeline) == first


def test_the_same_bytes_give_their_outline_without_the_model(
    pipeline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `levers status` reads comes from the record alone: no parse, no validation."""
    expected = outline_of(load_pipeline(pipeline).spec)
    unparsed(monkeypatch)
    unvalidated(monkeypatch)

    outline = load_pipeline(pipeline).outline

    assert outline == expected
    assert outline.phases["first"].workers == 2


def workers_of(record: dict[str, Any]) -> dict[str, Any]:
    return record["outline"]["phases"]["first"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "change",
    [
        lambda r: workers_of(r).update(workers="5"),
        lambda r: workers_of(r).update(workers=True),
        lambda r: workers_of(r).update(fixed="workers"),
        lambda r: workers_of(r).pop("semaphore"),
        lambda r: r["outline"].update(phases=[]),
        lambda r: r.pop("outline"),  # kept before outlines were
    ],
    ids=["text", "boolean", "fixed not a list", "missing lever", "phases not a mapping", "none"],
)
def test_an_outline_that_is_not_one_is_taken_from_the_model(pipeline: Path, change: Tamper) -> None:
    load_pipeline(pipeline)
    tamper(pipeline, change)

    outline = load_pipeline(pipeline).outline

    assert outline.phases["first"].workers == 2
    assert outline.phases["first"].semaphore == 1
    assert outline.phases["first"].fixed == ()


def test_the_same_bytes_give_their_settings_without_the_model(
    pipeline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `levers get` reads comes from the record alone, defaults included."""
    expected = load_pipeline(pipeline).spec.model_dump(mode="json")
    unparsed(monkeypatch)
    unvalidated(monkeypatch)

    settings = load_pipeline(pipeline).settings

    assert settings == expected
    assert settings["phases"]["second"]["levers"]["threads"] == 0  # a default the file does not set


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r["settings"]["phases"].pop("second"),
        lambda r: r["settings"]["phases"]["first"].pop("levers"),
        lambda r: r["settings"].update(phases=[]),
        lambda r: r.update(settings="settings"),
        lambda r: r.pop("settings"),
    ],
    ids=["a phase missing", "levers missing", "phases not a mapping", "not a mapping", "none"],
)
def test_settings_that_are_not_the_pipelines_are_taken_from_the_model(pipeline: Path, change: Tamper) -> None:
    load_pipeline(pipeline)
    tamper(pipeline, change)

    settings = load_pipeline(pipeline).settings

    assert list(settings["phases"]) == ["first", "second"]
    assert settings["phases"]["first"]["levers"]["workers"] == 2
