"""`levers up`, step by step as levers.cli.app.up does it, with bench/patched.py's switches first.

``python -m bench.supervise PIPELINE``: $BENCH_MODE ("apply" or "revert") applies the per-job
patches src lacks or reverts those it has, and $BENCH_NO_FREEZE=1 turns ``gc.freeze`` into a
no-op, in the supervisor before it preloads and forks, so every worker runs that way. Used by the
efficiency benchmark (the other side of the patches under the real supervisor and pool) and by
the memory benchmark (preloading without freezing).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench import patched
from levers.server.project import open_project
from levers.supervisor import processes as pool


def main(argv: list[str]) -> None:
    done = patched.from_env()
    project = open_project(Path(argv[0]), check_imports=True)
    supervisor = pool.build_supervisor(project)
    pool.SignalLatch(supervisor).install()
    sys.stderr.write(f"bench.supervise: {done}\n")
    pool.run(supervisor, project.connection)


if __name__ == "__main__":
    main(sys.argv[1:])
