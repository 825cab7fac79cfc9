"""`levers up` as a container's PID 1 (no init): it reaps the orphans it is handed, leaving its own
workers' exit codes to multiprocessing, and hears a stop signal from its first moments (the
kernel spares a PID 1 every signal it has no handler for)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis

from tests.conftest import LEVERS, submit, wait_until

# Stands in for PID 1: a child subreaper is handed its descendants' orphans as init is.
REAPER_SCRIPT = """
import ctypes, json, multiprocessing, os, subprocess, sys, time

import psutil

from levers.supervisor.orphans import reap_orphans

assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
worker = multiprocessing.get_context("fork").Process(target=sys.exit, args=(3,))
worker.start()
# a parent that leaves its child behind: the child is handed to this process, and ends
subprocess.run([sys.executable, "-c", "import subprocess; subprocess.Popen(['sleep', '0.2'])"], check=True)
time.sleep(1.0)
me = psutil.Process()
zombies_before = sum(c.status() == psutil.STATUS_ZOMBIE for c in me.children())
reaped = reap_orphans()
print(json.dumps({
    "zombies_before": zombies_before,
    "reaped": reaped,
    "worker_exitcode": worker.exitcode,
    "zombies_after": sum(c.status() == psutil.STATUS_ZOMBIE for c in me.children()),
    "again": reap_orphans(),
}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreapers are Linux's")
def test_orphans_are_reaped_and_the_workers_exit_codes_kept() -> None:
    result = subprocess.run(
        [sys.executable, "-c", REAPER_SCRIPT], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    # the orphan and the worker were both zombies; only the orphan was this code's to reap
    assert found == {"zombies_before": 2, "reaped": 1, "worker_exitcode": 3, "zombies_after": 0, "again": 0}


# The first attempt starts a process of its own session (the worker's process group ends with the
# worker; this one does not), which notes its parent once the worker is gone, and the worker dies
# by SIGKILL; the retry succeeds.
PHASES = """
import os
import signal
import subprocess

def work(doc, ctx):
    marker = ctx.options["marker"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        note = "sleep 0.5; grep PPid /proc/$$/status > {0}.part && mv {0}.part {0}"
        note = note.format(ctx.options["parent"])
        subprocess.Popen(["sh", "-c", note], start_new_session=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return {}
"""

PIPELINE = """
name: reaped
phases:
  work:
    handler: reapedphases:work
    accepts: [.txt]
    retries: 2
    retry_delay: 0
    levers: {{workers: 1}}
    options: {{marker: "{marker}", parent: "{parent}"}}
"""


def can_be_pid_1() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", "test $$ = 1"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not can_be_pid_1(), reason="no PID namespace can be made here (unshare, as root)")
def test_levers_up_as_pid_1_reaps_what_a_killed_worker_left(tmp_path: Path, connection: redis.Redis) -> None:
    (tmp_path / "reapedphases.py").write_text(PHASES)
    parent = tmp_path / "parent"
    (tmp_path / "pipeline.yaml").write_text(PIPELINE.format(marker=tmp_path / "marker", parent=parent))
    (tmp_path / "doc.txt").write_text("one document")
    [doc_id] = submit(tmp_path, "doc.txt")

    # as a container runs it: `levers up` is PID 1 of its own PID namespace
    namespace = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *LEVERS, "up"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: len(psutil.Process(namespace.pid).children()) == 1)
        [supervisor] = psutil.Process(namespace.pid).children()
        wait_until(lambda: connection.hget(f"levers:reaped:doc:{doc_id}", "status") == b"done", timeout_s=60)
        wait_until(parent.exists, timeout_s=10)

        assert parent.read_text().split() == ["PPid:", "1"]  # the orphan was handed to `levers up`
        # and, once it ended, reaped: no zombie is left under PID 1
        wait_until(lambda: not [c for c in supervisor.children() if c.status() == psutil.STATUS_ZOMBIE])
        supervisor.terminate()  # as the platform stops a container: SIGTERM to its PID 1
        assert namespace.wait(timeout=30) == 0
    finally:
        namespace.kill()  # --kill-child: the namespace's processes end with it
        namespace.wait(timeout=30)


# A handler module whose import takes a minute: `levers up` is starting while it is imported.
SLOW_TO_IMPORT = """
import time

time.sleep(60)

def work(doc, ctx):
    return {}
"""


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for ``signum`` (its SigCgt mask)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(line.split()[1] for line in status if line.startswith("SigCgt:"))
    return bool(int(caught, 16) & (1 << (signum - 1)))


@pytest.mark.skipif(not can_be_pid_1(), reason="no PID namespace can be made here (unshare, as root)")
def test_levers_up_as_pid_1_stops_when_told_while_starting(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "slowphases.py").write_text(SLOW_TO_IMPORT)
    (tmp_path / "pipeline.yaml").write_text(
        "name: slow\nphases:\n  work:\n    handler: slowphases:work\n    accepts: [.txt]\n"
    )
    namespace = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *LEVERS, "up"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: len(psutil.Process(namespace.pid).children()) == 1)
        [supervisor] = psutil.Process(namespace.pid).children()
        # heard from before the handlers are imported: as PID 1, a stop meanwhile would be lost
        wait_until(lambda: catches(supervisor.pid, signal.SIGTERM), timeout_s=30)
        time.sleep(1)  # well into the import
        supervisor.terminate()

        _, errors = namespace.communicate(timeout=30)
        assert namespace.returncode == 0, errors
        assert "stopped while starting" in errors
    finally:
        namespace.kill()
        namespace.wait(timeout=30)
