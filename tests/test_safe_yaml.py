"""Loading a pipeline file within its budgets: size, aliases, nesting, digits.

A refused file is one FILE:LINE:COL line pointing at the alias, the node or the start of the file;
a file that stays within the budgets, anchors and merge keys included, loads as before.
"""

from __future__ import annotations

import os
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from levers.errors import EXIT_BAD_INPUT, SpecError, SpecProblem
from levers.pipeline.loading import load_pipeline, parse_pipeline
from levers.pipeline.safe_yaml import MAX_ALIASES, MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES

SHOWN = "pipeline.yaml"
HEAD = "phases:\n  a:\n    handler: json:loads\n    accepts: [pdf]\n"


def billion_laughs(levels: int = 9, under: str = "options") -> str:
    """The classic 1 KB bomb: each level lists the one before nine times, 9**levels strings in all."""
    lines = [f"    {under}:", '      x0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels + 1):
        alias = f"*a{level - 1}"
        lines.append(f"      x{level}: &a{level} [{','.join([alias] * 9)}]")
    return HEAD + "\n".join(lines) + "\n"


def only_problem(text: str | bytes) -> SpecProblem:
    raw = text.encode() if isinstance(text, str) else text
    with pytest.raises(SpecError) as caught:
        parse_pipeline(raw, Path(SHOWN))
    assert caught.value.exit_code == EXIT_BAD_INPUT
    [problem] = caught.value.problems
    return problem


def text_at(text: str, problem: SpecProblem) -> str:
    """What the file holds from the problem's position on, to the end of its line."""
    return text.splitlines()[problem.line - 1][problem.column - 1 :]


def position(text: str, target: str) -> tuple[int, int]:
    """1-based (line, column) of the first occurrence of ``target`` in ``text``."""
    offset = text.index(target)
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


# --- aliases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("under", ["options", "expect"])
def test_a_billion_laughs_is_refused_at_the_alias_with_little_memory(under: str) -> None:
    text = billion_laughs(under=under)
    assert len(text) < 1200

    tracemalloc.start()
    try:
        problem = only_problem(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # expanded in full this is 387 million strings: gigabytes. Refused, it is the parse alone.
    assert peak < 20_000_000
    assert problem.message == f"alias *a3 takes the file past {MAX_NODES:,} keys and values; write them out"
    assert text_at(text, problem).startswith("*a3")


def test_aliases_that_repeat_a_long_string_are_refused() -> None:
    text = (
        HEAD
        + "    options:\n      s: &s "
        + "x" * 60_000
        + "\n      copies: ["
        + ", ".join(["*s"] * 20)
        + "]\n"
    )

    problem = only_problem(text)

    assert problem.message.startswith("aliases repeat more than 1,000,000 characters")
    line, _ = position(text, "copies")
    assert problem.line == line


def test_more_aliases_than_the_budget_are_refused_at_the_first_one_past_it() -> None:
    aliases = ", ".join(["*n"] * (MAX_ALIASES + 1))
    text = HEAD + f"    options:\n      n: &n 1\n      many: [{aliases}]\n"

    problem = only_problem(text)

    assert problem.message == f"more than {MAX_ALIASES:,} aliases in one file; write the values out"
    line, column = position(text, "*n")
    assert (problem.line, problem.column) == (line, column + MAX_ALIASES * len("*n, "))


def test_a_recursive_alias_is_refused() -> None:
    text = "phases:\n  a: &a {handler: json:loads, accepts: [pdf], options: {me: *a}}\n"

    problem = only_problem(text)

    assert "alias *a is inside the node it names" in problem.message
    assert (problem.line, problem.column) == position(text, "*a")


def test_anchors_and_merge_keys_within_the_budget_load() -> None:
    first = (
        "phases:\n  p0:\n    handler: json:loads\n    accepts: [pdf]\n    next: p1\n"
        "    options: {base: &base {handler: json:loads, timeout: 60},\n"
        "              small: &small {workers: 1, semaphore: 2}}\n"
    )
    rest = "".join(
        f"  p{i}:\n    <<: *base\n    levers: *small\n" + (f"    next: p{i + 1}\n" if i < 199 else "")
        for i in range(1, 200)
    )

    spec = parse_pipeline((first + rest).encode(), Path(SHOWN)).spec

    assert len(spec.phases) == 200
    assert spec.phases["p7"].timeout == 60
    assert spec.phases["p199"].levers.semaphore == 2


# --- size, nodes, nesting, digits -----------------------------------------------------------------


def test_a_file_over_the_size_limit_is_refused_before_parsing() -> None:
    # not even YAML: were it parsed, the error would be a syntax error
    raw = b"phases: [" * (MAX_FILE_BYTES // 9 + 1)

    problem = only_problem(raw)

    assert str(problem) == (
        f"{SHOWN}:1:1: the file is larger than {MAX_FILE_BYTES:,} bytes, the most a pipeline file may be"
    )


def test_a_huge_file_on_disk_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / SHOWN
    with path.open("wb") as handle:  # sparse: 4 GB that take no room on disk
        handle.truncate(4 * 1024**3)

    tracemalloc.start()
    try:
        with pytest.raises(SpecError, match="larger than"):
            load_pipeline(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        os.unlink(path)

    assert peak < 4 * MAX_FILE_BYTES


def test_more_nodes_than_the_budget_are_refused_where_the_budget_ran_out() -> None:
    text = HEAD + "    options:\n      many: [" + ",".join(["0"] * MAX_NODES) + "]\n"

    problem = only_problem(text)

    assert (
        problem.message == f"more than {MAX_NODES:,} keys and values in one file; a pipeline needs far fewer"
    )
    assert problem.line == position(text, "many")[0]


def test_nesting_past_the_depth_limit_is_refused_at_the_first_level_too_deep() -> None:
    # the root, phases, a and options hold 4 levels; the lists inside fill the rest
    allowed = MAX_DEPTH - 4
    fits = HEAD + "    options: {x: " + "[" * allowed + "]" * allowed + "}\n"
    too_deep = HEAD + "    options: {x: " + "[" * (allowed + 1) + "]" * (allowed + 1) + "}\n"

    assert "x" in parse_pipeline(fits.encode(), Path(SHOWN)).spec.phases["a"].options
    problem = only_problem(too_deep)

    assert (
        problem.message == f"mappings and lists nested more than {MAX_DEPTH} deep; a pipeline needs far fewer"
    )
    line, column = position(too_deep, "{x: [")
    assert (problem.line, problem.column) == (line, column + len("{x: ") + allowed)


def test_a_number_with_thousands_of_digits_is_refused_where_it_is() -> None:
    text = HEAD + "    timeout: " + "9" * 5000 + "\n"

    problem = only_problem(text)

    assert problem.message == "a number of 5,000 characters; write a bounded number"
    assert (problem.line, problem.column) == position(text, "9999")


def test_a_loaded_file_is_the_same_as_before() -> None:
    text = textwrap.dedent(
        """\
        phases:
          a:
            handler: json:loads
            accepts: [pdf]
            options: {n: 0x1f, big: 50_000_000, ratio: 1.5e3, flag: &t true, again: *t}
        """
    )

    options = parse_pipeline(text.encode(), Path(SHOWN)).spec.phases["a"].options

    assert options == {"n": 31, "big": 50_000_000, "ratio": 1500.0, "flag": True, "again": True}
