"""A supervisor that is PID 1 reaps the orphans it is handed.

In a container `levers up` is PID 1 (``bin/entrypoint`` execs it, and images seldom add an
init): every process of the container whose parent dies is handed to it, and one it never waits
for stays a zombie, holding a slot of the process table for the container's life. A worker killed
by SIGKILL leaves RQ's scheduler process, or a converter its handler started, to be killed or to
end on its own: each would become such a zombie. On a host they go to init, and nothing is left
to reap here.

Only what no one else waits for is reaped: the supervisor's own workers and its metrics process
are multiprocessing's to wait for (their exit codes are how the supervisor knows a worker died).
"""

from __future__ import annotations

import multiprocessing
import os


def reap_orphans() -> int:
    """Wait for every child that has exited and is not one of this process's multiprocessing
    processes; how many were reaped. Never blocks; one system call when there is none."""
    reaped = 0
    while hasattr(os, "waitid"):  # not on macOS, which containers do not run
        try:
            # WNOWAIT: a look only; the child is still there to be waited for
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no child at all
            return reaped
        if found is None:
            return reaped
        # multiprocessing waits for those of its own that ended, keeping their exit codes: what it
        # leaves is an orphan
        multiprocessing.active_children()
        try:
            os.waitpid(found.si_pid, os.WNOHANG)
        except ChildProcessError:  # one of multiprocessing's, just waited for
            continue
        reaped += 1
    return reaped
