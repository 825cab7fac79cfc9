"""Loading pipeline.yaml: the real file loads, and every problem is reported at FILE:LINE:COL.

Expected positions are computed from the YAML text each test writes, so editing a fixture cannot
leave a stale line number behind.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from levers.errors import EXIT_BAD_INPUT, SpecError, SpecProblem, UsageError
from levers.pipeline.loading import LoadedPipeline, load_pipeline, parse_pipeline

REAL_PIPELINE = Path(__file__).resolve().parents[1] / "pipeline.yaml"
# Errors name the file relative to the working directory, which the fixture makes tmp_path.
SHOWN = "pipeline.yaml"

Write = Callable[[str], Path]


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Write:
    """Writes dedented YAML to tmp_path/pipeline.yaml, with tmp_path as the working directory."""
    monkeypatch.chdir(tmp_path)

    def _write(text: str) -> Path:
        path = tmp_path / SHOWN
        path.write_text(textwrap.dedent(text))
        return path

    return _write


def at(path: Path, line_text: str, target: str | None = None) -> tuple[int, int]:
    """1-based (line, column) of ``target`` on the one line of ``path`` containing ``line_text``."""
    target = line_text if target is None else target
    lines = path.read_text().splitlines()
    matches = [n for n, line in enumerate(lines) if line_text in line]
    assert len(matches) == 1, f"{line_text!r} must occur on exactly one line"
    line = lines[matches[0]]
    assert target in line, f"{target!r} is not on the line {line!r}"
    return matches[0] + 1, line.index(target) + 1


def problems_of(path: Path, check_imports: bool = False) -> list[SpecProblem]:
    with pytest.raises(SpecError) as caught:
        load_pipeline(path, check_imports=check_imports)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)
    return caught.value.problems


def problem(position: tuple[int, int], message: str) -> SpecProblem:
    return SpecProblem(SHOWN, position[0], position[1], message)


# --- the real pipeline ---------------------------------------------------------------------------


def test_the_real_pipeline_loads_with_its_three_entry_phases() -> None:
    loaded = load_pipeline(REAL_PIPELINE)

    spec = loaded.spec
    assert spec.entry_phases() == ["extraction", "ingest_extract", "transcription"]
    assert spec.phases["ingest_extract"].input == "bytes"
    assert spec.phases["extraction"].input == "files"
    assert spec.phases["transcription"].input == "files" and ".mp3" in spec.phases["transcription"].accepts
    assert all(p.next is None or p.next in spec.phases for p in spec.phases.values())
    assert loaded.path == REAL_PIPELINE
    assert loaded.project_dir == REAL_PIPELINE.parent


def test_digest_follows_the_bytes_of_the_file(write: Write) -> None:
    text = """\
        phases:
          a:
            handler: m:f
            accepts: [pdf]
        """
    first = load_pipeline(write(text))
    same = load_pipeline(write(text))
    edited = load_pipeline(write(text.replace("m:f", "m:g")))

    assert first.digest == same.digest
    assert edited.digest != first.digest


def test_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no pipeline file at"):
        load_pipeline(tmp_path / "absent.yaml")


def test_accepts_is_normalised_to_lowercase_dotted_extensions(write: Write) -> None:
    path = write(
        """\
        phases:
          a:
            handler: m:f
            accepts: [PDF, .Docx, md, '*']
        """
    )

    assert load_pipeline(path).spec.phases["a"].accepts == [".pdf", ".docx", ".md", "*"]


# --- problems from the model -------------------------------------------------------------------


def test_an_unknown_key_is_located_at_the_key_with_a_did_you_mean(write: Write) -> None:
    path = write(
        """\
        phases:
          a:
            handler: m:f
            accepts: [pdf]
            levers:
              semaphor: 3
        """
    )

    assert problems_of(path) == [
        problem(
            at(path, "semaphor: 3", "semaphor"),
            "unknown key 'phases.a.levers.semaphor'; did you mean 'semaphore'?",
        )
    ]


def test_an_unknown_top_level_key_suggests_phases(write: Write) -> None:
    path = write(
        """\
        name: demo
        phasse:
          a:
            handler: m:f
        """
    )

    found = problems_of(path)

    assert problem(at(path, "phasse:", "phasse"), "unknown key 'phasse'; did you mean 'phases'?") in found
    assert any(p.message == "phases is required" for p in found)


def test_a_negative_workers_value_is_located_at_the_value(write: Write) -> None:
    path = write(
        """\
        phases:
          a:
            handler: m:f
            accepts: [pdf]
            levers:
              workers: -1
        """
    )

    assert problems_of(path) == [
        problem(
            at(path, "workers: -1", "-1"),
            "phases.a.levers.workers: Input should be greater than or equal to 0",
        )
    ]


def test_a_semaphore_of_zero_is_rejected_at_the_value(write: Write) -> None:
    path = write(
        """\
        phases:
          a:
            handler: m:f
            accepts: [pdf]
            levers:
              semaphore: 0
        """
    )

    assert problems_of(path) == [
        problem(
            at(path, "semaphore: 0", "0"),
            "phases.a.levers.semaphore: Input should be greater than or equal to 1",
        )
    ]


def test_a_missing_handler_is_located_at_its_phase(write: Write) -> None:
    path = write(
        """\
        phases:
          extract:
            accepts: [pdf]
        """
    )

    assert problems_of(path) == [
        problem(at(path, "extract:", "extract"), "phases.extract.handler is required"),
    ]


@pytest.mark.parametrize("handler", ["not a handler", "module.only", ":function", "mod:1st"])
def test_a_handler_not_of_the_form_module_function_is_rejected(write: Write, handler: str) -> None:
    path = write(
        f"""\
        phases:
          a:
            handler: '{handler}'
            accepts: [pdf]
        """
    )

    [found] = problems_of(path)

    assert (found.line, found.column) == at(path, "handler:", f"'{handler}'")
    assert found.message.startswith("phases.a.handler: String should match pattern")


def test_a_phase_name_must_match_the_name_pattern(write: Write) -> None:
    path = write(
        """\
        phases:
          Bad-Name:
            handler: m:f
            accepts: [pdf]
        """
    )

    [found] = problems_of(path)

    assert (found.line, found.column) == at(path, "Bad-Name:", "Bad-Name")
    assert found.message.startswith("phases.Bad-Name: String should match pattern '^[a-z][a-z0-9_]*$'")


def test_every_problem_is_reported_at_once(write: Write) -> None:
    path = write(
        """\
        phases:
          a:
            handler: m:f
            accepts: [pdf]
            next: b
            levers:
              semaphor: 3
          b:
            handler: m:g
            levers:
              workers: -2
        """
    )

    found = problems_of(path)

    assert sorted(found, key=lambda p: p.line) == [
        problem(
            at(path, "semaphor: 3", "semaphor"),
            "unknown key 'phases.a.levers.semaphor'; did you mean 'semaphore'?",
        ),
        problem(
            at(path, "workers: -2", "-2"),
            "phases.b.levers.workers: Input should be greater than or equal to 0",
        ),
    ]


# --- problems across phases --------------------------------------------------------------------


def test_next_naming_a_missing_phase_suggests_the_closest(write: Write) -> None:
    path = write(
        """\
        phases:
          extract:
            handler: m:f
            accepts: [pdf]
            next: chunkng
          chunking:
            handler: m:g
        """
    )

    assert problems_of(path) == [
        problem(at(path, "next: chunkng", "next"), "next names no phase: 'chunkng'; did you mean 'chunking'?")
    ]


def test_a_cycle_is_reported_once_at_the_next_that_closes_it(write: Write) -> None:
    path = write(
        """\
        phases:
          a:
            handler: m:f
            next: b
          b:
            handler: m:g
            next: a
        """
    )

    assert problems_of(path) == [problem(at(path, "next: b", "next"), "phases form a cycle: a -> b -> a")]


def test_a_phase_that_feeds_itself_is_a_cycle(write: Write) -> None:
    path = write(
        """\
        phases:
          a:
            handler: m:f
            accepts: [pdf]
            next: a
        """
    )

    assert problems_of(path) == [problem(at(path, "next: a", "next"), "phases form a cycle: a -> a")]


def test_a_pipeline_without_an_entry_phase_is_rejected(write: Write) -> None:
    # Every phase being some phase's next forces a loop, so the loop is what gets reported.
    path = write(
        """\
        phases:
          a:
            handler: m:f
            accepts: [pdf]
            next: b
          b:
            handler: m:g
            next: c
          c:
            handler: m:h
            next: b
        """
    )

    assert problems_of(path) == [problem(at(path, "next: c", "next"), "phases form a cycle: b -> c -> b")]


def test_an_entry_phase_without_accepts_is_located_at_the_phase(write: Write) -> None:
    path = write(
        """\
        phases:
          extract:
            handler: m:f
            next: chunk
          chunk:
            handler: m:g
        """
    )

    assert problems_of(path) == [
        problem(
            at(path, "extract:", "extract"),
            "entry phase 'extract' accepts no file types; add accepts: ['.pdf', ...]",
        )
    ]


def test_accepts_on_a_phase_that_is_not_an_entry_is_rejected(write: Write) -> None:
    path = write(
        """\
        phases:
          extract:
            handler: m:f
            accepts: [pdf]
            next: chunk
          chunk:
            handler: m:g
            accepts: [txt]
        """
    )

    assert problems_of(path) == [
        problem(
            at(path, "accepts: [txt]", "accepts"),
            "'chunk' is not an entry phase, so accepts has no effect",
        )
    ]


# --- problems in the YAML itself ---------------------------------------------------------------


def test_a_yaml_syntax_error_reports_its_line(write: Write) -> None:
    path = write(
        """\
        phases:
          a:
            handler: m:f: oops
            accepts: [pdf]
        """
    )

    line, _ = at(path, "m:f: oops")
    [found] = problems_of(path)

    assert (found.file, found.line) == (SHOWN, line)
    assert found.message == "YAML syntax: mapping values are not allowed here"


def test_a_duplicate_key_is_a_yaml_error_at_the_duplicate(write: Write) -> None:
    path = write(
        """\
        phases:
          a:
            handler: m:f
            handler: m:g
            accepts: [pdf]
        """
    )

    [found] = problems_of(path)

    assert (found.line, found.column) == at(path, "handler: m:g", "handler")
    assert found.message.startswith('YAML syntax: found duplicate key "handler"')


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_an_empty_file_is_one_problem_at_its_start(write: Write, text: str) -> None:
    path = write(text)

    assert problems_of(path) == [problem((1, 1), "the file is empty; a pipeline needs at least phases:")]


@pytest.mark.parametrize("text", ["- extraction\n- chunking\n", "just a string\n"])
def test_a_top_level_that_is_not_a_mapping_is_rejected(write: Write, text: str) -> None:
    path = write(text)

    assert problems_of(path) == [problem((1, 1), "the top level must be a mapping with phases:")]


def test_a_file_outside_the_working_directory_is_named_by_its_path(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("phases: {}\n")

    with pytest.raises(SpecError) as caught:
        parse_pipeline(path.read_bytes(), path)

    [found] = caught.value.problems
    assert found.file == str(path)
    assert str(found).startswith(f"{path}:1:9: phases: ")


# --- handler imports -----------------------------------------------------------------------------


@pytest.fixture
def clean_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Restores sys.path afterwards and forgets the modules a test names."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    names: list[str] = []
    yield names.append
    for name in names:
        sys.modules.pop(name, None)


def test_handlers_are_not_imported_unless_asked(write: Write) -> None:
    path = write(
        """\
        phases:
          a:
            handler: levers_test_no_such_module:run
            accepts: [pdf]
        """
    )

    assert isinstance(load_pipeline(path), LoadedPipeline)


def test_a_handler_whose_module_is_missing_is_located_at_the_handler(
    write: Write, clean_imports: Callable[[str], None]
) -> None:
    clean_imports("levers_test_no_such_module")
    path = write(
        """\
        phases:
          a:
            handler: levers_test_no_such_module:run
            accepts: [pdf]
        """
    )

    assert problems_of(path, check_imports=True) == [
        problem(
            at(path, "handler:", "handler"),
            "handler 'levers_test_no_such_module:run' cannot be imported: "
            "ModuleNotFoundError: No module named 'levers_test_no_such_module'",
        )
    ]


def test_a_handler_module_beside_the_pipeline_file_imports(
    write: Write, tmp_path: Path, clean_imports: Callable[[str], None]
) -> None:
    clean_imports("levers_test_user_phases")
    (tmp_path / "levers_test_user_phases.py").write_text("def extract(ctx, doc):\n    return doc\n")
    path = write(
        """\
        phases:
          a:
            handler: levers_test_user_phases:extract
            accepts: [pdf]
        """
    )

    loaded = load_pipeline(path, check_imports=True)

    assert loaded.spec.phases["a"].handler == "levers_test_user_phases:extract"
    assert str(tmp_path) in sys.path


def test_a_handler_naming_a_missing_function_is_a_problem(
    write: Write, tmp_path: Path, clean_imports: Callable[[str], None]
) -> None:
    clean_imports("levers_test_user_phases")
    (tmp_path / "levers_test_user_phases.py").write_text("def extract(ctx, doc):\n    return doc\n")
    path = write(
        """\
        phases:
          a:
            handler: levers_test_user_phases:extrakt
            accepts: [pdf]
        """
    )

    [found] = problems_of(path, check_imports=True)

    assert (found.line, found.column) == at(path, "handler:", "handler")
    assert found.message.startswith(
        "handler 'levers_test_user_phases:extrakt' cannot be imported: AttributeError:"
    )


def test_a_key_left_empty_is_located_at_that_key(write: Write) -> None:
    path = write(
        """\
        phases:
          a:
            handler: m:f
            levers:
            accepts: [pdf]
        """
    )

    [found] = problems_of(path)

    assert found.message.startswith("phases.a.levers: Input should be a valid dictionary")
    assert (found.line, found.column) == at(path, "levers:", "levers")


def test_a_preloaded_module_that_does_not_import_is_located(write: Write) -> None:
    path = write(
        """\
        preload: [json, levers_test_no_such_heavy_module]
        phases:
          a:
            handler: json:loads
            accepts: [.txt]
        """
    )

    [found] = problems_of(path, check_imports=True)

    assert found.line == 1
    assert found.message.startswith("preload 'levers_test_no_such_heavy_module' cannot be imported")
