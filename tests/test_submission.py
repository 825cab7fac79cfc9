"""What a submitted path brings in: regular files with content, never what a symlink leads out to."""

from __future__ import annotations

import os
import pty
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue

import levers
from levers.errors import DocumentError
from tests.conftest import LEVERS, StartLevers, make_project
from tests.conftest import levers as run_levers

SECRET = b"root:$6$hash-of-a-password:19000:0:99999:7:::\n"


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Path]:
    """A project whose docs/ holds one good document among links out, loops and non-files."""
    (tmp_path / "project").mkdir()
    root = make_project(tmp_path / "project", docs=1)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow.txt").write_bytes(SECRET)
    docs = root / "docs"
    (docs / "shadow.txt").symlink_to(outside / "shadow.txt")
    (docs / "elsewhere").symlink_to(outside)
    (docs / "loop").symlink_to("..")
    (docs / "sub").mkdir()
    (docs / "sub" / "up").symlink_to("..")
    (docs / "again.txt").symlink_to("doc0.txt")  # within: the same document, once
    (docs / "dangling.txt").symlink_to(tmp_path / "nothing-here")
    os.mkfifo(docs / "fifo.txt")
    (docs / "empty.txt").touch()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(docs / "sock.txt"))
        yield root


def test_a_directory_brings_in_its_own_regular_files_only(
    tmp_path: Path, connection: redis.Redis, hostile: Path
) -> None:
    result = run_levers("submit", "docs", cwd=hostile, timeout_s=60)

    assert result.returncode == 2
    assert len(result.stdout.split()) == 1  # docs/doc0.txt
    outside = tmp_path / "outside"
    assert sorted(result.stderr.splitlines()) == [
        f"docs/elsewhere: skipped, a symlink out of docs (to {outside})",
        "docs/loop: skipped, a symlink out of docs (to ..)",
        f"docs/shadow.txt: skipped, a symlink out of docs (to {outside / 'shadow.txt'})",
        f"error: docs/dangling.txt: a symlink to {tmp_path / 'nothing-here'}, which does not exist",
        "error: docs/empty.txt: empty file, nothing to process",
        "error: docs/fifo.txt: not a regular file (a FIFO); submit regular files",
        "error: docs/sock.txt: not a regular file (a socket); submit regular files",
        "no supervisor is running: `levers up` (or `levers run`) processes them",
    ]
    assert Queue("toy.first", connection=connection).count == 1
    stored = b"".join(p.read_bytes() for p in (hostile / ".levers" / "artifacts").rglob("*") if p.is_file())
    assert SECRET not in stored


def test_a_symlink_named_explicitly_is_followed(connection: redis.Redis, hostile: Path) -> None:
    result = run_levers("submit", "docs/shadow.txt", cwd=hostile)

    assert result.returncode == 0, result.stderr
    [doc_id] = result.stdout.split()
    assert connection.hget(f"levers:toy:doc:{doc_id}", "name") == b"shadow.txt"


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/dev/null", "/dev/null: not a regular file (a character device); submit regular files"),
        ("docs/fifo.txt", "docs/fifo.txt: not a regular file (a FIFO); submit regular files"),
        ("docs/empty.txt", "docs/empty.txt: empty file, nothing to process"),
        ("docs/dangling.txt", "docs/dangling.txt: a symlink to {tmp}/nothing-here, which does not exist"),
        ("docs/nothing.txt", "docs/nothing.txt: no such file or directory"),
    ],
)  # fmt: skip
def test_a_named_path_that_is_no_document_is_one_line(
    tmp_path: Path, connection: redis.Redis, hostile: Path, path: str, error: str
) -> None:
    result = run_levers("submit", path, cwd=hostile, timeout_s=60)

    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: " + error.format(tmp=tmp_path)]
    assert result.stdout == ""
    assert Queue("toy.first", connection=connection).count == 0


def test_empty_bytes_are_refused_before_anything_is_stored(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=0)

    with pytest.raises(DocumentError, match=r"upload\.txt: empty document, nothing to process"):
        levers.submit_bytes(b"", "upload.txt", pipeline=root / "pipeline.yaml")
    stdin = run_levers("submit", "-", "--name", "upload.txt", cwd=root, stdin=b"")

    assert stdin.returncode == 2
    assert stdin.stderr.splitlines() == [
        "error: upload.txt: empty document, nothing to process (submit one with content)"
    ]
    assert connection.keys("levers:toy:*") == []
    assert Queue("toy.first", connection=connection).count == 0


def test_submit_wait_exits_1_when_a_document_fails(
    tmp_path: Path, redis_url: str, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, docs=1)
    (root / "docs" / "bad.txt").write_text("this one says FAIL")  # the toy handler fails it
    start_levers("up", cwd=root)

    waited = run_levers("submit", "docs", "--wait", cwd=root)

    assert waited.returncode == 1, waited.stderr
    assert len(waited.stdout.split()) >= 2  # both ids were printed


def test_on_a_terminal_each_id_comes_with_its_path(tmp_path: Path, redis_url: str) -> None:
    """Piped, submit prints ids alone (tested throughout); a person at a terminal sees which is which."""
    root = make_project(tmp_path, docs=2)
    leader, follower = pty.openpty()
    submitted = subprocess.Popen(
        [*LEVERS, "submit", "docs"], cwd=root, stdout=follower, stderr=subprocess.DEVNULL
    )
    os.close(follower)
    screen = bytearray()
    while chunk := _read(leader):
        screen.extend(chunk)
    os.close(leader)

    assert submitted.wait(timeout=60) == 0
    lines = screen.decode().split()
    assert "docs/doc0.txt" in lines and "docs/doc1.txt" in lines


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # the terminal closed: the command exited
        return b""


def test_submitting_with_no_supervisor_running_says_what_will_process_them(
    tmp_path: Path, redis_url: str
) -> None:
    root = make_project(tmp_path, docs=1)

    submitted = run_levers("submit", "docs", cwd=root)

    assert submitted.returncode == 0
    assert "no supervisor is running: `levers up` (or `levers run`) processes them" in submitted.stderr
