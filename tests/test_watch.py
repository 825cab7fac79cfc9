"""PipelineWatcher: follows edits of pipeline.yaml, holding on to the last good pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from levers.pipeline.watching import PipelineWatcher

GOOD = """\
phases:
  extract:
    handler: m:extract
    accepts: [pdf]
    levers:
      workers: 3
"""


def rewrite(path: Path, text: str) -> None:
    """Replace the file's text, making sure its stat stamp changes even on a coarse-clock filesystem."""
    before = path.stat().st_mtime_ns if path.exists() else None
    path.write_text(text)
    if before is not None and path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def position_of(text: str, line_text: str, target: str) -> tuple[int, int]:
    """1-based (line, column) of ``target`` on the one line of ``text`` containing ``line_text``."""
    [(number, line)] = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line_text in line]
    return number, line.index(target) + 1


@pytest.fixture
def path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # errors then name the file as pipeline.yaml
    file = tmp_path / "pipeline.yaml"
    file.write_text(GOOD)
    return file


def test_an_unchanged_file_gives_the_same_pipeline(path: Path) -> None:
    watcher = PipelineWatcher.open(path)
    first = watcher.current()

    assert watcher.current() is first
    assert watcher.error is None


def test_a_valid_edit_is_picked_up(path: Path) -> None:
    watcher = PipelineWatcher.open(path)
    before = watcher.current()

    rewrite(path, GOOD.replace("workers: 3", "workers: 12"))
    after = watcher.current()

    assert after.spec.phases["extract"].levers.workers == 12
    assert after.digest != before.digest
    assert watcher.error is None


def test_a_max_age_skips_the_look_only_within_that_age(path: Path) -> None:
    watcher = PipelineWatcher.open(path)
    before = watcher.current()

    rewrite(path, GOOD.replace("workers: 3", "workers: 12"))

    assert watcher.current(max_age_s=60) is before  # looked just now: the edit waits
    assert watcher.current().spec.phases["extract"].levers.workers == 12
    rewrite(path, GOOD.replace("workers: 3", "workers: 7"))
    assert watcher.current(max_age_s=1e-9).spec.phases["extract"].levers.workers == 7


def test_an_invalid_edit_keeps_the_last_good_pipeline_and_reports_where(path: Path) -> None:
    watcher = PipelineWatcher.open(path)
    good = watcher.current()
    broken = GOOD.replace("workers: 3", "workers: -1")

    rewrite(path, broken)

    assert watcher.current() is good
    line, column = position_of(broken, "workers: -1", "-1")
    message = "phases.extract.levers.workers: -1 is below the bound of 0; set at least 0"
    assert watcher.error == f"pipeline.yaml:{line}:{column}: {message}"


def test_a_yaml_syntax_error_keeps_the_last_good_pipeline(path: Path) -> None:
    watcher = PipelineWatcher.open(path)
    good = watcher.current()

    rewrite(path, GOOD + "  oops: [unclosed\n")

    assert watcher.current() is good
    assert watcher.error is not None
    assert watcher.error.startswith("pipeline.yaml:")
    assert "YAML syntax" in watcher.error


def test_fixing_the_file_clears_the_error_and_applies_the_fix(path: Path) -> None:
    watcher = PipelineWatcher.open(path)
    rewrite(path, GOOD.replace("workers: 3", "workers: -1"))
    watcher.current()

    rewrite(path, GOOD.replace("workers: 3", "workers: 5"))
    fixed = watcher.current()

    assert watcher.error is None
    assert fixed.spec.phases["extract"].levers.workers == 5


def test_reverting_to_the_last_good_text_clears_the_error(path: Path) -> None:
    watcher = PipelineWatcher.open(path)
    good = watcher.current()
    rewrite(path, GOOD.replace("handler: m:extract", "handler: nope"))
    watcher.current()
    assert watcher.error is not None

    rewrite(path, GOOD)

    assert watcher.current() is good
    assert watcher.error is None


def test_a_deleted_file_keeps_the_last_good_pipeline_until_it_returns(path: Path) -> None:
    watcher = PipelineWatcher.open(path)
    good = watcher.current()

    path.unlink()
    assert watcher.current() is good
    assert watcher.error is not None
    assert str(path) in watcher.error

    rewrite(path, GOOD.replace("workers: 3", "workers: 4"))
    assert watcher.current().spec.phases["extract"].levers.workers == 4
    assert watcher.error is None


def test_a_same_size_edit_within_one_timestamp_tick_is_seen(path: Path) -> None:
    watcher = PipelineWatcher.open(path)
    stamp = path.stat().st_mtime_ns
    edited = GOOD.replace("workers: 3", "workers: 4")
    assert len(edited) == len(GOOD)

    path.write_text(edited)
    os.utime(path, ns=(stamp, stamp))  # what a filesystem with coarse timestamps leaves behind

    assert watcher.current().spec.phases["extract"].levers.workers == 4


def test_an_out_of_bound_edit_keeps_the_last_good_pipeline(path: Path) -> None:
    watcher = PipelineWatcher.open(path)
    good = watcher.current()
    broken = GOOD.replace("workers: 3", "workers: 2147483648")

    rewrite(path, broken)

    assert watcher.current() is good
    line, column = position_of(broken, "workers:", "2147483648")
    message = "phases.extract.levers.workers: 2147483648 is above the bound of 256; set at most 256"
    assert watcher.error == f"pipeline.yaml:{line}:{column}: {message}"


def test_an_alias_bomb_edit_is_refused_at_the_alias(path: Path) -> None:
    watcher = PipelineWatcher.open(path)
    good = watcher.current()
    bomb = GOOD + "    options:\n      x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for level in range(1, 10):
        bomb += f"      x{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]\n"

    rewrite(path, bomb)

    assert watcher.current() is good
    assert watcher.error is not None
    assert watcher.error.startswith("pipeline.yaml:")
    assert "alias *a3 takes the file past 20,000 keys and values" in watcher.error


def test_a_file_grown_past_the_size_limit_is_refused(path: Path) -> None:
    watcher = PipelineWatcher.open(path)
    good = watcher.current()

    rewrite(path, GOOD + "# padding\n" * 200_000)

    assert watcher.current() is good
    assert (
        watcher.error
        == "pipeline.yaml:1:1: the file is larger than 1,000,000 bytes, the most a pipeline file may be"
    )
