"""Text from outside is shown safely: no control character reaches a terminal, no name forges a log line."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from levers.safe import OneLineFormatter, escape_logs, shown, unshown
from tests.conftest import StartLevers, doc_field, levers, make_project, stop, wait_until

FORGED = "2026-01-01 00:00:00,000 ERROR [supervisor pid=1] FORGED"
HOSTILE_NAME = f"x\n{FORGED}\x1b]0;pwned\x07\x1b[31mred\u202egnp.txt"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("résumé 文件 📄.pdf", "résumé 文件 📄.pdf"),  # printable non-ASCII is left alone
        ("a\nb\r\tc", "a\\nb\\r\\tc"),
        ("\x1b[31mred\x07\x00", "\\x1b[31mred\\x07\\x00"),  # C0 and escape sequences
        ("\x7f\x85\x9b", "\\x7f\\x85\\x9b"),  # DEL and C1 (NEL, CSI)
        ("invoice\u202efdp.exe", "invoice\\u202efdp.exe"),  # a right-to-left override
        ("\u2066a\u2069\u200b\ufeff", "\\u2066a\\u2069\\u200b\\ufeff"),  # isolates, zero-width, BOM
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),  # line and paragraph separators
        ("bad-\udcff.txt", "bad-\\udcff.txt"),  # a file name that is not UTF-8
        ("tag\U000e0041", "tag\\U000e0041"),  # an invisible tag character
    ],
)
def test_shown_escapes_what_could_act_on_a_terminal(text: str, expected: str) -> None:
    assert shown(text) == expected
    assert shown(shown(text)) == expected


@pytest.mark.parametrize("text", [HOSTILE_NAME, "a\nb\r\tc", "bad-\udcff.txt", "tag\U000e0041", "plain"])
def test_unshown_turns_what_shown_writes_back_into_the_text(text: str) -> None:
    assert unshown(shown(text)) == text


def test_unshown_leaves_what_is_no_escape() -> None:
    assert unshown("C:\\docs\\q1.pdf \\U7fffffff") == "C:\\docs\\q1.pdf \\U7fffffff"


def test_shown_can_keep_line_breaks() -> None:
    assert shown("line one\nline \x1b two", keep_newlines=True) == "line one\nline \\x1b two"


def record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    args = ("id", message)
    return logging.LogRecord("levers.test", logging.ERROR, __file__, 1, "job %s: %s", args, exc_info)


def test_a_log_message_is_one_line_whatever_it_carries() -> None:
    formatter = OneLineFormatter("%(levelname)s %(message)s")

    assert formatter.format(record(HOSTILE_NAME)).splitlines() == [
        "ERROR job id: x\\n" + FORGED + "\\x1b]0;pwned\\x07\\x1b[31mred\\u202egnp.txt"
    ]


def test_a_traceback_keeps_its_lines_indented_under_its_record() -> None:
    try:
        raise ValueError(f"bad name\n{FORGED}")
    except ValueError as exc:
        lines = OneLineFormatter("%(levelname)s %(message)s").format(record("failed", exc)).splitlines()

    assert lines[0] == "ERROR job id: failed"
    assert lines[1] == "  Traceback (most recent call last):"
    assert lines[-1] == "  " + FORGED
    assert all(line.startswith("  ") for line in lines[1:])


def test_escape_logs_keeps_the_handlers_format() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("{levelname} {message}", style="{"))
    logger = logging.getLogger("levers.test.escape")
    logger.addHandler(handler)
    try:
        escape_logs(logger)
    finally:
        logger.removeHandler(handler)

    assert isinstance(handler.formatter, OneLineFormatter)
    assert handler.formatter.format(record("a\nb")) == "ERROR job id: a\\nb"


@pytest.mark.parametrize("flags", [(), ("-v",)])
def test_a_document_name_forges_no_log_line(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers, flags: tuple[str, ...]
) -> None:
    root = make_project(tmp_path, workers=1, docs=0)
    supervisor = start_levers("up", *flags, cwd=root)
    try:
        submitted = levers("submit", "-", "--name", HOSTILE_NAME, cwd=root, stdin=b"says FAIL")
        [doc_id] = submitted.stdout.split()
        wait_until(lambda: doc_field(connection, doc_id, "status") == "failed")
    finally:
        output = stop(supervisor)
    assert FORGED in output  # the name was logged (the failure's line, and RQ's for each job with -v)...
    assert not any(line.startswith(FORGED) for line in output.splitlines())  # ...inside its own line
    assert "\x1b" not in output and "\u202e" not in output
    if flags:  # the failure's traceback, under its record
        assert "\n  Traceback (most recent call last):\n" in output


# An object collected after what its __del__ needs is gone, whose repr fails too: as a library's
# connection collected after its event loop closed.
UNRAISABLE = """
import logging, sys
from levers.safe import log_to

class Stream:
    def __repr__(self):
        raise AttributeError("'NoneType' object has no attribute '_selector'")
    def __del__(self):
        raise ResourceWarning(f"unclosed {self!r}")

log_to(logging.StreamHandler(sys.stderr), "%(levelname)s %(message)s", None, verbose=sys.argv[1] == "-v")
Stream()
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_an_exception_python_cannot_raise_is_one_log_line(verbose: bool) -> None:
    ran = subprocess.run(
        [sys.executable, "-c", UNRAISABLE, "-v" if verbose else "-"],
        capture_output=True,
        text=True,
        check=True,
    )
    first, *rest = ran.stderr.splitlines()
    assert re.fullmatch(
        r"WARNING Exception ignored in <function Stream.__del__ at 0x\w+>: "
        r"AttributeError: 'NoneType' object has no attribute '_selector'",
        first,
    ), ran.stderr
    # its traceback, indented under it, with -v only
    assert rest[0] == "  Traceback (most recent call last):" if verbose else rest == []
