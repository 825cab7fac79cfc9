"""Loading pipeline.yaml: the real file loads, and every problem is reported at FILE:LINE:COL.

Expected positions are computed from the YAML text each test writes, so editing a fixture cannot
leave a stale line number behind.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


# --- one problem, located ---------------------------------------------------------------------


@dataclass(frozen=True)
class OneProblem:
    """A pipeline.yaml with one problem: where it is reported and what it says."""

    yaml: str
    line: str | None  # the one line holding the problem (None: the file's start, 1:1) ...
    target: str | None  # ... and the text on it the column points at (None: the whole line)
    message: str
    prefix: bool = False  # the message starts with ``message`` (pydantic's own wording follows)


def one(yaml: str, line: str | None, target: str | None, message: str, prefix: bool = False) -> OneProblem:
    return OneProblem(textwrap.dedent(yaml), line, target, message, prefix)


A_PHASE = "phases:\n  a:\n    handler: m:f\n    accepts: [pdf]\n"

ONE_PROBLEM = {
    "unknown key, did you mean": one(
        A_PHASE + "    levers:\n      semaphor: 3\n", "semaphor: 3", "semaphor",
        "unknown key 'phases.a.levers.semaphor'; did you mean 'semaphore'?",
    ),
    "negative workers, at the value": one(
        A_PHASE + "    levers:\n      workers: -1\n", "workers: -1", "-1",
        "phases.a.levers.workers: -1 is below the bound of 0; set at least 0",
    ),
    "semaphore of zero, at the value": one(
        A_PHASE + "    levers:\n      semaphore: 0\n", "semaphore: 0", "0",
        "phases.a.levers.semaphore: 0 is below the bound of 1; set at least 1",
    ),
    "missing handler, at its phase": one(
        "phases:\n  extract:\n    accepts: [pdf]\n", "extract:", "extract",
        "phases.extract.handler is required",
    ),
    **{
        f"handler {handler!r} not module:function": one(
            A_PHASE.replace("m:f", f"'{handler}'"), "handler:", f"'{handler}'",
            "phases.a.handler: String should match pattern", prefix=True,
        )
        for handler in ("not a handler", "module.only", ":function", "mod:1st")
    },
    "phase name off the pattern": one(
        A_PHASE.replace("  a:", "  Bad-Name:"), "Bad-Name:", "Bad-Name",
        "phases.Bad-Name: String should match pattern '^[a-z][a-z0-9_]*$'", prefix=True,
    ),
    "key left empty": one(
        A_PHASE.replace("    accepts:", "    levers:\n    accepts:"), "levers:", "levers",
        "phases.a.levers: expected a mapping, not null",
    ),
    "next naming no phase, did you mean": one(
        """\
        phases:
          extract:
            handler: m:f
            accepts: [pdf]
            next: chunkng
          chunking:
            handler: m:g
        """,
        "next: chunkng", "next", "next names no phase: 'chunkng'; did you mean 'chunking'?",
    ),
    "cycle, once, at the next that closes it": one(
        "phases:\n  a:\n    handler: m:f\n    next: b\n  b:\n    handler: m:g\n    next: a\n",
        "next: b", "next", "phases form a cycle: a -> b -> a",
    ),
    "phase feeding itself": one(
        A_PHASE + "    next: a\n", "next: a", "next", "phases form a cycle: a -> a",
    ),
    # every phase being some phase's next forces a loop, so the loop is what gets reported
    "no entry phase": one(
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
        """,
        "next: c", "next", "phases form a cycle: b -> c -> b",
    ),
    "entry phase without accepts, at the phase": one(
        "phases:\n  extract:\n    handler: m:f\n    next: chunk\n  chunk:\n    handler: m:g\n",
        "extract:", "extract", "entry phase 'extract' accepts no file types; add accepts: ['.pdf', ...]",
    ),
    "accepts on a phase that is not an entry": one(
        A_PHASE.replace("  a:", "  extract:") + "    next: chunk\n  chunk:\n    handler: m:g\n"
        "    accepts: [txt]\n",
        "accepts: [txt]", "accepts", "'chunk' is not an entry phase, so accepts has no effect",
    ),
    "YAML syntax error": one(
        A_PHASE.replace("m:f", "m:f: oops"), "m:f: oops", ": oops",
        "YAML syntax: mapping values are not allowed here",
    ),
    "unclosed list, noticed a line later, names where it started": one(
        A_PHASE.replace("[pdf]", "[pdf") + "    next: b\n", "next: b", ": b",
        "YAML syntax: expected ',' or ']', but got ':' (while parsing a flow sequence started at line 4)",
    ),
    "duplicate key, at the duplicate": one(
        A_PHASE.replace("    accepts:", "    handler: m:g\n    accepts:"), "handler: m:g", "handler",
        'YAML syntax: found duplicate key "handler"', prefix=True,
    ),
    **{
        f"empty file {text!r}": one(text, None, None, "the file is empty; a pipeline needs at least phases:")
        for text in ("", "\n", "# only a comment\n")
    },
    **{
        f"top level {text!r} not a mapping": one(
            text, None, None, "the top level must be a mapping with phases:"
        )
        for text in ("- extraction\n- chunking\n", "just a string\n")
    },
}  # fmt: skip


@pytest.mark.parametrize("case", ONE_PROBLEM.values(), ids=ONE_PROBLEM.keys())
def test_a_problem_is_reported_alone_at_its_place(write: Write, case: OneProblem) -> None:
    path = write(case.yaml)

    [found] = problems_of(path)

    position = (1, 1) if case.line is None else at(path, case.line, case.target)
    assert (found.file, found.line, found.column) == (SHOWN, *position)
    if case.prefix:
        assert found.message.startswith(case.message), found.message
    else:
        assert found.message == case.message


# --- problems from the model -------------------------------------------------------------------


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
            "phases.b.levers.workers: -2 is below the bound of 0; set at least 0",
        ),
    ]


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
