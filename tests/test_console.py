"""What levers shows a person: phase outputs in a few words, names as written and safely."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from levers.cli.console import _describe, document_timeline
from levers.documents.ledger import DocStatus, DocumentRecord
from tests.conftest import levers, make_project


def test_outputs_are_described_by_size_and_figures() -> None:
    output = {
        "provider": "anthropic",
        "chunks": [{}, {}, {}],
        "text": "x" * 500,
        "usage": {"input_tokens": 2480, "cache_read_input_tokens": 6460, "calls": 20, "output_tokens": 0},
    }
    assert _describe(output) == (
        "provider: anthropic; chunks: 3; text: 500 chars; "
        "usage: input_tokens 2480, cache_read_input_tokens 6460, calls 20"
    )


# A name that would retitle the terminal, turn it red, reverse its tail, and style or link itself.
MARKUP_NAME = "evil\x1b]0;pwned\x07\x1b[31m[red]r[/red][link=http://e.vil]k[/link]:smile:\u202egnp.txt"


def test_show_writes_a_name_as_written_with_its_control_characters_escaped(
    tmp_path: Path, connection: redis.Redis
) -> None:
    root = make_project(tmp_path, docs=0)
    [doc_id] = levers("submit", "-", "--name", MARKUP_NAME, cwd=root, stdin=b"text").stdout.split()

    shown = levers("show", doc_id, cwd=root)

    assert shown.returncode == 0, shown.stderr
    first_line = shown.stdout.splitlines()[0]
    assert first_line.startswith(
        "evil\\x1b]0;pwned\\x07\\x1b[31m[red]r[/red][link=http://e.vil]k[/link]:smile:\\u202egnp.txt  "
    )
    assert "\x1b" not in shown.stdout + shown.stderr and "\u202e" not in shown.stdout


@pytest.mark.e2e
def test_run_shows_names_and_errors_safely_in_its_table_and_error_lines(
    tmp_path: Path, redis_url: str
) -> None:
    root = make_project(tmp_path, docs=0)
    name = "a\x1b[2J[bold]b\nFORGED.txt"
    (root / "docs" / name).write_text("FAIL")

    result = levers("run", "docs", cwd=root)

    assert result.returncode == 1
    assert "\x1b" not in result.stdout + result.stderr
    assert "a\\x1b[2J[bold]b\\nFORGED.txt" in result.stdout  # the summary table's row
    assert result.stderr.splitlines()[-1].startswith("error: docs/a\\x1b[2J[bold]b\\nFORGED.txt (")
    lines = result.stdout.splitlines() + result.stderr.splitlines()
    assert not any(line.startswith("FORGED") for line in lines)


def test_chunks_of_a_recording_are_listed_with_their_time_span(capsys: pytest.CaptureFixture[str]) -> None:
    chunks = [
        {"index": 0, "text": "Queues absorb\nbursts.", "start_s": 0.4, "end_s": 42.46},
        {"index": 1, "text": "Then \x1b[31mred\x1b[0m " + "long " * 30, "start_s": 3599.96, "end_s": 3723.0},
        {"index": 2, "text": "no time", "start_s": None, "end_s": None},
        {"index": 3, "text": "not a time", "start_s": float("nan"), "end_s": 1.0},
    ]
    record = DocumentRecord("a" * 20, "talk.wav", "files", DocStatus.DONE, "chunking", 0.0, 1.0, None)

    document_timeline(record, {"transcription": {"words": [{"word": "x", "start_s": 0.1, "end_s": 0.2}]},
                               "chunking": {"chunks": chunks}})  # fmt: skip

    lines = capsys.readouterr().out.splitlines()
    at = lines.index("chunking: 2 in the recording")
    assert lines[at + 1] == "  [0] 0:00.4-0:42.5  Queues absorb bursts."
    assert lines[at + 2].startswith("  [1] 1:00:00.0-1:02:03.0  Then \\x1b[31mred\\x1b[0m long long")
    assert lines[at + 2].endswith("...") and len(lines[at + 2]) < 120
    assert len(lines) == at + 3  # words carry no text: not listed
