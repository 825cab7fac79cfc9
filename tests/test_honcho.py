"""The Procfile under honcho, as a Procfile platform runs it: one `levers up --phase P` per process
type. Ctrl-C makes honcho send SIGTERM to every process and SIGKILL 5 s later: a 10 s job still
running then is finished by its orphaned worker, once, and handed on to the next phase's queue;
with none running, every process stops cleanly within the 5 s."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import redis
from rq import Queue

from levers.observing.reports import supervisor_leases
from tests.conftest import doc_field, levers, make_project, submit, wait_until


@pytest.mark.e2e
def test_ctrl_c_under_honcho_lets_the_running_job_finish_once(
    tmp_path: Path, redis_url: str, connection: redis.Redis
) -> None:
    root = make_project(tmp_path, workers=1, seconds=10, docs=1)
    procfile = levers("procfile", "--grace", "25", cwd=root)
    assert procfile.returncode == 0, procfile.stderr
    (root / "Procfile").write_text(procfile.stdout)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    honcho = subprocess.Popen(
        [sys.executable, "-m", "honcho", "start"], cwd=root, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    workers: list[psutil.Process] = []
    try:
        wait_until(lambda: len(supervisor_leases(connection, "toy")) == 2, timeout_s=90)
        [doc_id] = submit(root, "docs/doc0.txt")
        wait_until(lambda: doc_field(connection, doc_id, "status") == "running")
        workers = psutil.Process(honcho.pid).children(recursive=True)

        honcho.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = honcho.communicate(timeout=60)
        assert "sending SIGKILL" in output, output  # the job outlived honcho's 5 s

        # every supervisor is gone: the job is finished and handed on, to wait for the next start
        wait_until(lambda: doc_field(connection, doc_id, "first:seconds") is not None, timeout_s=60)
        assert doc_field(connection, doc_id, "first:attempts") == "1", output
        wait_until(lambda: Queue("toy.second", connection=connection).count == 1)
        assert Queue("toy.first", connection=connection).started_job_registry.count == 0
        wait_until(lambda: not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE])
    finally:
        for process in [psutil.Process(honcho.pid), *workers] if honcho.poll() is None else workers:
            with contextlib.suppress(psutil.Error):
                process.kill()
        honcho.communicate(timeout=30)


@pytest.mark.e2e
def test_a_stop_under_honcho_is_a_clean_exit_of_every_process(
    tmp_path: Path, connection: redis.Redis
) -> None:
    """Each Procfile line execs `levers up`: honcho sees its exit code, not that of a shell the
    stop signal killed while levers was still stopping."""
    root = make_project(tmp_path, workers=1, docs=0)
    (root / "Procfile").write_text(levers("procfile", cwd=root).stdout)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    honcho = subprocess.Popen(
        [sys.executable, "-m", "honcho", "start"], cwd=root, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: len(supervisor_leases(connection, "toy")) == 2, timeout_s=90)
        honcho.send_signal(signal.SIGTERM)
        output, _ = honcho.communicate(timeout=60)
    finally:
        if honcho.poll() is None:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.communicate(timeout=30)
    assert "first.1 stopped (rc=0)" in output and "second.1 stopped (rc=0)" in output, output
