"""`levers set` and `levers get`: round-trip edits that keep the file's layout, validated, atomic."""

from __future__ import annotations

import difflib
import json
import multiprocessing
from pathlib import Path

import pytest

from levers.errors import SpecError, UsageError
from levers.pipeline.dotted import SettingNames, resolve_path, value_at
from levers.pipeline.editing import edit_text, set_values, setting_names
from levers.pipeline.loading import load_pipeline
from tests.conftest import levers, make_project

ROOT = Path(__file__).resolve().parent.parent

STYLED = """\
# A pipeline written by hand: comments, quoting and blank lines must survive an edit.
name: 'styled'

phases:
  first:   # the entry phase
    handler: "json:loads"
    accepts:
      - .txt    # plain text only
      - '.md'
    next: second
    levers:
      workers: 3      # lever 1
      semaphore: 10   # lever 2

  second:
    handler: json:dumps
"""


def changed_lines(before: str, after: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


@pytest.fixture
def styled(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(STYLED)
    return path


def test_set_changes_exactly_the_values_and_keeps_comments_and_quotes(styled: Path) -> None:
    _, changes = set_values(styled, ["first.semaphore=15", "first.workers=5"])

    assert [(c.dotted, c.old, c.new) for c in changes] == [
        ("phases.first.levers.semaphore", 10, 15),
        ("phases.first.levers.workers", 3, 5),
    ]
    assert changed_lines(STYLED, styled.read_text()) == [
        "-      workers: 3      # lever 1",
        "-      semaphore: 10   # lever 2",
        "+      workers: 5      # lever 1",
        "+      semaphore: 15   # lever 2",
    ]


def test_set_on_the_project_pipeline_touches_one_line(tmp_path: Path) -> None:
    original = (ROOT / "pipeline.yaml").read_text()
    path = tmp_path / "pipeline.yaml"
    path.write_text(original)

    set_values(path, ["chunking.semaphore=15"])

    diff = changed_lines(original, path.read_text())
    assert len(diff) == 2
    assert diff[0].startswith("-      semaphore: 10") and diff[1].startswith("+      semaphore: 15")
    assert diff[0].split("#")[1] == diff[1].split("#")[1]  # the comment is kept


def test_full_paths_and_missing_blocks(styled: Path) -> None:
    set_values(styled, ["phases.second.timeout=120", "second.threads=2"])

    spec = load_pipeline(styled).spec
    assert spec.phases["second"].timeout == 120
    assert spec.phases["second"].levers.threads == 2


def test_an_invalid_value_leaves_the_file_byte_identical(styled: Path) -> None:
    before = styled.read_bytes()

    with pytest.raises(SpecError) as raised:
        set_values(styled, ["first.workers=5", "first.semaphore=0"])

    assert "semaphore" in str(raised.value)
    assert styled.read_bytes() == before


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("frist.workers=2", "did you mean 'first'?"),
        ("first.semaphor=2", "did you mean 'semaphore'?"),
        ("first.workers", "is not KEY=VALUE"),
        ("=3", "is not KEY=VALUE"),
    ],
)
def test_bad_assignments_name_the_fix(styled: Path, assignment: str, message: str) -> None:
    before = styled.read_bytes()
    with pytest.raises(UsageError) as raised:
        set_values(styled, [assignment])
    assert message in str(raised.value)
    assert styled.read_bytes() == before


def test_get_reads_effective_values(styled: Path) -> None:
    settings = load_pipeline(styled).settings
    assert value_at(settings, "first.semaphore", "pipeline.yaml") == 10
    assert value_at(settings, "second.threads", "pipeline.yaml") == 0  # a default
    assert value_at(settings, "phases.first.accepts", "pipeline.yaml") == [".txt", ".md"]


def test_get_and_set_read_a_name_alike(styled: Path) -> None:
    """`levers get` takes the names from the settings, `levers set` from the model: the same."""
    loaded = load_pipeline(styled)
    assert SettingNames.of(loaded.settings) == setting_names(list(loaded.spec.phases))


