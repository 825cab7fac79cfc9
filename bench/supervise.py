"""The real `levers up`, with ``gc.freeze`` turned into a no-op: the memory benchmark's preloaded
workers without freezing.

``python -m bench.supervise PIPELINE``: runs ``levers up -f PIPELINE`` in this process after
replacing ``gc.freeze``, so the supervisor preloads the handlers and forks its workers without
freezing what it imported, and every worker runs that way.
"""

from __future__ import annotations

import gc
import runpy
import sys


def main(argv: list[str]) -> None:
    gc.freeze = lambda: None
    sys.argv = ["levers", "up", "-f", argv[0]]
    runpy.run_module("levers", run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