def test_get_prints_a_long_value_whole_for_a_script(tmp_path: Path) -> None:
    root = make_project(tmp_path, docs=0)
    long = "-".join(["word"] * 60)  # wider than any terminal or pipe width
    assert levers("set", f"first.options.note={long}", cwd=root).returncode == 0

    got = levers("get", "first.options.note", cwd=root)

    assert (got.returncode, got.stdout) == (0, long + "\n")


def test_a_list_written_on_one_line_stays_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    before = "phases:\n  first:\n    handler: json:loads\n    accepts: [.txt, .md]   # text\n"
    path.write_text(before)

    set_values(path, ["first.accepts=[.txt, .md, .html]"])

    assert changed_lines(before, path.read_text()) == [
        "-    accepts: [.txt, .md]   # text",
        "+    accepts: [.txt, .md, .html] # text",  # the comment at its column, if the line leaves room
    ]


def test_get_shows_a_phase_json_values_and_names_an_unknown_phase(tmp_path: Path) -> None:
    root = make_project(tmp_path, docs=0)

    phase = levers("get", "first", cwd=root)
    unset = levers("get", "redis", cwd=root)
    unknown = levers("get", "phases.frist.levers.workers", cwd=root)
    edited = levers("set", "first.accepts=[.txt, .md]", cwd=root)

    assert json.loads(phase.stdout)["levers"]["workers"] == 2
    assert unset.stdout == "null\n"  # as the file would say it, not Python's None
    assert unknown.returncode == 2
    assert "no phase named 'frist'; did you mean 'first'?" in unknown.stderr
    assert 'phases.first.accepts: [".txt"] -> [".txt", ".md"]' in edited.stdout


def test_shorthand_resolution() -> None:
    phases = setting_names(["chunking"])
    assert resolve_path("chunking.semaphore", phases) == ("phases", "chunking", "levers", "semaphore")
    assert resolve_path("chunking.timeout", phases) == ("phases", "chunking", "timeout")
    assert resolve_path("phases.chunking.options.x", phases) == ("phases", "chunking", "options", "x")


def _bump(path: str, key: str, times: int) -> None:
    for value in range(1, times + 1):
        set_values(Path(path), [f"{key}={value}"])


def test_concurrent_sets_lose_no_update(styled: Path) -> None:
    context = multiprocessing.get_context("fork")
    writers = [
        context.Process(target=_bump, args=(str(styled), key, 15))
        for key in ("first.workers", "second.workers", "first.threads")
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)

    spec = load_pipeline(styled).spec
    assert [w.exitcode for w in writers] == [0, 0, 0]
    assert spec.phases["first"].levers.workers == 15
    assert spec.phases["second"].levers.workers == 15
    assert spec.phases["first"].levers.threads == 15
    assert "# lever 1" in styled.read_text()


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("first.workers=2147483648", "phases.first.levers.workers: 2147483648 is above the bound of 256"),
        ("phases.first.timeout=18446744073709551616", "is above the bound of 604800"),
        ("phases.first.retries=1000000000000000000000000000000", "is above the bound of 100"),
        ("limits.api.requests_per_minute=true", "requests_per_minute: expected a whole number, not true"),
    ],
)
def test_set_refuses_an_out_of_bound_value_with_exit_2_leaving_the_file_byte_identical(
    styled: Path, assignment: str, message: str
) -> None:
    before = styled.read_bytes()

    result = levers("set", assignment, cwd=styled.parent)

    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert all(line.startswith("error: pipeline.yaml:") for line in result.stderr.splitlines())
    assert styled.read_bytes() == before


def test_the_round_trip_load_of_an_edit_refuses_an_alias_bomb(styled: Path) -> None:
    bomb = STYLED + "    options:\n      x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for level in range(1, 10):
        bomb += f"      x{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]\n"

    with pytest.raises(SpecError, match=r"alias \*a3 takes the file past"):
        edit_text(styled, bomb, ["first", "second"], ["first.workers=2"])
